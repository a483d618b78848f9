// theta_i += epsilon * (mean_t adapted_i[t] - theta_i), fused over the whole list, in place.
//
// Layout: one multi-tensor launch per table of up to 64 tensors (cuda_common.cuh): 256 threads per
// block, one 16384-element chunk of theta per block. Each thread owns 16-byte packs of theta (when
// theta, adapted and the row length allow it) and sums the T rows of adapted for them in task
// order, then writes theta + eps * (sum / T - theta). Every element is read and written by one
// thread only: no races, no reductions across threads.
#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

template <typename scalar_t>
struct ReptileOp {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int V = vec_size<scalar_t>();
  scalar_t* theta;
  const scalar_t* phi;  // [T, n] rows
  int64_t n;
  int64_t T;
  opmath_t eps;
  opmath_t inv_T;

  __device__ __forceinline__ void one(int64_t i) const {
    opmath_t acc = 0;
    for (int64_t t = 0; t < T; ++t) acc += static_cast<opmath_t>(phi[t * n + i]);
    const opmath_t th = static_cast<opmath_t>(theta[i]);
    theta[i] = static_cast<scalar_t>(th + eps * (acc * inv_T - th));
  }
  __device__ __forceinline__ void vec(int64_t i) const {
    using P = Pack<scalar_t, V>;
    opmath_t acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0;
#pragma unroll 4
    for (int64_t t = 0; t < T; ++t) {
      const P a = *reinterpret_cast<const P*>(phi + t * n + i);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += static_cast<opmath_t>(a.v[k]);
    }
    const P th = *reinterpret_cast<const P*>(theta + i);
    P o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t x = static_cast<opmath_t>(th.v[k]);
      o.v[k] = static_cast<scalar_t>(x + eps * (acc[k] * inv_T - x));
    }
    *reinterpret_cast<P*>(theta + i) = o;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
reptile_kernel(const TensorTable<2> tab, const int64_t chunks, const int64_t T, const double epsilon) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int j = tab.find(c);
    const int64_t n = tab.numel[j];
    const int64_t begin = (c - tab.chunk_start[j]) * kChunk;
    const int64_t end = min64(n, begin + kChunk);
    const ReptileOp<scalar_t> op{static_cast<scalar_t*>(tab.ptr[0][j]), static_cast<const scalar_t*>(tab.ptr[1][j]),
                                 n, T, static_cast<opmath_t>(epsilon), opmath_t(1) / static_cast<opmath_t>(T)};
    for_range<V>(begin, end, tab.vec_ok[j], op);
  }
}

void reptile_update_(at::TensorList params, at::TensorList adapted, double epsilon) {
  check_uniform_list(params, "params");
  TORCH_CHECK_VALUE(adapted.size() == params.size(), "adapted has ", adapted.size(), " tensors but params has ",
              params.size(), "; pass one per tensor");
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t T = leading_tasks(adapted, "adapted");
  TORCH_CHECK_VALUE(T >= 1, "adapted must hold at least one task in dim 0");
  std::vector<at::Tensor> theta(n), phi(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(adapted[i].sizes().slice(1) == params[i].sizes(), "adapted[", i, "] has shape ", adapted[i].sizes(),
                " but must be [T, *params[", i, "].shape] = [T, ", params[i].sizes(), "]");
    TORCH_CHECK_VALUE(adapted[i].scalar_type() == params[i].scalar_type() && adapted[i].device() == params[i].device(),
                "adapted[", i, "] must match params[", i, "] in dtype and device");
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (int64_t i = 0; i < n; ++i) {
    theta[i] = params[i].is_contiguous() ? params[i] : params[i].contiguous();
    phi[i] = adapted[i].contiguous();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(params[0].scalar_type(), "reptile_update_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    TableBuilder<2> tb;
    auto launch = [&]() {
      reptile_kernel<scalar_t><<<grid_for(tb.chunks()), kThreads, 0, stream>>>(tb.table(), tb.chunks(), T, epsilon);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tb.reset();
    };
    for (int64_t i = 0; i < n; ++i) {
      const int64_t numel = theta[i].numel();
      if (numel == 0) continue;
      void* tp = theta[i].data_ptr();
      void* pp = phi[i].data_ptr();
      // Rows of adapted start at t * numel: packs need that to be a multiple of the pack size too.
      const bool vec = aligned16(tp) && aligned16(pp) && numel % V == 0;
      if (tb.add({tp, pp}, numel, 0, static_cast<int32_t>(i), vec)) launch();
    }
    if (!tb.empty()) launch();
  });
  for (int64_t i = 0; i < n; ++i)
    if (!params[i].is_contiguous()) const_cast<at::Tensor&>(params[i]).copy_(theta[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) { m.impl("reptile_update_", &reptile_update_); }

}  // namespace cuda
}  // namespace meta_kernels
