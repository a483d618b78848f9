// A CPU emulation of the little of CUDA that csrc/cuda uses, so the kernels' indexing, chunking,
// vector/scalar paths and block reductions can be checked on a machine without a GPU. Each CUDA
// thread of a block is an OS thread; blocks run one after the other; __syncthreads is a block-wide
// std::barrier and warp shuffles go through a per-warp buffer and barrier. Timing, memory
// coalescing and the real compiler are not emulated: this checks logic, not speed.
// The barriers block on a condition variable: std::barrier spins and yields while it waits, which
// with a block's 256 threads on a few cores spent most of the run in sched_yield.
// Used by run.sh, which rewrites the .cu sources (launch syntax, CUDA includes) to include it.
#pragma once
#include <c10/core/Device.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define CUDART_NAN (std::numeric_limits<double>::quiet_NaN())
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
using cudaStream_t = void*;
using std::isfinite;
using std::isnan;

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace at

namespace mk_emu {
// A reusable barrier for `count` threads (std::barrier's arrive_and_wait, without the spinning).
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      lock.unlock();
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return phase_ != phase; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const unsigned count_;
  unsigned arrived_ = 0;
  uint64_t phase_ = 0;
};

struct Block {
  explicit Block(unsigned threads) : bar(threads), buf(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_bar.emplace_back(std::make_unique<Barrier>(32));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Barrier>> warp_bar;
  std::vector<double> buf;
};
inline thread_local Block* cur = nullptr;
inline bool force_large_index = false;  // batch_norm: take the 64-bit division path
inline int64_t launches = 0;
}  // namespace mk_emu

inline void __syncthreads() { mk_emu::cur->bar.arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T v, int off) {
  mk_emu::Block* b = mk_emu::cur;
  const unsigned tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  b->buf[tid] = static_cast<double>(v);  // float and double round-trip exactly
  b->warp_bar[warp]->arrive_and_wait();
  const T r = lane + off < 32 ? static_cast<T>(b->buf[tid + off]) : v;
  b->warp_bar[warp]->arrive_and_wait();
  return r;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }

template <typename Kernel, typename... Args>
void mk_emulate_launch(Kernel kernel, dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t, Args... args) {
  if (block.x % 32 != 0 || block.x > 1024 || grid.x == 0 || grid.y == 0) throw std::runtime_error("bad launch configuration");
  ++mk_emu::launches;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      mk_emu::Block blk(block.x);
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(bx, by);
          blockDim = block;
          gridDim = grid;
          mk_emu::cur = &blk;
          kernel(args...);
        });
      for (auto& th : threads) th.join();
    }
}
