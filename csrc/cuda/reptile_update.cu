// theta_i += epsilon * (mean_t adapted_i[t] - theta_i), fused over the whole list, in place.
//
// Layout: one multi-tensor launch per table of up to 64 tensors (cuda_common.cuh), 256 threads per
// block. The sum over the T tasks is split across the block so that there is enough parallelism
// when theta is small and T large (Reptile's usual shape: ~100k parameters, tens to hundreds of
// tasks): the threads form R = 1, 2, 4 or 8 row groups (by T) of 256 / R lanes; each lane owns V
// consecutive elements (one 16-byte pack when theta, adapted and the row length allow it), and
// group r sums rows r, r + R, r + 2R, ... for them. The R partial sums meet in shared memory and
// group 0 adds them in a fixed order (deterministic) and writes theta + eps * (sum / T - theta).
// A block's chunk is therefore (256 / R) * V elements of theta.
#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

inline int row_groups(int64_t T) { return T >= 8 ? 8 : T >= 4 ? 4 : T >= 2 ? 2 : 1; }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
reptile_kernel(const TensorTable<2> tab, const int64_t chunks, const int64_t chunk, const int64_t T, const int R,
               const double epsilon) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  using P = Pack<scalar_t, V>;
  __shared__ opmath_t part[kThreads * V];
  const int lanes = kThreads / R;
  const int r = static_cast<int>(threadIdx.x) / lanes;
  const int lane = static_cast<int>(threadIdx.x) - r * lanes;
  const opmath_t eps = static_cast<opmath_t>(epsilon);
  const opmath_t inv_T = opmath_t(1) / static_cast<opmath_t>(T);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int j = tab.find(c);
    const int64_t n = tab.numel[j];
    const int64_t i0 = (c - tab.chunk_start[j]) * chunk + static_cast<int64_t>(lane) * V;  // this lane's elements
    const int cnt = i0 < n ? static_cast<int>(min64(V, n - i0)) : 0;
    scalar_t* theta = static_cast<scalar_t*>(tab.ptr[0][j]);
    const scalar_t* phi = static_cast<const scalar_t*>(tab.ptr[1][j]);
    const bool vec = tab.vec_ok[j] && cnt == V;
    opmath_t acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0;
    if (vec) {
#pragma unroll 4
      for (int64_t t = r; t < T; t += R) {
        const P a = *reinterpret_cast<const P*>(phi + t * n + i0);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += static_cast<opmath_t>(a.v[k]);
      }
    } else if (cnt > 0) {
      for (int64_t t = r; t < T; t += R)
#pragma unroll
        for (int k = 0; k < V; ++k)  // static indices keep acc in registers
          if (k < cnt) acc[k] += static_cast<opmath_t>(phi[t * n + i0 + k]);
    }
    if (R > 1) {
#pragma unroll
      for (int k = 0; k < V; ++k) part[threadIdx.x * V + k] = acc[k];
      __syncthreads();
      if (r == 0) {
        for (int g = 1; g < R; ++g)
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += part[(g * lanes + lane) * V + k];
      }
      __syncthreads();  // part is reused by the next chunk
    }
    if (r == 0 && cnt > 0) {
      if (vec) {
        const P th = *reinterpret_cast<const P*>(theta + i0);
        P o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const opmath_t x = static_cast<opmath_t>(th.v[k]);
          o.v[k] = static_cast<scalar_t>(x + eps * (acc[k] * inv_T - x));
        }
        *reinterpret_cast<P*>(theta + i0) = o;
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          if (k < cnt) {
            const opmath_t x = static_cast<opmath_t>(theta[i0 + k]);
            theta[i0 + k] = static_cast<scalar_t>(x + eps * (acc[k] * inv_T - x));
          }
        }
      }
    }
  }
}

void reptile_update_(at::TensorList params, at::TensorList adapted, double epsilon) {
  const int64_t T = check_reptile_args(params, adapted);
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<at::Tensor> theta(n), phi(n);
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (int64_t i = 0; i < n; ++i) {
    theta[i] = params[i].is_contiguous() ? params[i] : params[i].contiguous();
    phi[i] = adapted[i].contiguous();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(params[0].scalar_type(), "reptile_update_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const int R = row_groups(T);
    const int64_t chunk = static_cast<int64_t>(kThreads / R) * V;
    TableBuilder<2> tb(chunk);
    auto launch = [&]() {
      reptile_kernel<scalar_t><<<grid_for(tb.chunks()), kThreads, 0, stream>>>(tb.table(), tb.chunks(), chunk, T, R,
                                                                               epsilon);
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
