// b_i' = mu * b_i + s[t] * g_i, phi_i = theta_i - lrs[i] * rates_i * b_i' for a whole list of
// tensors (torch.optim.SGD's momentum, no dampening): one launch per table of 32 tensors
// (stateful.cuh), 256 threads per block, one 4096-element chunk per block.
#include "stateful.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
momentum_step_kernel(const StatefulTable<6> tab, const int64_t chunks, const StatefulScalars sc, const double momentum) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t mu = static_cast<opmath_t>(momentum);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    int j;
    int64_t begin, end;
    chunk_range(tab, c, j, begin, end);
    const scalar_t* p = static_cast<const scalar_t*>(tab.ptr[0][j]);
    const scalar_t* g = static_cast<const scalar_t*>(tab.ptr[1][j]);
    const scalar_t* b = static_cast<const scalar_t*>(tab.ptr[2][j]);
    scalar_t* p_out = static_cast<scalar_t*>(tab.ptr[3][j]);
    scalar_t* b_out = static_cast<scalar_t*>(tab.ptr[4][j]);
    const scalar_t* rates = static_cast<const scalar_t*>(tab.ptr[5][j]);
    const double lr = sc.lrs.load(tab.index[j]);
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      opmath_t s, rate;
      element_coefs(sc, lr, rates, e, tab.aux[j], s, rate);
      const opmath_t buf = mu * static_cast<opmath_t>(b[e]) + s * static_cast<opmath_t>(g[e]);
      p_out[e] = static_cast<scalar_t>(static_cast<opmath_t>(p[e]) - rate * buf);
      b_out[e] = static_cast<scalar_t>(buf);
    }
  }
}

void momentum_launch(const StatefulLists& l, const at::Tensor& lrs, const c10::optional<at::Tensor>& scale,
                     double momentum) {
  const c10::cuda::CUDAGuard guard(l.p[0].device());
  const StatefulSources src = stateful_sources(lrs, scale, l);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(l.p[0].scalar_type(), "momentum_step_cuda", [&] {
    for_each_table<6>(l, [&](const StatefulTable<6>& tab, int64_t chunks) {
      momentum_step_kernel<scalar_t><<<grid_for(chunks), kThreads, 0, stream>>>(tab, chunks, src.scalars, momentum);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> momentum_step(
    at::TensorList params, at::TensorList grads, at::TensorList bufs, const at::Tensor& lrs,
    const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates, double momentum) {
  const StatefulLists l = stateful_lists(params, grads, {bufs}, lrs, scale, rates, false, "momentum_step");
  momentum_launch(l, lrs, scale, momentum);
  return {l.p_out, l.state_out[0]};
}

void momentum_step_(at::TensorList params, at::TensorList grads, at::TensorList bufs, const at::Tensor& lrs,
                    const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates, double momentum) {
  const StatefulLists l = stateful_lists(params, grads, {bufs}, lrs, scale, rates, true, "momentum_step");
  momentum_launch(l, lrs, scale, momentum);
  finish_stateful_in_place(params, {bufs}, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) {
  m.impl("momentum_step", &momentum_step);
  m.impl("momentum_step_", &momentum_step_);
}

}  // namespace cuda
}  // namespace meta_kernels
