// The one home of every meta_kernels schema; csrc/cpu and csrc/cuda only register kernels.
// Autograd and fake (meta) kernels are registered from Python (meta_kernels/ops/).
#include <torch/library.h>

TORCH_LIBRARY(meta_kernels, m) {
  // phi_i = theta_i - lrs[i] * scale[t] * g_i; params/grads optionally carry a leading task dim T.
  m.def("sgd_step(Tensor[] params, Tensor[] grads, Tensor lrs, Tensor? scale) -> Tensor[]");
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor lrs, Tensor? scale) -> ()");
  // The inner optimizers with state, as torch.optim.SGD(momentum) and torch.optim.Adam, with the
  // rates and scale of sgd_step and optional per-element rates (Meta-SGD: rates[i] of params[i]'s
  // shape, or that without the task dim, for all i alike). Out of place they return the new params
  // and state; the in-place forms update both.
  m.def("momentum_step(Tensor[] params, Tensor[] grads, Tensor[] bufs, Tensor lrs, Tensor? scale, Tensor[]? rates, "
        "float momentum) -> (Tensor[], Tensor[])");
  m.def("momentum_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor lrs, Tensor? scale, "
        "Tensor[]? rates, float momentum) -> ()");
  m.def("adam_step(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor lrs, Tensor? scale, "
        "Tensor[]? rates, float beta1, float beta2, float eps, int step) -> (Tensor[], Tensor[], Tensor[])");
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor lrs, Tensor? scale, Tensor[]? rates, float beta1, float beta2, float eps, int step) -> ()");
  // Per-task global L2 norm over a list of [T, ...] grads and the clip factor min(1, c / (norm + eps)).
  m.def("clip_grad_norm(Tensor[] grads, float max_norm, float eps) -> (Tensor norm, Tensor factor)");
  // Per-(task, channel) batch norm of x [T, N, C, *] with affine weight/bias [T, C].
  m.def("batch_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  // Its backward; grad_mean / grad_rstd (gradients for the forward's mean and rstd outputs, e.g. from
  // a double backward) add their path through the statistics to grad_x in the same pass.
  m.def("batch_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
        "Tensor? grad_mean=None, Tensor? grad_rstd=None) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The gradients of <gg_x, grad_x> + <gg_w, grad_weight> + <gg_b, grad_bias> (batch_norm_backward's
  // outputs) with respect to its five inputs: MAML's meta-gradient through an inner step's BN.
  m.def("batch_norm_double_backward(Tensor gg_x, Tensor gg_w, Tensor gg_b, Tensor grad_out, Tensor x, Tensor weight, "
        "Tensor mean, Tensor rstd) -> (Tensor d_grad_out, Tensor d_x, Tensor d_weight, Tensor d_mean, Tensor d_rstd)");
  // relu(max_pool2d(x, 2)) over the last two dims of x [..., H, W] (an odd last row / column is
  // dropped, as in max_pool2d), with each output's position (0-3) in its 2x2 window, or -1 where the
  // ReLU zeroes it: the backward routes grad_out to those positions.
  m.def("max_pool2x2_relu(Tensor x) -> (Tensor out, Tensor index)");
  m.def("max_pool2x2_relu_backward(Tensor grad_out, Tensor index, int height, int width) -> Tensor");
  // The adjoint of max_pool2x2_relu_backward (MAML's double backward): each window's entry of
  // grad_x [..., H, W] at the recorded position, 0 where index is -1; the result has index's shape.
  m.def("max_pool2x2_relu_gather(Tensor grad_x, Tensor index) -> Tensor");
  // Conv4's input block in one op: h = conv2d(x, weight, bias, padding=1, groups), batch norm of h
  // with its batch statistics over (N, H, W) per channel, then relu(max_pool2d(., 2)) -- for layers of
  // 1 to 4 input channels per group, without the dense h. Returns the pooled output, the pooling
  // index (as max_pool2x2_relu's) and h's per-channel mean and rstd.
  m.def("conv3x3_bn_pool_relu(Tensor x, Tensor weight, Tensor? bias, Tensor gamma, Tensor beta, int groups, "
        "float eps) -> (Tensor out, Tensor index, Tensor mean, Tensor rstd)");
  // Its backward's pieces (float64 results). moments: per group the mean 3x3 patch pbar [G, K] and
  // the centred Gram matrix [G, K, K] of x's patches (K = 9 * C_in). patch_sums: per output channel
  // sum(g * (patch - pbar)) [C_out, K] and sum(g) [C_out] over the windows' maxima kept by index.
  // patch_gather, its adjoint: u[o] . (patch - pbar) + c[o] at each kept maximum, 0 elsewhere.
  m.def("conv3x3_bn_pool_relu_moments(Tensor x, int groups) -> (Tensor pbar, Tensor gram)");
  m.def("conv3x3_bn_pool_relu_patch_sums(Tensor grad_out, Tensor index, Tensor x, Tensor pbar, int groups) -> "
        "(Tensor sum_pc, Tensor sum_g)");
  m.def("conv3x3_bn_pool_relu_patch_gather(Tensor u, Tensor c, Tensor index, Tensor x, Tensor pbar, int groups) -> "
        "Tensor");
  // theta_i += epsilon * (mean_t adapted_i[t] - theta_i), adapted_i of shape [T, *theta_i.shape].
  m.def("reptile_update_(Tensor(a!)[] params, Tensor[] adapted, float epsilon) -> ()");
}
