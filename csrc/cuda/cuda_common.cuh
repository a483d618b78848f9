// Shared by the CUDA kernels: device-side scalar reads of any floating dtype, a deterministic
// block reduction, 16-byte vector packs, and the multi-tensor table that lets one launch cover a
// whole list of tensors (the metadata travels in the kernel's argument block, so no host sync
// and no host-to-device copy is needed).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "../common.h"

namespace meta_kernels {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Scalars read on the device (lrs, scale, batch-norm weight/bias/statistics): any of the four
// floating dtypes and any strides, so no conversion kernel and no .item() is needed.

enum DtypeCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline bool dtype_code(at::ScalarType t, int* code) {
  switch (t) {
    case at::kFloat: *code = kF32; return true;
    case at::kDouble: *code = kF64; return true;
    case at::kHalf: *code = kF16; return true;
    case at::kBFloat16: *code = kBF16; return true;
    default: return false;
  }
}

// Element [i, j] of a 1-D or 2-D tensor (j = 0 and s1 unused for 1-D ones).
struct ScalarRef {
  const void* ptr;
  int64_t s0;
  int64_t s1;
  int dtype;

  __device__ __forceinline__ double load(int64_t i, int64_t j = 0) const {
    const int64_t o = i * s0 + j * s1;
    switch (dtype) {
      case kF32: return static_cast<double>(static_cast<const float*>(ptr)[o]);
      case kF64: return static_cast<const double*>(ptr)[o];
      case kF16: return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(ptr)[o]));
      default: return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[o]));
    }
  }
};

// Owns what a ScalarRef points into: the tensor itself, or a float64 copy of it for dtypes the
// device reader does not handle (a rare path; it costs one conversion kernel).
struct ScalarSource {
  at::Tensor keep;
  ScalarRef ref;
};

inline ScalarSource scalar_source(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() <= 2, "scalar_source takes 1-D or 2-D tensors");
  ScalarSource src;
  int code = 0;
  src.keep = dtype_code(t.scalar_type(), &code) ? t : t.to(at::kDouble);
  if (src.keep.scalar_type() == at::kDouble) code = kF64;
  src.ref.ptr = src.keep.data_ptr();
  src.ref.s0 = src.keep.dim() >= 1 ? src.keep.stride(0) : 0;
  src.ref.s1 = src.keep.dim() >= 2 ? src.keep.stride(1) : 0;
  src.ref.dtype = code;
  return src;
}

// Stores v into element o of a contiguous tensor of dtype `code`.
__device__ __forceinline__ void store_as(void* ptr, int code, int64_t o, double v) {
  switch (code) {
    case kF32: static_cast<float*>(ptr)[o] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(ptr)[o] = v; break;
    case kF16: static_cast<c10::Half*>(ptr)[o] = static_cast<c10::Half>(static_cast<float>(v)); break;
    default: static_cast<c10::BFloat16*>(ptr)[o] = static_cast<c10::BFloat16>(static_cast<float>(v)); break;
  }
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float dev_sqrt(float v) { return ::sqrtf(v); }
__device__ __forceinline__ double dev_sqrt(double v) { return ::sqrt(v); }

// ---------------------------------------------------------------------------------------------
// Deterministic block reduction of K values (float or double): warp shuffles, then one warp over
// the per-warp partials. The order depends only on blockDim, never on scheduling. Every thread of
// the block must call it (blockDim.x a multiple of 32, at most 1024); every thread gets the sums.

template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K], T* shared /* K * 32 entries */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x + 31) >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) shared[k * 32 + warp] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      T w = lane < nwarps ? shared[k * 32 + lane] : T(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) w += __shfl_down_sync(0xffffffffu, w, off);
      if (lane == 0) shared[k * 32] = w;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = shared[k * 32];
}

// ---------------------------------------------------------------------------------------------
// 16-byte vector packs: 4 floats, 2 doubles, 8 halves/bfloat16s per load or store.

template <typename scalar_t>
constexpr int vec_size() {
  return sizeof(scalar_t) >= 16 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Applies op over the elements [a, b) with the threads of one block: a scalar head up to the next
// multiple of V, a body of V-element packs (op.vec), a scalar tail (op.one). `vec` says that every
// base pointer op touches is 16-byte aligned, so that index multiples of V are pack-aligned.
template <int V, typename Op>
__device__ __forceinline__ void for_range(int64_t a, int64_t b, bool vec, const Op& op) {
  if (!vec || V == 1) {
    for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) op.one(i);
    return;
  }
  const int64_t a_al = min64(b, (a + V - 1) / V * V);
  for (int64_t i = a + threadIdx.x; i < a_al; i += blockDim.x) op.one(i);
  const int64_t nvec = (b - a_al) / V;
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) op.vec(a_al + k * V);
  for (int64_t i = a_al + nvec * V + threadIdx.x; i < b; i += blockDim.x) op.one(i);
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor table: up to kMaxTensors tensors per launch, each cut into fixed-size chunks
// (kChunk elements unless the op picks another size);
// block b works on chunks b, b + gridDim.x, ... and finds a chunk's tensor by binary search over
// the prefix sums of the chunk counts. About 3.4 KB for DEPTH = 3: it fits the classic 4 KB
// kernel-argument limit, so it works with every driver. Longer lists take more launches.

constexpr int kMaxTensors = 64;
// A multiple of every vec_size, so chunk starts stay aligned. Small enough that a large list makes
// many blocks (64 MB of float32 params: ~4000), so the last partial wave of blocks is a small part
// of the run; large enough (4 packs per thread for float32) to amortise the per-chunk lookup.
constexpr int64_t kChunk = 4096;
constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

// MAX: tensors per table, lower for deeper tables (more pointers per tensor) to stay in 4 KB.
template <int DEPTH, int MAX = kMaxTensors>
struct TensorTable {
  void* ptr[DEPTH][MAX];
  int64_t numel[MAX];  // elements the chunks cover
  int64_t aux[MAX];    // op-specific (per-task size for sgd_step)
  int64_t chunk_start[MAX + 1];
  int32_t index[MAX];  // position in the caller's list
  bool vec_ok[MAX];
  int32_t count;

  // The entry holding chunk c (chunk_start is strictly increasing: empty tensors are never added).
  __device__ __forceinline__ int find(int64_t c) const {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};
static_assert(sizeof(TensorTable<3>) <= 3584, "the table must leave room in a 4 KB kernel-argument block");

// Fills tables on the host; the caller launches each full one (and the last), then reset()s.
template <int DEPTH, int MAX = kMaxTensors>
class TableBuilder {
 public:
  explicit TableBuilder(int64_t chunk = kChunk) : chunk_(chunk) { reset(); }

  // Adds one non-empty tensor; returns true when the table is full and must be launched.
  bool add(const std::array<void*, DEPTH>& ptrs, int64_t numel, int64_t aux, int32_t index, bool vec_ok) {
    TORCH_INTERNAL_ASSERT(numel > 0 && table_.count < MAX);
    const int k = table_.count;
    for (int d = 0; d < DEPTH; ++d) table_.ptr[d][k] = ptrs[d];
    table_.numel[k] = numel;
    table_.aux[k] = aux;
    table_.index[k] = index;
    table_.vec_ok[k] = vec_ok;
    table_.chunk_start[k] = chunks_;
    chunks_ += (numel + chunk_ - 1) / chunk_;
    table_.chunk_start[k + 1] = chunks_;
    table_.count = k + 1;
    return table_.count == MAX;
  }
  bool empty() const { return table_.count == 0; }
  const TensorTable<DEPTH, MAX>& table() const { return table_; }
  int64_t chunks() const { return chunks_; }
  void reset() {
    table_ = TensorTable<DEPTH, MAX>();
    table_.count = 0;
    chunks_ = 0;
  }

 private:
  TensorTable<DEPTH, MAX> table_;
  int64_t chunk_;
  int64_t chunks_ = 0;
};

inline unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxGrid)));
}

}  // namespace cuda
}  // namespace meta_kernels
