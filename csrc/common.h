// Shared by the CPU and CUDA kernels: argument checks that protect memory safety when an op
// is called straight through torch.ops (the Python front-end gives friendlier errors first).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace meta_kernels {

// Half and BFloat16 are storage types here: kernels compute in float (at::opmath_type).
#define MK_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// "torch.float32" rather than "Float": the same wording as the Python-side checks.
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(std::get<0>(c10::getDtypeNames(t))); }

inline at::ScalarType math_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Checks that every tensor of `list` matches `ref` in dtype, device and shape.
inline void check_same_as(at::TensorList list, at::TensorList ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(list.size() == ref.size(), name, " has ", list.size(), " tensors but ", ref_name, " has ",
              ref.size(), "; pass one per tensor");
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].sizes() == ref[i].sizes(), name, "[", i, "] has shape ", list[i].sizes(),
                " but ", ref_name, "[", i, "] has shape ", ref[i].sizes());
    TORCH_CHECK_VALUE(list[i].scalar_type() == ref[i].scalar_type(), name, "[", i, "] is ",
                dtype_name(list[i].scalar_type()), " but ", ref_name, "[", i, "] is ", dtype_name(ref[i].scalar_type()));
    TORCH_CHECK_VALUE(list[i].device() == ref[i].device(), name, "[", i, "] is on ", list[i].device(),
                " but ", ref_name, "[", i, "] is on ", ref[i].device());
  }
}

inline void check_uniform_list(at::TensorList list, const char* name) {
  TORCH_CHECK_VALUE(!list.empty(), name, " is empty; pass at least one tensor");
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].scalar_type() == list[0].scalar_type(), name, "[", i, "] is ",
                dtype_name(list[i].scalar_type()), " but ", name, "[0] is ", dtype_name(list[0].scalar_type()),
                "; all tensors of one call share a dtype");
    TORCH_CHECK_VALUE(list[i].device() == list[0].device(), name, "[", i, "] is on ", list[i].device(),
                " but ", name, "[0] is on ", list[0].device());
    TORCH_CHECK_VALUE(at::isFloatingType(list[i].scalar_type()), name, "[", i, "] must be floating point, got ",
                dtype_name(list[i].scalar_type()));
  }
}

// Number of tasks shared by every tensor's leading dim (the per-task scale / norm length).
inline int64_t leading_tasks(at::TensorList list, const char* name) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK_VALUE(list[i].dim() >= 1, name, "[", i, "] is 0-dim but a leading task dim is required");
  const int64_t T = list[0].size(0);
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK_VALUE(list[i].size(0) == T, name, "[", i, "] has ", list[i].size(0), " tasks in dim 0 but ",
                name, "[0] has ", T);
  return T;
}

inline void check_lrs(const at::Tensor& lrs, size_t n, const at::Tensor& like) {
  TORCH_CHECK_VALUE(lrs.dim() == 1 && static_cast<size_t>(lrs.numel()) == n, "lrs must be a 1-D tensor with one rate per "
              "tensor (", n, "), got shape ", lrs.sizes());
  TORCH_CHECK_VALUE(lrs.device() == like.device(), "lrs is on ", lrs.device(), " but params are on ", like.device());
  TORCH_CHECK_VALUE(at::isFloatingType(lrs.scalar_type()), "lrs must be floating point, got ", dtype_name(lrs.scalar_type()));
}

inline void check_scale(const c10::optional<at::Tensor>& scale, at::TensorList params) {
  if (!scale.has_value()) return;
  TORCH_CHECK_VALUE(scale->dim() == 1, "scale must be 1-D with one factor per task, got shape ", scale->sizes());
  TORCH_CHECK_VALUE(scale->device() == params[0].device(), "scale is on ", scale->device(), " but params are on ",
              params[0].device());
  TORCH_CHECK_VALUE(at::isFloatingType(scale->scalar_type()), "scale must be floating point, got ", dtype_name(scale->scalar_type()));
  const int64_t T = leading_tasks(params, "params");
  TORCH_CHECK_VALUE(scale->numel() == T, "scale has ", scale->numel(), " entries but params have ", T,
              " tasks in dim 0");
}

inline void check_batch_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() >= 3, "x must be [T, N, C, *spatial], got shape ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", dtype_name(x.scalar_type()));
  const int64_t T = x.size(0), C = x.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == T && weight.size(1) == C, "weight must be [T, C] = [", T,
              ", ", C, "] for x of shape ", x.sizes(), ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
}

inline void check_sgd_args(at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
                           const c10::optional<at::Tensor>& scale) {
  check_uniform_list(params, "params");
  check_same_as(grads, params, "grads", "params");
  check_lrs(lrs, params.size(), params[0]);
  check_scale(scale, params);
}

inline void check_batch_norm_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_batch_norm_args(x, weight);
  TORCH_CHECK_VALUE(bias.sizes() == weight.sizes(), "bias must have the shape of weight ", weight.sizes(), ", got ",
                    bias.sizes());
  TORCH_CHECK_VALUE(bias.device() == x.device(), "bias is on ", bias.device(), " but x is on ", x.device());
}

inline void check_batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& mean, const at::Tensor& rstd) {
  check_batch_norm_args(x, weight);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(mean.sizes() == weight.sizes() && rstd.sizes() == weight.sizes(),
                    "mean and rstd must be [T, C] like weight");
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(mean.device() == x.device() && rstd.device() == x.device(), "mean and rstd are on ", mean.device(),
                    " and ", rstd.device(), " but x is on ", x.device());
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

// Returns T, the number of tasks in adapted's leading dim.
inline int64_t check_reptile_args(at::TensorList params, at::TensorList adapted) {
  check_uniform_list(params, "params");
  TORCH_CHECK_VALUE(adapted.size() == params.size(), "adapted has ", adapted.size(), " tensors but params has ",
                    params.size(), "; pass one per tensor");
  const int64_t T = leading_tasks(adapted, "adapted");
  TORCH_CHECK_VALUE(T >= 1, "adapted must hold at least one task in dim 0");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(adapted[i].sizes().slice(1) == params[i].sizes(), "adapted[", i, "] has shape ",
                      adapted[i].sizes(), " but must be [T, *params[", i, "].shape] = [T, ", params[i].sizes(), "]");
    TORCH_CHECK_VALUE(adapted[i].scalar_type() == params[i].scalar_type() && adapted[i].device() == params[i].device(),
                      "adapted[", i, "] must match params[", i, "] in dtype and device");
  }
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
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must be [..., H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.size(-2) >= 2 && x.size(-1) >= 2, "max_pool2x2_relu needs H >= 2 and W >= 2, got x of shape ",
                    x.sizes());
}

inline void check_max_pool2x2_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& index, int64_t height,
                                                 int64_t width) {
  TORCH_CHECK_VALUE(grad_out.dim() >= 2, "grad_out must be [..., H / 2, W / 2], got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad_out.scalar_type()), "grad_out must be floating point, got ",
                    dtype_name(grad_out.scalar_type()));
  TORCH_CHECK_VALUE(index.scalar_type() == at::kChar, "index must be torch.int8 (from max_pool2x2_relu), got ",
                    dtype_name(index.scalar_type()));
  TORCH_CHECK_VALUE(index.sizes() == grad_out.sizes(), "index has shape ", index.sizes(), " but grad_out has shape ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(index.device() == grad_out.device(), "index is on ", index.device(), " but grad_out is on ",
                    grad_out.device());
  TORCH_CHECK_VALUE(height / 2 == grad_out.size(-2) && width / 2 == grad_out.size(-1), "height ", height, " and width ",
                    width, " do not pool to grad_out's ", grad_out.size(-2), " x ", grad_out.size(-1));
}

inline void check_max_pool2x2_relu_gather_args(const at::Tensor& grad_x, const at::Tensor& index) {
  TORCH_CHECK_VALUE(grad_x.dim() >= 2 && at::isFloatingType(grad_x.scalar_type()),
                    "grad_x must be a floating [..., H, W] tensor, got ", dtype_name(grad_x.scalar_type()), " ",
                    grad_x.sizes());
  TORCH_CHECK_VALUE(index.scalar_type() == at::kChar, "index must be torch.int8 (from max_pool2x2_relu), got ",
                    dtype_name(index.scalar_type()));
  TORCH_CHECK_VALUE(index.device() == grad_x.device(), "index is on ", index.device(), " but grad_x is on ",
                    grad_x.device());
  TORCH_CHECK_VALUE(index.sizes() == at::IntArrayRef(with_last_two(grad_x.sizes(), grad_x.size(-2) / 2,
                                                                   grad_x.size(-1) / 2)),
                    "index has shape ", index.sizes(), " but grad_x of shape ", grad_x.sizes(), " pools to ",
                    at::IntArrayRef(with_last_two(grad_x.sizes(), grad_x.size(-2) / 2, grad_x.size(-1) / 2)));
}

// conv3x3_bn_pool_relu is for input layers: at most this many input channels per group.
constexpr int64_t kConvBnPoolMaxInChannels = 4;

// x [N, groups * C_in, H, W] of conv3x3_bn_pool_relu and its patch ops.
inline void check_patch_input_args(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4 && at::isFloatingType(x.scalar_type()),
                    "x must be a floating [N, groups * C_in, H, W] tensor, got ", dtype_name(x.scalar_type()), " ",
                    x.sizes());
  TORCH_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0, "x's ", x.size(1), " channels do not split into ", groups,
                    " groups");
  const int64_t cin = x.size(1) / groups;
  TORCH_CHECK_VALUE(cin >= 1 && cin <= kConvBnPoolMaxInChannels, "conv3x3_bn_pool_relu is for input layers with 1 to ",
                    kConvBnPoolMaxInChannels, " channels per group, got ", cin,
                    "; use conv2d + batch_norm + max_pool2x2_relu");
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(2) >= 2 && x.size(3) >= 2,
                    "conv3x3_bn_pool_relu needs N >= 1, H >= 2 and W >= 2, got x of shape ", x.sizes());
}

// weight [groups * C_out, C_in, 3, 3], bias / gamma / beta [groups * C_out].
inline void check_conv3x3_bn_pool_relu_args(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, const at::Tensor& gamma,
                                            const at::Tensor& beta, int64_t groups) {
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
                    "weight must be [groups * C_out, C_in, 3, 3], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight is ", dtype_name(weight.scalar_type()),
                    " but x is ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(groups >= 1, "groups must be >= 1, got ", groups);
  const int64_t cin = weight.size(1), out_channels = weight.size(0);
  TORCH_CHECK_VALUE(x.dim() != 4 || x.size(1) == groups * cin, "x has ", x.size(1), " channels but groups (", groups,
                    ") * weight's C_in (", cin, ") is ", groups * cin);
  TORCH_CHECK_VALUE(out_channels % groups == 0, "weight's ", out_channels, " output channels do not split into ", groups,
                    " groups");
  check_patch_input_args(x, groups);
  const std::pair<const at::Tensor*, const char*> per_channel[] = {{&gamma, "gamma"}, {&beta, "beta"},
                                                                   {bias.has_value() ? &*bias : &gamma, "bias"}};
  for (const auto& [t, name] : per_channel) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == out_channels, name, " must be [", out_channels,
                      "] (one per output channel), got shape ", t->sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), name, " must be floating point, got ",
                      dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
}

// A pooled [N, C_out, H / 2, W / 2] tensor (`name`) with its index, x and pbar [groups, 9 * C_in].
inline void check_patch_pooled_args(const at::Tensor& pooled, const char* name, const at::Tensor& index,
                                    const at::Tensor& x, const at::Tensor& pbar, int64_t groups) {
  check_patch_input_args(x, groups);
  TORCH_CHECK_VALUE(pooled.dim() == 4 && pooled.size(0) == x.size(0) && pooled.size(1) % groups == 0 &&
                        pooled.size(2) == x.size(2) / 2 && pooled.size(3) == x.size(3) / 2,
                    name, " must be [N, groups * C_out, H / 2, W / 2] for x of shape ", x.sizes(), ", got ",
                    pooled.sizes());
  TORCH_CHECK_VALUE(index.scalar_type() == at::kChar && index.sizes() == pooled.sizes(),
                    "index must be the int8 index output of conv3x3_bn_pool_relu, of shape ", pooled.sizes());
  TORCH_CHECK_VALUE(pbar.dim() == 2 && pbar.size(0) == groups && pbar.size(1) == 9 * (x.size(1) / groups),
                    "pbar must be [", groups, ", ", 9 * (x.size(1) / groups), "] (conv3x3_bn_pool_relu_moments), got ",
                    pbar.sizes());
  TORCH_CHECK_VALUE(pooled.device() == x.device() && index.device() == x.device() && pbar.device() == x.device(),
                    name, ", index and pbar must be on ", x.device());
}
}  // namespace meta_kernels
