// Runs the CUDA kernels of csrc/cuda under the CPU emulation of emu.h (sources rewritten by run.sh,
// with small chunk, table and grid sizes so that every path is taken on small inputs) and compares
// each op with the CPU kernel of csrc/cpu called through the dispatcher. Exit code 0 when all agree.
#include "emu.h"
// clang-format off
#include MK_EMU_SGD
#include MK_EMU_CLIP
#include MK_EMU_BN
#include MK_EMU_REPTILE
#include MK_EMU_POOL
#include MK_EMU_MOMENTUM
#include MK_EMU_ADAM
// clang-format on

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using TensorList = at::TensorList;
using OptTensor = std::optional<at::Tensor>;
namespace mkc = meta_kernels::cuda;

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::cout << "FAIL " << what << std::endl;
  }
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Exact for elementwise ops (same formula, same compiler); reductions agree up to summation order.
bool same(const at::Tensor& a, const at::Tensor& b, double rtol = 0.0, double atol = 0.0) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  return at::allclose(a.to(at::kDouble), b.to(at::kDouble), rtol, atol, /*equal_nan=*/true);
}

double red_tol(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 2e-5;
    default: return 2e-2;  // half / bfloat16 outputs: one rounding of a slightly different float
  }
}

std::string name(at::ScalarType t) { return c10::toString(t); }

at::Tensor misaligned(at::IntArrayRef shape, const at::TensorOptions& o) {
  // Same shape, contiguous, but the data pointer one element past a 16-byte boundary.
  const int64_t n = c10::multiply_integers(shape);
  return at::randn({n + 1}, o).narrow(0, 1, n).view(shape);
}

void test_sgd(at::ScalarType dtype) {
  auto sgd = op<std::vector<at::Tensor>(TensorList, TensorList, const at::Tensor&, const OptTensor&)>("meta_kernels::sgd_step");
  auto sgd_ = op<void(TensorList, TensorList, const at::Tensor&, const OptTensor&)>("meta_kernels::sgd_step_");
  const auto o = at::TensorOptions().dtype(dtype);
  for (int64_t T : {1, 3, 11}) {
    // Inner sizes: many tasks per chunk (per-element path), a few (segments), more than a chunk;
    // an empty tensor; a misaligned one; more tensors than one (patched, 4-entry) table holds.
    std::vector<at::Tensor> p, g;
    for (int64_t inner : {3, 10, 37, 64, 100, 333, 0, 1}) {
      p.push_back(at::randn({T, inner}, o));
      g.push_back(at::randn({T, inner}, o));
    }
    p.push_back(misaligned({T, 5, 13}, o));
    g.push_back(at::randn({T, 5, 13}, o));
    p.push_back(at::randn({T, 2, 50}, o));
    g.push_back(misaligned({T, 2, 50}, o));
    const int64_t n = static_cast<int64_t>(p.size());
    // lrs as a non-contiguous column of a float64 table; scale in float32.
    const at::Tensor table = at::rand({n, 3}, at::kDouble);
    const at::Tensor lrs = table.select(1, 1);
    const at::Tensor scale = at::rand({T}, at::kFloat) + 0.5;
    for (const bool with_scale : {false, true}) {
      const OptTensor s = with_scale ? OptTensor(scale) : std::nullopt;
      const auto want = sgd.call(p, g, lrs, s);
      const int64_t before = mk_emu::launches;
      const auto got = mkc::sgd_step(p, g, lrs, s);
      const std::string tag = "sgd_step " + name(dtype) + " T=" + std::to_string(T) + (with_scale ? " scale" : "");
      check(mk_emu::launches - before == 3, tag + ": 9 non-empty tensors in 4-entry tables = 3 launches");
      for (int64_t i = 0; i < n; ++i) check(same(got[i], want[i]), tag + " tensor " + std::to_string(i));
      // In place, with one non-contiguous param.
      std::vector<at::Tensor> q;
      for (const auto& t : p) q.push_back(t.clone());
      q[2] = p[2].clone().t().contiguous().t();
      mkc::sgd_step_(q, g, lrs, s);
      for (int64_t i = 0; i < n; ++i) check(same(q[i], want[i]), tag + " in place, tensor " + std::to_string(i));
    }
    // lrs and scale in the params' own dtype, one table (one launch).
    std::vector<at::Tensor> p4(p.begin(), p.begin() + 4), g4(g.begin(), g.begin() + 4);
    const at::Tensor lrs4 = at::rand({4}, o), scale4 = at::rand({T}, o);
    const auto want = sgd.call(p4, g4, lrs4, scale4);
    const int64_t before = mk_emu::launches;
    const auto got = mkc::sgd_step(p4, g4, lrs4, scale4);
    check(mk_emu::launches - before == 1, "sgd_step: 4 tensors = 1 launch");
    for (int64_t i = 0; i < 4; ++i) check(same(got[i], want[i]), "sgd_step same-dtype lrs " + name(dtype));
  }
}

void test_clip(at::ScalarType dtype) {
  auto clip = op<std::tuple<at::Tensor, at::Tensor>(TensorList, double, double)>("meta_kernels::clip_grad_norm");
  const auto o = at::TensorOptions().dtype(dtype);
  for (int64_t T : {1, 3, 5}) {  // 5 > the patched grid.y cap of 2: blocks loop over tasks
    std::vector<at::Tensor> g;
    for (int64_t inner : {3, 10, 64, 100, 333, 0, 1, 72}) g.push_back(at::randn({T, inner}, o) * 0.3);
    g.push_back(misaligned({T, 7, 9}, o));
    for (const double max_norm : {1.0, 100.0}) {
      auto [wn, wf] = clip.call(g, max_norm, 1e-6);
      auto [gn, gf] = mkc::clip_grad_norm(g, max_norm, 1e-6);
      const std::string tag = "clip_grad_norm " + name(dtype) + " T=" + std::to_string(T);
      check(same(gn, wn, red_tol(dtype) * 1e-2 + 1e-6, 1e-6), tag + " norm");
      check(same(gf, wf, red_tol(dtype) * 1e-2 + 1e-6, 1e-6), tag + " factor");
    }
    if (dtype == at::kFloat || dtype == at::kDouble) {
      auto bad = g;
      bad[3] = bad[3].clone();
      bad[3][T - 1][7] = std::numeric_limits<double>::infinity();
      if (T > 1) bad[3][0][1] = std::numeric_limits<double>::quiet_NaN();
      auto [wn, wf] = clip.call(bad, 1.0, 1e-6);
      auto [gn, gf] = mkc::clip_grad_norm(bad, 1.0, 1e-6);
      check(same(gn, wn, 1e-6, 1e-6) && same(gf, wf, 1e-6, 1e-6), "clip_grad_norm non-finite " + name(dtype));
    }
  }
  // Deterministic: the same input twice gives bitwise the same result.
  std::vector<at::Tensor> g = {at::randn({4, 1000}, o), at::randn({4, 77}, o)};
  auto [n1, f1] = mkc::clip_grad_norm(g, 1.0, 1e-6);
  auto [n2, f2] = mkc::clip_grad_norm(g, 1.0, 1e-6);
  check(same(n1, n2) && same(f1, f2), "clip_grad_norm deterministic " + name(dtype));
}

void test_bn(at::ScalarType dtype) {
  auto bn = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             double)>("meta_kernels::batch_norm");
  auto bn_bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                                 const OptTensor&)>("meta_kernels::batch_norm_backward");
  using T5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  auto bn_dbl = op<T5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&)>("meta_kernels::batch_norm_double_backward");
  // The double backward's five results, emulated CUDA against the CPU kernel.
  auto check_dbl = [&](const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const at::Tensor& m,
                       const at::Tensor& r, double tol, const std::string& tag) {
    const int64_t T = x.size(0), C = x.size(2);
    const at::Tensor u = at::randn(x.sizes(), x.options());
    const at::Tensor gw = at::randn({T, C}, at::kDouble).to(w.scalar_type()), gb = at::randn({T, C}, w.options());
    const T5 want = bn_dbl.call(u, gw, gb, go, x, w, m, r);
    const T5 got = mkc::batch_norm_double_backward(u, gw, gb, go, x, w, m, r);
    check(same(std::get<0>(got), std::get<0>(want), tol * 10, tol * 10) &&
              same(std::get<1>(got), std::get<1>(want), tol * 10, tol * 10),
          tag + " double backward d_grad_out/d_x");
    check(same(std::get<2>(got), std::get<2>(want), tol * 10, tol * 10) &&
              same(std::get<3>(got), std::get<3>(want), tol * 10, tol * 10) &&
              same(std::get<4>(got), std::get<4>(want), tol * 10, tol * 10),
          tag + " double backward d_weight/d_mean/d_rstd");
  };
  const auto o = at::TensorOptions().dtype(dtype);
  const std::vector<std::vector<int64_t>> shapes = {
      {2, 5, 3, 7, 7}, {1, 4, 2}, {3, 2, 4, 1, 1}, {2, 3, 2, 33}, {1, 75, 2, 3, 3}, {2, 0, 3, 4}, {2, 3, 2, 0}, {3, 2, 65, 5}};
  for (const bool large : {false, true}) {
    mk_emu::force_large_index = large;
    for (const auto& shape : shapes) {
      const std::string tag = "batch_norm " + name(dtype) + " " + c10::str(at::IntArrayRef(shape)) + (large ? " int64" : "");
      const int64_t T = shape[0], C = shape[2];
      const at::Tensor x = at::randn(shape, o) * 3 + 2;
      const at::Tensor w = at::randn({T, C}, o), b = at::randn({T, C}, o);
      auto [wo, wm, wr] = bn.call(x, w, b, 1e-5);
      auto [go_, gm, gr] = mkc::batch_norm(x, w, b, 1e-5);
      const double tol = red_tol(dtype);
      check(same(gm, wm, tol, tol) && same(gr, wr, tol, tol), tag + " mean/rstd");
      check(same(go_, wo, tol, tol), tag + " out");
      const at::Tensor gout = at::randn(shape, o);
      auto [wgx, wgw, wgb] = bn_bwd.call(gout, x, w, wm, wr, c10::nullopt, c10::nullopt);
      auto [ggx, ggw, ggb] = mkc::batch_norm_backward(gout, x, w, wm, wr, c10::nullopt, c10::nullopt);
      check(same(ggb, wgb, tol, tol * 10) && same(ggw, wgw, tol, tol * 10), tag + " grad_weight/grad_bias");
      check(same(ggx, wgx, tol, tol * 10), tag + " grad_x");
      // With gradients for the statistics outputs (float64 for a float x: read in their own dtype).
      const at::Tensor g_mean = at::randn({T, C}, at::kDouble), g_rstd = at::randn({T, C}, o);
      auto [wsx, wsw, wsb] = bn_bwd.call(gout, x, w, wm, wr, g_mean, g_rstd);
      auto [gsx, gsw, gsb] = mkc::batch_norm_backward(gout, x, w, wm, wr, g_mean, g_rstd);
      check(same(gsx, wsx, tol, tol * 10) && same(gsw, wsw, tol, tol * 10), tag + " grad_x with grad_mean/grad_rstd");
      check_dbl(gout, x, w, wm, wr, tol, tag);
    }
    // Non-contiguous x, float64 weight/bias for a float x, expanded weight (stride 0).
    const at::Tensor x = at::randn({2, 6, 3, 5}, o).transpose(1, 3).contiguous().transpose(1, 3);
    const at::Tensor w = at::randn({3}, at::kDouble).expand({2, 3}), b = at::randn({2, 3}, at::kDouble);
    auto [wo, wm, wr] = bn.call(x, w, b, 1e-3);
    auto [go_, gm, gr] = mkc::batch_norm(x, w, b, 1e-3);
    const double tol = red_tol(dtype);
    check(!x.is_contiguous() && same(go_, wo, tol, tol) && same(gm, wm, tol, tol) && same(gr, wr, tol, tol),
          "batch_norm mixed dtypes/strides " + name(dtype));
    const at::Tensor gout = at::randn({2, 6, 3, 5}, o);
    auto [wgx, wgw, wgb] = bn_bwd.call(gout, x, w, wm, wr, c10::nullopt, c10::nullopt);
    auto [ggx, ggw, ggb] = mkc::batch_norm_backward(gout, x, w, wm, wr, c10::nullopt, c10::nullopt);
    check(same(ggx, wgx, tol, tol * 10) && same(ggw, wgw, tol, tol * 10) && same(ggb, wgb, tol, tol * 10),
          "batch_norm_backward mixed dtypes/strides " + name(dtype));
    check_dbl(gout, x, w, wm, wr, tol, "batch_norm mixed dtypes/strides " + name(dtype));
  }
  mk_emu::force_large_index = false;
}

void test_reptile(at::ScalarType dtype) {
  auto reptile = op<void(TensorList, TensorList, double)>("meta_kernels::reptile_update_");
  const auto o = at::TensorOptions().dtype(dtype);
  // T picks 1, 2, 4 or 8 row groups; 9 rows over 8 groups is uneven; with 8 groups a block's
  // chunk is 32 packs, so the larger tensors take several chunks.
  for (int64_t T : {1, 2, 4, 9, 20}) {
    std::vector<at::Tensor> theta, phi;
    for (int64_t n : {3, 64, 100, 333, 0, 8, 1}) {
      theta.push_back(at::randn({n}, o));
      phi.push_back(at::randn({T, n}, o));
    }
    theta.push_back(misaligned({4, 8}, o));
    phi.push_back(at::randn({T, 4, 8}, o));
    theta.push_back(at::randn({5, 8}, o).t());  // non-contiguous
    phi.push_back(at::randn({T, 8, 5}, o));
    std::vector<at::Tensor> want, got;
    for (const auto& t : theta) {
      want.push_back(t.clone());
      got.push_back(t.dim() == 2 && !t.is_contiguous() ? t.clone().t().contiguous().t() : t.clone());
    }
    reptile.call(want, phi, 0.3);
    mkc::reptile_update_(got, phi, 0.3);
    // One row group sums the tasks in the CPU kernel's order (exact); several add partial sums.
    const double tol = T < 2 ? 0.0 : red_tol(dtype) * (dtype == at::kFloat || dtype == at::kDouble ? 1.0 : 0.5);
    for (size_t i = 0; i < theta.size(); ++i)
      check(same(got[i], want[i], tol, tol),
            "reptile_update_ " + name(dtype) + " T=" + std::to_string(T) + " tensor " + std::to_string(i));
  }
}

void test_pool(at::ScalarType dtype) {
  auto pool = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("meta_kernels::max_pool2x2_relu");
  auto pool_bw = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>(
      "meta_kernels::max_pool2x2_relu_backward");
  auto pool_gather = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("meta_kernels::max_pool2x2_relu_gather");
  const auto o = at::TensorOptions().dtype(dtype);
  // Odd and even sizes, one plane and many (grid-stride loop: the emulated grid is capped at 3 blocks),
  // a non-contiguous input, and windows with exact ties and NaN.
  std::vector<at::Tensor> inputs = {at::randn({2, 3, 8, 6}, o), at::randn({5, 7}, o), at::randn({3, 4, 9, 11}, o),
                                    at::randn({4, 6, 2, 3}, o).transpose(1, 2)};
  at::Tensor special = at::randn({2, 4, 4}, o);
  special.index_put_({0, 0, 0}, 0.5);
  special.index_put_({0, 1, 1}, 0.5);
  special.index_put_({1, 2, 3}, std::nan(""));
  special.index_put_({1, 0, 0}, -1.0);
  inputs.push_back(special);
  for (const auto& x : inputs) {
    auto [want_out, want_idx] = pool.call(x);
    auto [got_out, got_idx] = mkc::max_pool2x2_relu(x);
    const std::string what = " " + name(dtype) + " x " + c10::str(x.sizes());
    check(same(got_out, want_out) && at::equal(got_idx, want_idx), "max_pool2x2_relu" + what);
    const at::Tensor go = at::randn(want_out.sizes(), o);
    check(same(mkc::max_pool2x2_relu_backward(go, want_idx, x.size(-2), x.size(-1)),
               pool_bw.call(go, want_idx, x.size(-2), x.size(-1))),
          "max_pool2x2_relu_backward" + what);
    const at::Tensor gx = at::randn(x.sizes(), o);
    check(same(mkc::max_pool2x2_relu_gather(gx, want_idx), pool_gather.call(gx, want_idx)),
          "max_pool2x2_relu_gather" + what);
  }
}

void test_errors() {
  std::vector<at::Tensor> p = {at::randn({2, 3}), at::randn({2})};
  std::vector<at::Tensor> g = {at::randn({2, 3})};
  bool ok = false;
  try {
    mkc::sgd_step(p, g, at::tensor({0.1, 0.1}), std::nullopt);
  } catch (const c10::ValueError& e) {
    ok = std::string(e.what()).find("meta_kernels::sgd_step: invalid arguments (grads.size() == params.size()") !=
         std::string::npos;
  }
  check(ok, "sgd_step list length error");
  ok = false;
  try {
    mkc::batch_norm(at::randn({2, 3, 4}), at::randn({2, 4}), at::randn({3, 4}), 1e-5);
  } catch (const c10::ValueError& e) {
    ok = std::string(e.what()).find("meta_kernels::batch_norm: invalid arguments") != std::string::npos;
  }
  check(ok, "batch_norm bias shape error");
}

}  // namespace

// momentum_step and adam_step: every combination of scale and rates (none, with the task dim,
// without it), tensors spanning several chunks and tables, misaligned inputs; out of place and
// in place (one non-contiguous param), each against the CPU kernel.
using OptList = std::optional<TensorList>;

template <typename Run>
void test_stateful(const char* op_name, at::ScalarType dtype, int n_states, const Run& run, double tol) {
  const auto o = at::TensorOptions().dtype(dtype);
  for (int64_t T : {1, 3, 5}) {
    std::vector<at::Tensor> p, g, full_rates, task_rates;
    std::vector<std::vector<at::Tensor>> states(n_states);
    for (int64_t inner : {3, 10, 37, 64, 130, 0, 1}) {
      p.push_back(at::randn({T, inner}, o));
      g.push_back(at::randn({T, inner}, o));
    }
    p.push_back(misaligned({T, 5, 13}, o));
    g.push_back(misaligned({T, 5, 13}, o));
    for (const auto& t : p) {
      for (auto& st : states) st.push_back(at::rand(t.sizes(), o));  // non-negative: adam's v
      full_rates.push_back(at::rand(t.sizes(), o));
      task_rates.push_back(at::rand(t.sizes().slice(1), o));
    }
    const int64_t n = static_cast<int64_t>(p.size());
    const at::Tensor lrs = at::rand({n, 2}, at::kDouble).select(1, 0);
    const at::Tensor scale = at::rand({T}, at::kFloat) + 0.5;
    for (const bool with_scale : {false, true}) {
      for (const int rates_kind : {0, 1, 2}) {
        const OptTensor s = with_scale ? OptTensor(scale) : std::nullopt;
        const OptList r = rates_kind == 0 ? OptList() : OptList(rates_kind == 1 ? TensorList(full_rates) : TensorList(task_rates));
        const std::string tag = std::string(op_name) + " " + name(dtype) + " T=" + std::to_string(T) +
                                (with_scale ? " scale" : "") + " rates=" + std::to_string(rates_kind);
        const auto want = run(/*cuda=*/false, p, g, states, lrs, s, r, /*in_place=*/false);
        const auto got = run(/*cuda=*/true, p, g, states, lrs, s, r, /*in_place=*/false);
        for (size_t k = 0; k < want.size(); ++k)
          for (int64_t i = 0; i < n; ++i)
            check(same(got[k][i], want[k][i], tol, tol), tag + " output " + std::to_string(k) + " tensor " + std::to_string(i));
        // In place on copies, one param non-contiguous.
        std::vector<at::Tensor> q;
        for (const auto& t : p) q.push_back(t.clone());
        q[2] = p[2].clone().t().contiguous().t();
        std::vector<std::vector<at::Tensor>> qs;
        for (const auto& st : states) {
          qs.emplace_back();
          for (const auto& t : st) qs.back().push_back(t.clone());
        }
        const auto written = run(/*cuda=*/true, q, g, qs, lrs, s, r, /*in_place=*/true);
        for (size_t k = 0; k < want.size(); ++k)
          for (int64_t i = 0; i < n; ++i)
            check(same(written[k][i], want[k][i], tol, tol), tag + " in place, output " + std::to_string(k) + " tensor " +
                                                                std::to_string(i));
      }
    }
  }
}

using Lists = std::vector<std::vector<at::Tensor>>;

void test_momentum(at::ScalarType dtype) {
  auto cpu = op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
      TensorList, TensorList, TensorList, const at::Tensor&, const OptTensor&, OptList, double)>("meta_kernels::momentum_step");
  const double mu = 0.9;
  test_stateful("momentum_step", dtype, 1, [&](bool cuda, const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
                                               const Lists& st, const at::Tensor& lrs, const OptTensor& s, const OptList& r,
                                               bool in_place) -> Lists {
    if (in_place) {
      mkc::momentum_step_(p, g, st[0], lrs, s, r, mu);
      return {p, st[0]};
    }
    auto [np, nb] = cuda ? mkc::momentum_step(p, g, st[0], lrs, s, r, mu) : cpu.call(p, g, st[0], lrs, s, r, mu);
    return {np, nb};
  }, 0.0);
}

void test_adam(at::ScalarType dtype) {
  auto cpu = op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
      TensorList, TensorList, TensorList, TensorList, const at::Tensor&, const OptTensor&, OptList, double, double, double,
      int64_t)>("meta_kernels::adam_step");
  const double b1 = 0.8, b2 = 0.95, eps = 1e-6;
  const int64_t step = 3;
  // sqrt and division may round differently where the compiler contracts them: a few ulps.
  const double tol = dtype == at::kDouble ? 1e-12 : red_tol(dtype);
  test_stateful("adam_step", dtype, 2, [&](bool cuda, const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
                                           const Lists& st, const at::Tensor& lrs, const OptTensor& s, const OptList& r,
                                           bool in_place) -> Lists {
    if (in_place) {
      mkc::adam_step_(p, g, st[0], st[1], lrs, s, r, b1, b2, eps, step);
      return {p, st[0], st[1]};
    }
    auto [np, nm, nv] = cuda ? mkc::adam_step(p, g, st[0], st[1], lrs, s, r, b1, b2, eps, step)
                             : cpu.call(p, g, st[0], st[1], lrs, s, r, b1, b2, eps, step);
    return {np, nm, nv};
  }, tol);
}

int main() {
  at::manual_seed(0);
  try {
    for (const auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
      test_sgd(dtype);
      test_clip(dtype);
      test_bn(dtype);
      test_reptile(dtype);
      test_pool(dtype);
      test_momentum(dtype);
      test_adam(dtype);
      std::cout << "done " << name(dtype) << std::endl;
    }
    test_errors();
  } catch (const std::exception& e) {
    std::cout << "FAIL: exception: " << e.what() << std::endl;
    return 1;
  }
  std::cout << g_checks - g_failures << "/" << g_checks << " checks passed, " << mk_emu::launches << " emulated launches"
            << std::endl;
  return g_failures ? 1 : 0;
}
