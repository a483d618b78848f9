// torch.optim.Adam's update for a whole list of tensors: u = s[t] * g, m' = b1 m + (1 - b1) u,
// v' = b2 v + (1 - b2) u^2, phi = theta - lr * rates * (m' / c1) / (sqrt(v' / c2) + eps); one
// launch per table of 32 tensors (stateful.cuh), 256 threads per block, one 4096-element chunk per block.
#include <cmath>

#include "stateful.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

struct AdamHyper {
  double beta1, beta2, eps, c1, c2;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
adam_step_kernel(const StatefulTable<8> tab, const int64_t chunks, const StatefulScalars sc, const AdamHyper h) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t b1 = static_cast<opmath_t>(h.beta1), b2 = static_cast<opmath_t>(h.beta2);
  const opmath_t c1 = static_cast<opmath_t>(h.c1), c2 = static_cast<opmath_t>(h.c2), eps = static_cast<opmath_t>(h.eps);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    int j;
    int64_t begin, end;
    chunk_range(tab, c, j, begin, end);
    const scalar_t* p = static_cast<const scalar_t*>(tab.ptr[0][j]);
    const scalar_t* g = static_cast<const scalar_t*>(tab.ptr[1][j]);
    const scalar_t* m = static_cast<const scalar_t*>(tab.ptr[2][j]);
    const scalar_t* v = static_cast<const scalar_t*>(tab.ptr[3][j]);
    scalar_t* p_out = static_cast<scalar_t*>(tab.ptr[4][j]);
    scalar_t* m_out = static_cast<scalar_t*>(tab.ptr[5][j]);
    scalar_t* v_out = static_cast<scalar_t*>(tab.ptr[6][j]);
    const scalar_t* rates = static_cast<const scalar_t*>(tab.ptr[7][j]);
    const double lr = sc.lrs.load(tab.index[j]);
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      opmath_t s, rate;
      element_coefs(sc, lr, rates, e, tab.aux[j], s, rate);
      const opmath_t u = s * static_cast<opmath_t>(g[e]);
      const opmath_t m1 = b1 * static_cast<opmath_t>(m[e]) + (1 - b1) * u;
      const opmath_t v1 = b2 * static_cast<opmath_t>(v[e]) + (1 - b2) * u * u;
      const opmath_t direction = (m1 / c1) / (dev_sqrt(v1 / c2) + eps);
      p_out[e] = static_cast<scalar_t>(static_cast<opmath_t>(p[e]) - rate * direction);
      m_out[e] = static_cast<scalar_t>(m1);
      v_out[e] = static_cast<scalar_t>(v1);
    }
  }
}

void adam_launch(const StatefulLists& l, const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, double beta1,
                 double beta2, double eps, int64_t step) {
  const c10::cuda::CUDAGuard guard(l.p[0].device());
  const StatefulSources src = stateful_sources(lrs, scale, l);
  const AdamHyper h{beta1, beta2, eps, 1 - std::pow(beta1, static_cast<double>(step)),
                    1 - std::pow(beta2, static_cast<double>(step))};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(l.p[0].scalar_type(), "adam_step_cuda", [&] {
    for_each_table<8>(l, [&](const StatefulTable<8>& tab, int64_t chunks) {
      adam_step_kernel<scalar_t><<<grid_for(chunks), kThreads, 0, stream>>>(tab, chunks, src.scalars, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> adam_step(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates, double beta1,
    double beta2, double eps, int64_t step) {
  MK_INVARIANT(step >= 1, "adam_step");
  const StatefulLists l = stateful_lists(params, grads, {exp_avgs, exp_avg_sqs}, lrs, scale, rates, false, "adam_step");
  adam_launch(l, lrs, scale, beta1, beta2, eps, step);
  return {l.p_out, l.state_out[0], l.state_out[1]};
}

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates,
                double beta1, double beta2, double eps, int64_t step) {
  MK_INVARIANT(step >= 1, "adam_step_");
  const StatefulLists l = stateful_lists(params, grads, {exp_avgs, exp_avg_sqs}, lrs, scale, rates, true, "adam_step");
  adam_launch(l, lrs, scale, beta1, beta2, eps, step);
  finish_stateful_in_place(params, {exp_avgs, exp_avg_sqs}, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) {
  m.impl("adam_step", &adam_step);
  m.impl("adam_step_", &adam_step_);
}

}  // namespace cuda
}  // namespace meta_kernels
