// torch.optim.Adam's update for a whole list of tensors in one parallel pass: u = s[t] * g,
// m' = b1 m + (1 - b1) u, v' = b2 v + (1 - b2) u^2, phi = theta - lr * rates * (m' / c1) / (sqrt(v' / c2) + eps).
#include <cmath>

#include "../common.h"
#include "multi_tensor.h"
#include "stateful.h"

namespace meta_kernels {
namespace cpu {
namespace {

void adam_kernel(const StatefulLists& l, const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, double beta1,
                 double beta2, double eps, int64_t step) {
  MK_DISPATCH_FLOATING(l.p[0].scalar_type(), "adam_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t b1 = static_cast<opmath_t>(beta1), b2 = static_cast<opmath_t>(beta2);
    const opmath_t c1 = static_cast<opmath_t>(1 - std::pow(beta1, static_cast<double>(step)));
    const opmath_t c2 = static_cast<opmath_t>(1 - std::pow(beta2, static_cast<double>(step)));
    const opmath_t e = static_cast<opmath_t>(eps);
    for_each_segment<scalar_t>(l, lrs, scale, [&](const Segment<scalar_t>& s) {
      const scalar_t* p = s.in(l.p);
      const scalar_t* g = s.in(l.g);
      const scalar_t* m = s.in(l.state[0]);
      const scalar_t* v = s.in(l.state[1]);
      scalar_t* p_out = s.out(l.p_out);
      scalar_t* m_out = s.out(l.state_out[0]);
      scalar_t* v_out = s.out(l.state_out[1]);
      const scalar_t* r = s.rates(l);
      const opmath_t factor = static_cast<opmath_t>(s.scale), lr = static_cast<opmath_t>(s.lr);
      const auto update = [&](int64_t j, opmath_t rate) {
        const opmath_t u = factor * static_cast<opmath_t>(g[j]);
        const opmath_t m1 = b1 * static_cast<opmath_t>(m[j]) + (1 - b1) * u;
        const opmath_t v1 = b2 * static_cast<opmath_t>(v[j]) + (1 - b2) * u * u;
        const opmath_t direction = (m1 / c1) / (std::sqrt(v1 / c2) + e);
        p_out[j] = static_cast<scalar_t>(static_cast<opmath_t>(p[j]) - rate * direction);
        m_out[j] = static_cast<scalar_t>(m1);
        v_out[j] = static_cast<scalar_t>(v1);
      };
      for_each_element(s, r, lr, update);
    });
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> adam_step(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates, double beta1,
    double beta2, double eps, int64_t step) {
  MK_INVARIANT(step >= 1, "adam_step");
  const StatefulLists l = stateful_lists(params, grads, {exp_avgs, exp_avg_sqs}, lrs, scale, rates, false, "adam_step");
  adam_kernel(l, lrs, scale, beta1, beta2, eps, step);
  return {l.p_out, l.state_out[0], l.state_out[1]};
}

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates,
                double beta1, double beta2, double eps, int64_t step) {
  MK_INVARIANT(step >= 1, "adam_step_");
  const StatefulLists l = stateful_lists(params, grads, {exp_avgs, exp_avg_sqs}, lrs, scale, rates, true, "adam_step");
  adam_kernel(l, lrs, scale, beta1, beta2, eps, step);
  finish_stateful_in_place(params, {exp_avgs, exp_avg_sqs}, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("adam_step", &adam_step);
  m.impl("adam_step_", &adam_step_);
}

}  // namespace cpu
}  // namespace meta_kernels
