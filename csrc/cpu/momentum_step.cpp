// b_i' = mu * b_i + s[t] * g_i, phi_i = theta_i - lrs[i] * rates_i * b_i' for a whole list of
// tensors in one parallel pass (torch.optim.SGD's momentum, no dampening).
#include "../common.h"
#include "multi_tensor.h"
#include "stateful.h"

namespace meta_kernels {
namespace cpu {
namespace {

void momentum_kernel(const StatefulLists& l, const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, double momentum) {
  MK_DISPATCH_FLOATING(l.p[0].scalar_type(), "momentum_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t mu = static_cast<opmath_t>(momentum);
    for_each_segment<scalar_t>(l, lrs, scale, [&](const Segment<scalar_t>& s) {
      const scalar_t* p = s.in(l.p);
      const scalar_t* g = s.in(l.g);
      const scalar_t* b = s.in(l.state[0]);
      scalar_t* p_out = s.out(l.p_out);
      scalar_t* b_out = s.out(l.state_out[0]);
      const scalar_t* r = s.rates(l);
      const opmath_t factor = static_cast<opmath_t>(s.scale), lr = static_cast<opmath_t>(s.lr);
      const auto update = [&](int64_t j, opmath_t rate) {
        const opmath_t buf = mu * static_cast<opmath_t>(b[j]) + factor * static_cast<opmath_t>(g[j]);
        p_out[j] = static_cast<scalar_t>(static_cast<opmath_t>(p[j]) - rate * buf);
        b_out[j] = static_cast<scalar_t>(buf);
      };
      for_each_element(s, r, lr, update);
    });
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> momentum_step(
    at::TensorList params, at::TensorList grads, at::TensorList bufs, const at::Tensor& lrs,
    const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates, double momentum) {
  const StatefulLists l = stateful_lists(params, grads, {bufs}, lrs, scale, rates, false, "momentum_step");
  momentum_kernel(l, lrs, scale, momentum);
  return {l.p_out, l.state_out[0]};
}

void momentum_step_(at::TensorList params, at::TensorList grads, at::TensorList bufs, const at::Tensor& lrs,
                    const c10::optional<at::Tensor>& scale, c10::optional<at::TensorList> rates, double momentum) {
  const StatefulLists l = stateful_lists(params, grads, {bufs}, lrs, scale, rates, true, "momentum_step");
  momentum_kernel(l, lrs, scale, momentum);
  finish_stateful_in_place(params, {bufs}, l);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("momentum_step", &momentum_step);
  m.impl("momentum_step_", &momentum_step_);
}

}  // namespace cpu
}  // namespace meta_kernels
