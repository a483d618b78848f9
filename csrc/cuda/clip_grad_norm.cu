// Per-task global L2 norm of a list of [T, ...] grads and the clip factor, in one pass.
//
// Layout: stage 1 is one multi-tensor launch (up to 64 tensors per table) on a 2-D grid: x runs
// over the 4096-element chunks of one task's slice of every tensor, y over the tasks. Each block
// squares and sums its chunk (per-thread accumulators in the math type, fp32 for half/bf16/float),
// reduces it with a fixed-order block reduction and writes one float64 partial to
// partial[t, chunk]: no atomics, so the result never depends on scheduling. Stage 2 is one small
// launch, one block per task, that sums that task's partials in a fixed order and writes
// norm = sqrt(sum) and factor = isfinite(norm) ? min(1, max_norm / (norm + eps)) : NaN.
#include <math_constants.h>

#include <cmath>

#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

constexpr int kFinalThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
struct SumSqOp {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int V = vec_size<scalar_t>();
  const scalar_t* g;
  opmath_t* acc;  // this thread's accumulator

  __device__ __forceinline__ void one(int64_t i) const {
    const opmath_t v = static_cast<opmath_t>(g[i]);
    *acc += v * v;
  }
  __device__ __forceinline__ void vec(int64_t i) const {
    using P = Pack<scalar_t, V>;
    const P gg = *reinterpret_cast<const P*>(g + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t v = static_cast<opmath_t>(gg.v[k]);
      *acc += v * v;
    }
  }
};

// tab.numel[j] is the per-task size of tensor j; partial has T rows of ncols columns, and this
// launch's chunks are columns [col_base, col_base + chunks).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sumsq_kernel(const TensorTable<1> tab, const int64_t chunks, const int64_t T, const int64_t col_base,
             const int64_t ncols, double* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  __shared__ double shm[32];
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int j = tab.find(c);
    const int64_t inner = tab.numel[j];
    const int64_t begin = (c - tab.chunk_start[j]) * kChunk;
    const int64_t end = min64(inner, begin + kChunk);
    for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
      opmath_t acc = 0;
      const SumSqOp<scalar_t> op{static_cast<const scalar_t*>(tab.ptr[0][j]) + t * inner, &acc};
      for_range<V>(begin, end, tab.vec_ok[j], op);
      double v[1] = {static_cast<double>(acc)};
      block_sum(v, shm);
      if (threadIdx.x == 0) partial[t * ncols + col_base + c] = v[0];
    }
  }
}

template <typename out_t>
__global__ void __launch_bounds__(kFinalThreads)
clip_finalize_kernel(const double* __restrict__ partial, const int64_t T, const int64_t ncols, const double max_norm,
                     const double eps, out_t* __restrict__ norm, out_t* __restrict__ factor) {
  __shared__ double shm[32];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    double v[1] = {0.0};
    for (int64_t k = threadIdx.x; k < ncols; k += blockDim.x) v[0] += partial[t * ncols + k];
    block_sum(v, shm);
    if (threadIdx.x == 0) {
      const double nrm = ::sqrt(v[0]);
      double f;
      if (isfinite(nrm)) {
        // min(1, q) as std::min(1.0, q) on the CPU: a NaN q gives 1.
        const double q = max_norm / (nrm + eps);
        f = q < 1.0 ? q : 1.0;
      } else {
        // A non-finite norm gives a NaN factor so the update is poisoned visibly, never silently zeroed.
        f = CUDART_NAN;
      }
      norm[t] = static_cast<out_t>(nrm);
      factor[t] = static_cast<out_t>(f);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> clip_grad_norm(at::TensorList grads, double max_norm, double eps) {
  check_uniform_list(grads, "clip_grad_norm");
  const int64_t T = leading_tasks(grads, "clip_grad_norm");
  const int64_t n = static_cast<int64_t>(grads.size());
  const c10::cuda::CUDAGuard guard(grads[0].device());

  const auto out_dtype = math_dtype(grads[0].scalar_type());
  at::Tensor norm = at::empty({T}, grads[0].options().dtype(out_dtype));
  at::Tensor factor = at::empty({T}, grads[0].options().dtype(out_dtype));
  if (T == 0) return {norm, factor};

  std::vector<at::Tensor> g(n);
  int64_t ncols = 0;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = grads[i].contiguous();
    const int64_t inner = g[i].numel() / T;
    ncols += (inner + kChunk - 1) / kChunk;
  }
  at::Tensor partial = at::empty({T, ncols}, grads[0].options().dtype(at::kDouble));
  double* pp = ncols > 0 ? partial.data_ptr<double>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  MK_DISPATCH_FLOATING(grads[0].scalar_type(), "clip_grad_norm_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    TableBuilder<1> tb;
    int64_t col_base = 0;
    auto launch = [&]() {
      const dim3 grid(grid_for(tb.chunks()), static_cast<unsigned>(std::min<int64_t>(T, kMaxGridY)));
      sumsq_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(tb.table(), tb.chunks(), T, col_base, ncols, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      col_base += tb.chunks();
      tb.reset();
    };
    for (int64_t i = 0; i < n; ++i) {
      const int64_t inner = g[i].numel() / T;
      if (inner == 0) continue;
      void* ptr = g[i].data_ptr();
      // Task rows start at t * inner: packs need that to be a multiple of the pack size too.
      const bool vec = aligned16(ptr) && inner % V == 0;
      if (tb.add({ptr}, inner, 0, static_cast<int32_t>(i), vec)) launch();
    }
    if (!tb.empty()) launch();
    TORCH_INTERNAL_ASSERT(col_base == ncols);
  });

  AT_DISPATCH_FLOATING_TYPES(out_dtype, "clip_grad_norm_finalize_cuda", [&] {
    clip_finalize_kernel<scalar_t><<<grid_for(T), kFinalThreads, 0, stream>>>(
        pp, T, ncols, max_norm, eps, norm.data_ptr<scalar_t>(), factor.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {norm, factor};
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) { m.impl("clip_grad_norm", &clip_grad_norm); }

}  // namespace cuda
}  // namespace meta_kernels
