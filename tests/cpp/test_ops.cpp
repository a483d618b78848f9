// C++ check of the meta_kernels op library (CMake build, CTest): every op is looked up in the
// dispatcher by its schema name, called through a typed handle on CPU tensors, and compared with
// a plain ATen expression of what it computes. Exit code 0 when every check passes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << std::endl;
  if (!ok) ++g_failures;
}

bool close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol) {
  if (got.sizes() != want.sizes()) return false;
  return at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol, /*equal_nan=*/true);
}

// Tolerances by dtype: float64 is exact up to rounding, float32 up to accumulation order.
double rtol_for(at::ScalarType t) { return t == at::kDouble ? 1e-12 : 1e-5; }
double atol_for(at::ScalarType t) { return t == at::kDouble ? 1e-12 : 1e-5; }

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TensorList = at::TensorList;
using OptTensor = std::optional<at::Tensor>;

// [T] -> [T, 1, ..., 1] against a [T, ...] tensor.
at::Tensor task_view(const at::Tensor& v, const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = v.size(0);
  return v.reshape(shape);
}

void test_sgd_step(at::ScalarType dtype) {
  const std::string tag = std::string(" [") + c10::toString(dtype) + "]";
  auto sgd = op<std::vector<at::Tensor>(TensorList, TensorList, const at::Tensor&, const OptTensor&)>("meta_kernels::sgd_step");
  auto sgd_ = op<void(TensorList, TensorList, const at::Tensor&, const OptTensor&)>("meta_kernels::sgd_step_");
  const auto o = at::TensorOptions().dtype(dtype);
  const int64_t T = 3;
  // Mixed sizes, one of them larger than a CPU chunk and not a multiple of any block size.
  std::vector<at::Tensor> p = {at::randn({T, 5, 7}, o), at::randn({T, 4}, o), at::randn({T, 20011}, o)};
  std::vector<at::Tensor> g = {at::randn({T, 5, 7}, o), at::randn({T, 4}, o), at::randn({T, 20011}, o)};
  const at::Tensor lrs = at::tensor({0.1, 0.02, 0.5}, o);
  const at::Tensor scale = at::tensor({1.0, 0.5, 0.25}, o);

  auto out = sgd.call(p, g, lrs, std::nullopt);
  bool ok = out.size() == p.size();
  for (size_t i = 0; ok && i < p.size(); ++i) ok = close(out[i], p[i] - lrs[i] * g[i], rtol_for(dtype), atol_for(dtype));
  check(ok, "sgd_step without scale" + tag);

  out = sgd.call(p, g, lrs, scale);
  ok = out.size() == p.size();
  for (size_t i = 0; ok && i < p.size(); ++i)
    ok = close(out[i], p[i] - lrs[i] * task_view(scale, p[i]) * g[i], rtol_for(dtype), atol_for(dtype));
  check(ok, "sgd_step with per-task scale" + tag);

  // In place, one of the params non-contiguous (updated through a buffer and copied back).
  std::vector<at::Tensor> q = {p[0].clone(), p[1].clone().t().contiguous().t(), p[2].clone()};
  sgd_.call(q, g, lrs, scale);
  ok = true;
  for (size_t i = 0; ok && i < p.size(); ++i) ok = close(q[i], out[i], 0.0, 0.0);
  check(ok && !q[1].is_contiguous(), "sgd_step_ in place equals sgd_step" + tag);
}

void test_clip_grad_norm(at::ScalarType dtype) {
  const std::string tag = std::string(" [") + c10::toString(dtype) + "]";
  auto clip = op<std::tuple<at::Tensor, at::Tensor>(TensorList, double, double)>("meta_kernels::clip_grad_norm");
  const auto o = at::TensorOptions().dtype(dtype);
  const int64_t T = 4;
  std::vector<at::Tensor> g = {at::randn({T, 3, 3}, o), at::randn({T, 17}, o) * 3, at::randn({T, 40000}, o) * 0.01};
  const double max_norm = 5.0, eps = 1e-6;
  auto [norm, factor] = clip.call(g, max_norm, eps);
  at::Tensor sumsq = at::zeros({T}, o.dtype(at::kDouble));
  for (const auto& t : g) sumsq = sumsq + t.to(at::kDouble).reshape({T, -1}).pow(2).sum(1);
  const at::Tensor want_norm = sumsq.sqrt();
  const at::Tensor want_factor = at::clamp_max(max_norm / (want_norm + eps), 1.0);
  check(norm.scalar_type() == dtype && factor.scalar_type() == dtype, "clip_grad_norm output dtype" + tag);
  check(close(norm, want_norm, rtol_for(dtype), atol_for(dtype)), "clip_grad_norm norm" + tag);
  check(close(factor, want_factor, rtol_for(dtype), atol_for(dtype)), "clip_grad_norm factor" + tag);
  check(factor.min().item<double>() < 1.0 && factor.max().item<double>() <= 1.0, "clip_grad_norm clips some tasks" + tag);

  // A non-finite grad gives a non-finite norm and a NaN factor for that task only.
  g[1][2][5] = std::numeric_limits<double>::infinity();
  std::tie(norm, factor) = clip.call(g, max_norm, eps);
  check(std::isinf(norm[2].item<double>()) && std::isnan(factor[2].item<double>()) &&
            std::isfinite(factor[0].item<double>()),
        "clip_grad_norm non-finite grad -> NaN factor" + tag);
}

void test_batch_norm(at::ScalarType dtype) {
  const std::string tag = std::string(" [") + c10::toString(dtype) + "]";
  auto bn = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             double)>("meta_kernels::batch_norm");
  auto bn_bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const c10::optional<at::Tensor>&,
                                                                 const c10::optional<at::Tensor>&)>(
      "meta_kernels::batch_norm_backward");
  const auto o = at::TensorOptions().dtype(dtype);
  const int64_t T = 2, N = 4, C = 3;
  const double eps = 1e-5;
  const at::Tensor x = at::randn({T, N, C, 5, 5}, o) * 2 + 1;
  const at::Tensor w = at::randn({T, C}, o);
  const at::Tensor b = at::randn({T, C}, o);
  auto [out, mean, rstd] = bn.call(x, w, b, eps);

  const std::vector<int64_t> dims = {1, 3, 4};
  const std::vector<int64_t> stat_shape = {T, 1, C, 1, 1};
  const at::Tensor want_mean = x.mean(dims);
  const at::Tensor xc = x - want_mean.reshape(stat_shape);
  const at::Tensor want_rstd = at::rsqrt(xc.pow(2).mean(dims) + eps);
  const at::Tensor xhat = xc * want_rstd.reshape(stat_shape);
  const at::Tensor want_out = xhat * w.reshape(stat_shape) + b.reshape(stat_shape);
  check(close(mean, want_mean, rtol_for(dtype), atol_for(dtype)), "batch_norm mean" + tag);
  check(close(rstd, want_rstd, rtol_for(dtype), atol_for(dtype)), "batch_norm rstd" + tag);
  check(close(out, want_out, rtol_for(dtype), atol_for(dtype)), "batch_norm out" + tag);

  const at::Tensor go = at::randn_like(x);
  auto [gx, gw, gb] = bn_bwd.call(go, x, w, mean, rstd, c10::nullopt, c10::nullopt);
  const double M = static_cast<double>(N * 5 * 5);
  const at::Tensor want_gb = go.sum(dims);
  const at::Tensor want_gw = (go * xhat).sum(dims);
  const at::Tensor want_gx = (w * want_rstd).reshape(stat_shape) *
                             (go - (want_gb / M).reshape(stat_shape) - xhat * (want_gw / M).reshape(stat_shape));
  check(close(gb, want_gb, rtol_for(dtype), 10 * atol_for(dtype)), "batch_norm_backward grad_bias" + tag);
  check(close(gw, want_gw, rtol_for(dtype), 10 * atol_for(dtype)), "batch_norm_backward grad_weight" + tag);
  check(close(gx, want_gx, rtol_for(dtype), 10 * atol_for(dtype)), "batch_norm_backward grad_x" + tag);
  // Gradients for the statistics outputs join grad_x: d mean/dx = 1/M, d rstd/dx = -rstd^3 (x - mean) / M.
  const at::Tensor g_mean = at::randn({T, C}, o), g_rstd = at::randn({T, C}, o);
  auto [sx, sw, sb] = bn_bwd.call(go, x, w, mean, rstd, g_mean, g_rstd);
  const at::Tensor want_sx = want_gx + (g_mean / M).reshape(stat_shape) -
                             (g_rstd * want_rstd.pow(3) / M).reshape(stat_shape) * xc;
  check(close(sx, want_sx, rtol_for(dtype), 10 * atol_for(dtype)) && close(sw, want_gw, rtol_for(dtype), 10 * atol_for(dtype)),
        "batch_norm_backward with grad_mean / grad_rstd" + tag);
}

void test_reptile_update(at::ScalarType dtype) {
  const std::string tag = std::string(" [") + c10::toString(dtype) + "]";
  auto reptile = op<void(TensorList, TensorList, double)>("meta_kernels::reptile_update_");
  const auto o = at::TensorOptions().dtype(dtype);
  const int64_t T = 5;
  const double epsilon = 0.3;
  std::vector<at::Tensor> theta = {at::randn({6, 3}, o), at::randn({7}, o), at::randn({3001}, o)};
  std::vector<at::Tensor> phi;
  std::vector<at::Tensor> want;
  for (const auto& t : theta) {
    std::vector<int64_t> shape = {T};
    shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
    phi.push_back(at::randn(shape, o));
    want.push_back(t + epsilon * (phi.back().mean(0) - t));
  }
  reptile.call(theta, phi, epsilon);
  bool ok = true;
  for (size_t i = 0; ok && i < theta.size(); ++i) ok = close(theta[i], want[i], rtol_for(dtype), atol_for(dtype));
  check(ok, "reptile_update_" + tag);
}

void test_bad_input() {
  auto sgd = op<std::vector<at::Tensor>(TensorList, TensorList, const at::Tensor&, const OptTensor&)>("meta_kernels::sgd_step");
  std::vector<at::Tensor> p = {at::randn({2, 3}), at::randn({2})};
  std::vector<at::Tensor> g = {at::randn({2, 3})};
  bool threw = false;
  try {
    sgd.call(p, g, at::tensor({0.1, 0.1}), std::nullopt);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("meta_kernels::sgd_step: invalid arguments (grads.size() == params.size()") !=
            std::string::npos;
  }
  check(threw, "sgd_step rejects a grads list of the wrong length with a ValueError naming the invariant");
}

}  // namespace

int main() {
  at::manual_seed(0);
  try {
    for (const auto dtype : {at::kDouble, at::kFloat}) {
      test_sgd_step(dtype);
      test_clip_grad_norm(dtype);
      test_batch_norm(dtype);
      test_reptile_update(dtype);
    }
    test_bad_input();
  } catch (const std::exception& e) {
    std::cerr << "FAIL: unexpected exception: " << e.what() << std::endl;
    return 1;
  }
  if (g_failures) {
    std::cerr << g_failures << " check(s) failed" << std::endl;
    return 1;
  }
  std::cout << "all meta_kernels op checks passed" << std::endl;
  return 0;
}
