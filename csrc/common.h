// Shared by the CPU and CUDA kernels: the dispatch macro, the sgd_step wrappers, and the invariants
// the kernels rely on for memory safety. The argument checks users see -- one per rule, with
// messages that say what was wrong and what to do -- run in Python before dispatch
// (meta_kernels/ops/<op>.py); the checks here only stop a direct torch.ops call with bad
// arguments from reading or writing out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <initializer_list>
#include <vector>

namespace meta_kernels {

// Half and BFloat16 are storage types here: kernels compute in float (at::opmath_type).
#define MK_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline at::ScalarType math_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// A ValueError naming the op and the broken invariant.
#define MK_INVARIANT(cond, op)                                                                             \
  TORCH_CHECK_VALUE(cond, "meta_kernels::", op, ": invalid arguments (", #cond,                          \
                    " does not hold); the meta_kernels Python front-ends check every argument and say what to fix")

inline bool floating(const at::Tensor& t) { return at::isFloatingType(t.scalar_type()); }

inline bool same_meta(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device();
}

// A non-empty list of floating tensors of one dtype and device.
inline void check_uniform_list(at::TensorList list, const char* op) {
  MK_INVARIANT(!list.empty(), op);
  for (const auto& t : list)
    MK_INVARIANT(floating(t) && t.scalar_type() == list[0].scalar_type() && t.device() == list[0].device(), op);
}

// T: the leading (task) dim every tensor of `list` shares.
inline int64_t leading_tasks(at::TensorList list, const char* op) {
  for (const auto& t : list) MK_INVARIANT(t.dim() >= 1 && t.size(0) == list[0].size(0), op);
  return list[0].size(0);
}

inline void check_sgd_args(at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
                           const c10::optional<at::Tensor>& scale, const char* op = "sgd_step") {
  check_uniform_list(params, op);
  MK_INVARIANT(grads.size() == params.size(), op);
  for (size_t i = 0; i < params.size(); ++i) MK_INVARIANT(same_meta(grads[i], params[i]), op);
  MK_INVARIANT(lrs.dim() == 1 && static_cast<size_t>(lrs.numel()) == params.size(), op);
  MK_INVARIANT(floating(lrs) && lrs.device() == params[0].device(), op);
  if (scale.has_value()) {
    MK_INVARIANT(scale->dim() == 1 && floating(*scale) && scale->device() == params[0].device(), op);
    MK_INVARIANT(scale->numel() == leading_tasks(params, op), op);
  }
}

// x [T, N, C, *] with weight (and bias, mean, rstd) [T, C] on x's device.
inline void check_batch_norm_stats(const at::Tensor& x, std::initializer_list<const at::Tensor*> per_channel,
                                   const char* op) {
  MK_INVARIANT(x.dim() >= 3 && floating(x), op);
  for (const at::Tensor* t : per_channel)
    MK_INVARIANT(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2) && t->device() == x.device(), op);
}

inline void check_batch_norm_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_batch_norm_stats(x, {&weight, &bias}, "batch_norm");
}

inline void check_batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& mean, const at::Tensor& rstd,
                                           const c10::optional<at::Tensor>& grad_mean = c10::nullopt,
                                           const c10::optional<at::Tensor>& grad_rstd = c10::nullopt) {
  check_batch_norm_stats(x, {&weight, &mean, &rstd}, "batch_norm_backward");
  MK_INVARIANT(grad_out.sizes() == x.sizes() && grad_out.device() == x.device(), "batch_norm_backward");
  for (const auto* t : {&grad_mean, &grad_rstd})
    if (t->has_value()) check_batch_norm_stats(x, {&t->value()}, "batch_norm_backward");
}

inline void check_batch_norm_double_backward_args(const at::Tensor& gg_x, const at::Tensor& gg_w, const at::Tensor& gg_b,
                                                  const at::Tensor& grad_out, const at::Tensor& x,
                                                  const at::Tensor& weight, const at::Tensor& mean,
                                                  const at::Tensor& rstd) {
  const char* op = "batch_norm_double_backward";
  check_batch_norm_stats(x, {&weight, &mean, &rstd, &gg_w, &gg_b}, op);
  for (const at::Tensor* t : {&grad_out, &gg_x})
    MK_INVARIANT(t->sizes() == x.sizes() && t->device() == x.device() && floating(*t), op);
}

// sgd_step and sgd_step_ around a device's kernel(params, grads, outs, lrs, scale), which writes
// p - lr * s[t] * g into outs (outs may alias contiguous params).
template <typename Kernel>
std::vector<at::Tensor> sgd_step_out_of_place(Kernel&& kernel, at::TensorList params, at::TensorList grads,
                                              const at::Tensor& lrs, const c10::optional<at::Tensor>& scale) {
  check_sgd_args(params, grads, lrs, scale);
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const auto& t : params) outs.push_back(at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)));
  kernel(params, grads, outs, lrs, scale);
  return outs;
}

template <typename Kernel>
void sgd_step_in_place(Kernel&& kernel, at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
                       const c10::optional<at::Tensor>& scale) {
  check_sgd_args(params, grads, lrs, scale);
  // Non-contiguous params are updated through a contiguous buffer and copied back.
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const auto& t : params) outs.push_back(t.is_contiguous() ? t : at::empty(t.sizes(), t.options()));
  kernel(params, grads, outs, lrs, scale);
  for (size_t i = 0; i < params.size(); ++i)
    if (!params[i].is_contiguous()) const_cast<at::Tensor&>(params[i]).copy_(outs[i]);
}

// ---- the inner optimizers with state (momentum_step, adam_step) ------------------------------

// Returns whether the per-element rates carry the leading dim (all of them or none: the kernels
// index them by element, or by element within a task).
inline bool check_stateful_args(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states,
                                const at::Tensor& lrs, const c10::optional<at::Tensor>& scale,
                                const c10::optional<at::TensorList>& rates, const char* op) {
  check_sgd_args(params, grads, lrs, scale, op);
  for (const auto& state : states) {
    MK_INVARIANT(state.size() == params.size(), op);
    for (size_t i = 0; i < params.size(); ++i) MK_INVARIANT(same_meta(state[i], params[i]), op);
  }
  if (!rates.has_value()) return false;
  const at::TensorList r = *rates;
  MK_INVARIANT(r.size() == params.size(), op);
  const bool full = r[0].sizes() == params[0].sizes();
  for (size_t i = 0; i < params.size(); ++i) {
    MK_INVARIANT(r[i].scalar_type() == params[i].scalar_type() && r[i].device() == params[i].device(), op);
    MK_INVARIANT(full ? r[i].sizes() == params[i].sizes()
                      : (params[i].dim() >= 1 && r[i].sizes() == params[i].sizes().slice(1)), op);
  }
  return full;
}

// Elements per task of params[i] where the kernel needs the task (a per-task scale, or rates
// without the leading dim); otherwise the whole tensor is one segment.
inline int64_t task_inner(const at::Tensor& p, bool by_task) {
  return (by_task && p.dim() >= 1 && p.size(0) > 0) ? p.numel() / p.size(0) : std::max<int64_t>(p.numel(), 1);
}

inline std::vector<at::Tensor> contiguous_list(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

// The tensors a kernel writes: new contiguous ones (out of place), or the targets themselves
// where contiguous and buffers elsewhere (in place; finish_in_place copies those back).
inline std::vector<at::Tensor> output_list(at::TensorList list, bool in_place) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list)
    out.push_back(in_place && t.is_contiguous() ? t
                                                : at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)));
  return out;
}

inline void finish_in_place(at::TensorList targets, const std::vector<at::Tensor>& outs) {
  for (size_t i = 0; i < targets.size(); ++i)
    if (!outs[i].is_same(targets[i])) const_cast<at::Tensor&>(targets[i]).copy_(outs[i]);
}

// What a device's momentum / adam kernel is given: contiguous inputs, the outputs it writes (which
// may alias the inputs: in place), per tensor the elements per task, and whether the per-element
// rates carry the task dim.
struct StatefulLists {
  std::vector<at::Tensor> p, g, p_out, rates;  // rates: empty when not given
  std::vector<std::vector<at::Tensor>> state, state_out;  // momentum: the buffers; adam: m and v
  std::vector<int64_t> inner;
  bool rates_full = false;
};

// Checks the arguments (the kernels' memory-safety invariants) and gathers what the kernel is given.
inline StatefulLists stateful_lists(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states,
                                    const at::Tensor& lrs, const c10::optional<at::Tensor>& scale,
                                    const c10::optional<at::TensorList>& rates, bool in_place, const char* op) {
  StatefulLists l;
  l.rates_full = check_stateful_args(params, grads, states, lrs, scale, rates, op);
  l.p = contiguous_list(params);
  l.g = contiguous_list(grads);
  l.p_out = output_list(params, in_place);
  for (const auto& state : states) {
    l.state.push_back(contiguous_list(state));
    l.state_out.push_back(output_list(state, in_place));
  }
  if (rates.has_value()) l.rates = contiguous_list(*rates);
  const bool by_task = scale.has_value() || (rates.has_value() && !l.rates_full);
  for (const auto& t : params) l.inner.push_back(task_inner(t, by_task));
  return l;
}

// After an in-place kernel: copies back into the params and states it could not write directly.
inline void finish_stateful_in_place(at::TensorList params, std::initializer_list<at::TensorList> states,
                                     const StatefulLists& l) {
  finish_in_place(params, l.p_out);
  size_t k = 0;
  for (const auto& state : states) finish_in_place(state, l.state_out[k++]);
}

// Returns T, the number of tasks in adapted's leading dim.
inline int64_t check_reptile_args(at::TensorList params, at::TensorList adapted) {
  check_uniform_list(params, "reptile_update_");
  MK_INVARIANT(adapted.size() == params.size(), "reptile_update_");
  const int64_t T = leading_tasks(adapted, "reptile_update_");
  MK_INVARIANT(T >= 1, "reptile_update_");
  for (size_t i = 0; i < params.size(); ++i)
    MK_INVARIANT(adapted[i].sizes().slice(1) == params[i].sizes() && adapted[i].scalar_type() == params[i].scalar_type() &&
                     adapted[i].device() == params[i].device(),
                 "reptile_update_");
  return T;
}

// `sizes` with its last two entries replaced (the pooled or the unpooled shape of max_pool2x2_relu).
inline std::vector<int64_t> with_last_two(at::IntArrayRef sizes, int64_t a, int64_t b) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape[shape.size() - 2] = a;
  shape.back() = b;
  return shape;
}

inline void check_max_pool2x2_relu_args(const at::Tensor& x) {
  MK_INVARIANT(x.dim() >= 2 && floating(x) && x.size(-2) >= 2 && x.size(-1) >= 2, "max_pool2x2_relu");
}

inline void check_max_pool2x2_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& index, int64_t height,
                                                 int64_t width) {
  MK_INVARIANT(grad_out.dim() >= 2 && floating(grad_out), "max_pool2x2_relu_backward");
  MK_INVARIANT(index.scalar_type() == at::kChar && index.sizes() == grad_out.sizes() &&
                   index.device() == grad_out.device(), "max_pool2x2_relu_backward");
  MK_INVARIANT(height / 2 == grad_out.size(-2) && width / 2 == grad_out.size(-1), "max_pool2x2_relu_backward");
}

inline void check_max_pool2x2_relu_gather_args(const at::Tensor& grad_x, const at::Tensor& index) {
  MK_INVARIANT(grad_x.dim() >= 2 && floating(grad_x), "max_pool2x2_relu_gather");
  MK_INVARIANT(index.scalar_type() == at::kChar && index.device() == grad_x.device() &&
                   index.sizes() == at::IntArrayRef(with_last_two(grad_x.sizes(), grad_x.size(-2) / 2,
                                                                  grad_x.size(-1) / 2)),
               "max_pool2x2_relu_gather");
}

// conv3x3_bn_pool_relu is for input layers: at most this many input channels per group.
constexpr int64_t kConvBnPoolMaxInChannels = 4;

// x [N, groups * C_in, H, W] of conv3x3_bn_pool_relu and its patch ops.
inline void check_patch_input_args(const at::Tensor& x, int64_t groups) {
  MK_INVARIANT(x.dim() == 4 && floating(x) && groups >= 1 && x.size(1) % groups == 0, "conv3x3_bn_pool_relu");
  const int64_t cin = x.size(1) / groups;
  MK_INVARIANT(cin >= 1 && cin <= kConvBnPoolMaxInChannels, "conv3x3_bn_pool_relu");
  MK_INVARIANT(x.size(0) >= 1 && x.size(2) >= 2 && x.size(3) >= 2, "conv3x3_bn_pool_relu");
}

// weight [groups * C_out, C_in, 3, 3], bias / gamma / beta [groups * C_out].
inline void check_conv3x3_bn_pool_relu_args(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
                                            const at::Tensor& beta, int64_t groups) {
  check_patch_input_args(x, groups);
  MK_INVARIANT(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.size(1) * groups == x.size(1) &&
                   weight.size(0) % groups == 0 && weight.scalar_type() == x.scalar_type() &&
                   weight.device() == x.device(),
               "conv3x3_bn_pool_relu");
  for (const at::Tensor* t : {&gamma, &beta, bias.has_value() ? &*bias : &gamma})
    MK_INVARIANT(t->dim() == 1 && t->size(0) == weight.size(0) && floating(*t) && t->device() == x.device(),
                 "conv3x3_bn_pool_relu");
}

// A pooled [N, C_out, H / 2, W / 2] tensor with its index, x and pbar [groups, 9 * C_in].
inline void check_patch_pooled_args(const at::Tensor& pooled, const at::Tensor& index, const at::Tensor& x,
                                    const at::Tensor& pbar, int64_t groups) {
  check_patch_input_args(x, groups);
  MK_INVARIANT(pooled.dim() == 4 && pooled.size(0) == x.size(0) && pooled.size(1) % groups == 0 &&
                   pooled.size(2) == x.size(2) / 2 && pooled.size(3) == x.size(3) / 2,
               "conv3x3_bn_pool_relu patch op");
  MK_INVARIANT(index.scalar_type() == at::kChar && index.sizes() == pooled.sizes(), "conv3x3_bn_pool_relu patch op");
  MK_INVARIANT(pbar.dim() == 2 && pbar.size(0) == groups && pbar.size(1) == 9 * (x.size(1) / groups),
               "conv3x3_bn_pool_relu patch op");
  MK_INVARIANT(pooled.device() == x.device() && index.device() == x.device() && pbar.device() == x.device(),
               "conv3x3_bn_pool_relu patch op");
}
}  // namespace meta_kernels
