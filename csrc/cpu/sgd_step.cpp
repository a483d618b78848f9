// phi_i = theta_i - lrs[i] * scale[t] * g_i for a whole list of tensors in one parallel pass.
#include "../common.h"
#include "multi_tensor.h"

namespace meta_kernels {
namespace cpu {
namespace {

// [T, 1, ..., 1]: a per-task factor broadcast over a [T, ...] tensor.
std::vector<int64_t> task_shape(const at::Tensor& t) {
  std::vector<int64_t> shape(std::max<int64_t>(t.dim(), 1), 1);
  shape[0] = t.dim() > 0 ? t.size(0) : 1;
  return shape;
}

// Writes p - lr * s[t] * g into out for every tensor; out may alias p (the in-place op).
void sgd_kernel(at::TensorList params, at::TensorList grads, std::vector<at::Tensor>& outs, const at::Tensor& lrs,
                const c10::optional<at::Tensor>& scale) {
  const int64_t n = static_cast<int64_t>(params.size());
  const at::Tensor lrs_d = lrs.detach().to(at::kDouble).contiguous();
  const at::Tensor scale_d = scale.has_value() ? scale->detach().to(at::kDouble).contiguous() : at::Tensor();
  const double* lr = lrs_d.data_ptr<double>();
  const double* s = scale_d.defined() ? scale_d.data_ptr<double>() : nullptr;

  std::vector<at::Tensor> p(n), g(n);
  std::vector<int64_t> numels(n), inner(n);
  for (int64_t i = 0; i < n; ++i) {
    const auto dtype = params[i].scalar_type();
    if ((!params[i].is_contiguous() || !grads[i].is_contiguous()) && (dtype == at::kFloat || dtype == at::kDouble)) {
      // A base expanded over the tasks, a bmm's strided weight gradient: one strided pass of aten
      // into out, instead of a contiguous copy of each (T copies of the weights) before the loop.
      // (Half types keep the copies: their rates must stay in float32 for the product.)
      const at::Tensor coef = s != nullptr ? scale_d.view(task_shape(params[i])) * -lr[i]
                                           : at::scalar_tensor(-lr[i], lrs_d.options());
      at::addcmul_out(outs[i], params[i], grads[i], coef.to(dtype));
      numels[i] = inner[i] = 0;  // no chunks in the fused loop
      continue;
    }
    p[i] = params[i].contiguous();
    g[i] = grads[i].contiguous();
    numels[i] = p[i].numel();
    // With a per-task scale the leading dim is the task dim; otherwise the tensor is one task.
    inner[i] = (s != nullptr && p[i].size(0) > 0) ? numels[i] / p[i].size(0) : std::max<int64_t>(numels[i], 1);
  }
  const auto chunks = make_chunks(numels);
  MK_DISPATCH_FLOATING(params[0].scalar_type(), "sgd_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    for_each_chunk(chunks, [&](const Chunk& c) {
      const scalar_t* pp = p[c.tensor].const_data_ptr<scalar_t>();
      const scalar_t* gp = g[c.tensor].const_data_ptr<scalar_t>();
      scalar_t* op = outs[c.tensor].data_ptr<scalar_t>();
      const int64_t in = inner[c.tensor];
      for (int64_t b = c.begin; b < c.end;) {
        const int64_t t = b / in;
        const int64_t e = std::min(c.end, (t + 1) * in);
        const opmath_t coef = static_cast<opmath_t>(lr[c.tensor] * (s ? s[t] : 1.0));
_Pragma("omp simd")
        for (int64_t j = b; j < e; ++j)
          op[j] = static_cast<scalar_t>(static_cast<opmath_t>(pp[j]) - coef * static_cast<opmath_t>(gp[j]));
        b = e;
      }
    });
  });
}

std::vector<at::Tensor> sgd_step(at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
                                 const c10::optional<at::Tensor>& scale) {
  return sgd_step_out_of_place(sgd_kernel, params, grads, lrs, scale);
}

void sgd_step_(at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
               const c10::optional<at::Tensor>& scale) {
  sgd_step_in_place(sgd_kernel, params, grads, lrs, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("sgd_step", &sgd_step);
  m.impl("sgd_step_", &sgd_step_);
}

}  // namespace cpu
}  // namespace meta_kernels
