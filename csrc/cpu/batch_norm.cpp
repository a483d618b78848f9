// Batch norm with statistics per (task, channel): x [T, N, C, *spatial], weight/bias [T, C].
// A row is one sample's spatial block of one channel (S elements), a group the N rows of one
// (task, channel). Long rows are read in memory order: per-row partial sums, merged per group;
// walking a group's N strided blocks instead ran the reductions ~3x slower than memory once x left
// the cache (26x26 maps of 512 channels). Short rows (S < kLanes: BatchNorm1d's S = 1) cost more
// per row than that saves, so each group sums its N blocks directly. The results are then
// written in memory order.
#include <cmath>

#include "../common.h"
#include "lane_sums.h"

namespace meta_kernels {
namespace cpu {
namespace {

struct Geometry {
  int64_t T, N, C, S;
  explicit Geometry(const at::Tensor& x)
      : T(x.size(0)), N(x.size(1)), C(x.size(2)), S(x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1) * x.size(2))) {}
  int64_t rows() const { return T * N * C; }
  int64_t groups() const { return T * C; }
  bool long_rows() const { return S >= kLanes; }
  // Row (t * N + n) * C + c: sample n of group g = t * C + c.
  int64_t row(int64_t g, int64_t n) const { return (g / C * N + n) * C + g % C; }
  // Rows per parallel task: at least ~16K elements each.
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)); }
};

// body(r, g) for the rows r in [lo, hi), g the row's group (counted along, not divided per row).
template <typename Body>
inline void for_rows(const Geometry& geo, int64_t lo, int64_t hi, Body&& body) {
  if (lo >= hi) return;
  int64_t c = lo % geo.C, n = lo / geo.C % geo.N, t = lo / (geo.C * geo.N);
  for (int64_t r = lo; r < hi; ++r) {
    body(r, t * geo.C + c);
    if (++c == geo.C) {
      c = 0;
      if (++n == geo.N) n = 0, ++t;
    }
  }
}

// sums[g * K + k]: group g's total of term k, where add(g, offset, size, acc) adds the terms of
// the `size` contiguous elements at `offset` into acc[K].
template <int K, typename opmath_t, typename Add>
void group_sums(const Geometry& geo, opmath_t* sums, Add add) {
  if (geo.long_rows()) {
    std::vector<opmath_t> part(static_cast<size_t>(geo.rows() * K));
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for_rows(geo, lo, hi, [&](int64_t r, int64_t g) {
        opmath_t acc[K] = {};
        add(g, r * geo.S, geo.S, acc);
        for (int k = 0; k < K; ++k) part[r * K + k] = acc[k];
      });
    });
    at::parallel_for(0, geo.groups(), 64, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        opmath_t acc[K] = {};
        for (int64_t n = 0; n < geo.N; ++n)
          for (int k = 0; k < K; ++k) acc[k] += part[geo.row(g, n) * K + k];
        for (int k = 0; k < K; ++k) sums[g * K + k] = acc[k];
      }
    });
    return;
  }
  at::parallel_for(0, geo.groups(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      opmath_t acc[K] = {};
      for (int64_t n = 0; n < geo.N; ++n) add(g, geo.row(g, n) * geo.S, geo.S, acc);
      for (int k = 0; k < K; ++k) sums[g * K + k] = acc[k];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                         const at::Tensor& bias_in, double eps) {
  check_batch_norm_forward_args(x_in, weight_in, bias_in);
  const at::Tensor x = x_in.contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  const at::Tensor w = weight_in.to(stat_dtype).contiguous();
  const at::Tensor b = bias_in.to(stat_dtype).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  const int64_t M = geo.N * geo.S;
  MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* bp = b.const_data_ptr<opmath_t>();
    opmath_t* mp = mean.data_ptr<opmath_t>();
    opmath_t* rp = rstd.data_ptr<opmath_t>();
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    // Two passes (the mean, then centred squares) for accuracy. Long rows take both within each
    // row while it is in cache -- its mean and centred squares -- merged exactly (Chan et al.:
    // rows of equal size): the groups' centred squares are the rows' plus S times the squared
    // deviations of the row means from the group's.
    std::vector<opmath_t> var(static_cast<size_t>(geo.groups()));
    if (geo.long_rows()) {
      const opmath_t S = static_cast<opmath_t>(geo.S);
      std::vector<opmath_t> row_mean(static_cast<size_t>(geo.rows())), row_sq(static_cast<size_t>(geo.rows()));
      at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* src = xp + r * geo.S;
          opmath_t sum[1] = {}, sq[1] = {};
          add_terms(geo.S, sum, [&](int64_t s, opmath_t (&v)[1]) { v[0] = static_cast<opmath_t>(src[s]); });
          const opmath_t m = sum[0] / S;
          add_terms(geo.S, sq, [&](int64_t s, opmath_t (&v)[1]) {
            const opmath_t d = static_cast<opmath_t>(src[s]) - m;
            v[0] = d * d;
          });
          row_mean[r] = m;
          row_sq[r] = sq[0];
        }
      });
      at::parallel_for(0, geo.groups(), 64, [&](int64_t lo, int64_t hi) {
        for (int64_t g = lo; g < hi; ++g) {
          opmath_t mu = 0, sq = 0, spread = 0;
          for (int64_t n = 0; n < geo.N; ++n) mu += row_mean[geo.row(g, n)];
          mu = geo.N > 0 ? mu / static_cast<opmath_t>(geo.N) : opmath_t(0);
          for (int64_t n = 0; n < geo.N; ++n) {
            const int64_t r = geo.row(g, n);
            sq += row_sq[r];
            spread += (row_mean[r] - mu) * (row_mean[r] - mu);
          }
          mp[g] = mu;
          var[g] = (sq + S * spread) * inv_M;
        }
      });
    } else {
      group_sums<1>(geo, mp, [&](int64_t, int64_t o, int64_t size, opmath_t (&acc)[1]) {
        add_terms(size, acc, [&](int64_t s, opmath_t (&v)[1]) { v[0] = static_cast<opmath_t>(xp[o + s]); });
      });
      for (int64_t g = 0; g < geo.groups(); ++g) mp[g] *= inv_M;
      group_sums<1>(geo, var.data(), [&](int64_t g, int64_t o, int64_t size, opmath_t (&acc)[1]) {
        const opmath_t mu = mp[g];
        add_terms(size, acc, [&](int64_t s, opmath_t (&v)[1]) {
          const opmath_t d = static_cast<opmath_t>(xp[o + s]) - mu;
          v[0] = d * d;
        });
      });
      for (int64_t g = 0; g < geo.groups(); ++g) var[g] *= inv_M;
    }
    for (int64_t g = 0; g < geo.groups(); ++g) rp[g] = opmath_t(1) / std::sqrt(var[g] + static_cast<opmath_t>(eps));
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for_rows(geo, lo, hi, [&](int64_t r, int64_t g) {
        // (x - mu) * scale + b rather than x * scale + shift: no cancellation when rstd is large.
        const opmath_t mu = mp[g], scale = wp[g] * rp[g], shift = bp[g];
        const scalar_t* src = xp + r * geo.S;
        scalar_t* dst = op + r * geo.S;
_Pragma("omp simd")
        for (int64_t s = 0; s < geo.S; ++s)
          dst[s] = static_cast<scalar_t>((static_cast<opmath_t>(src[s]) - mu) * scale + shift);
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                  const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in,
                                                                  const c10::optional<at::Tensor>& grad_mean_in,
                                                                  const c10::optional<at::Tensor>& grad_rstd_in) {
  check_batch_norm_backward_args(grad_out_in, x_in, weight_in, mean_in, rstd_in, grad_mean_in, grad_rstd_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor go = grad_out_in.to(x.scalar_type()).contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  const at::Tensor w = weight_in.to(stat_dtype).contiguous();
  const at::Tensor mean = mean_in.to(stat_dtype).contiguous();
  const at::Tensor rstd = rstd_in.to(stat_dtype).contiguous();
  // Not given: read as zeros (no [T, C] zeros allocated per call).
  const at::Tensor gmean = grad_mean_in.has_value() ? grad_mean_in->to(stat_dtype).contiguous() : at::Tensor();
  const at::Tensor grstd = grad_rstd_in.has_value() ? grad_rstd_in->to(stat_dtype).contiguous() : at::Tensor();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor gb = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  const int64_t M = geo.N * geo.S;
  MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* mp = mean.const_data_ptr<opmath_t>();
    const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
    const opmath_t* gmp = gmean.defined() ? gmean.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* grp = grstd.defined() ? grstd.const_data_ptr<opmath_t>() : nullptr;
    opmath_t* gwp = gw.data_ptr<opmath_t>();
    opmath_t* gbp = gb.data_ptr<opmath_t>();
    // sum(go), sum(go * xc) per group (xc = x - mean).
    std::vector<opmath_t> sums(static_cast<size_t>(geo.groups() * 2));
    group_sums<2>(geo, sums.data(), [&](int64_t g, int64_t o, int64_t size, opmath_t (&acc)[2]) {
      const opmath_t mu = mp[g];
      add_terms(size, acc, [&](int64_t s, opmath_t (&v)[2]) {
        v[0] = static_cast<opmath_t>(gop[o + s]);
        v[1] = v[0] * (static_cast<opmath_t>(xp[o + s]) - mu);
      });
    });
    // grad_x = w r (go - mean(go) - xhat mean(go xhat)) = a go - k (x - mean) - c0; the statistics'
    // own gradients add grad_mean / M - grad_rstd r^3 (x - mean) / M (d mean/dx, d rstd/dx).
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    std::vector<opmath_t> coef(static_cast<size_t>(geo.groups() * 3));
    for (int64_t g = 0; g < geo.groups(); ++g) {
      const opmath_t r = rp[g], sum_go = sums[2 * g], sum_go_xc = sums[2 * g + 1], a = wp[g] * r;
      gbp[g] = sum_go;
      gwp[g] = sum_go_xc * r;
      coef[3 * g] = a;
      coef[3 * g + 1] = (a * sum_go_xc + (grp ? grp[g] : opmath_t(0)) * r) * r * r * inv_M;
      coef[3 * g + 2] = (a * sum_go - (gmp ? gmp[g] : opmath_t(0))) * inv_M;
    }
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for_rows(geo, lo, hi, [&](int64_t r, int64_t g) {
        const opmath_t mu = mp[g], a = coef[3 * g], k = coef[3 * g + 1], c0 = coef[3 * g + 2];
        const scalar_t* gsrc = gop + r * geo.S;
        const scalar_t* xsrc = xp + r * geo.S;
        scalar_t* dst = gxp + r * geo.S;
_Pragma("omp simd")
        for (int64_t s = 0; s < geo.S; ++s)
          dst[s] = static_cast<scalar_t>(a * static_cast<opmath_t>(gsrc[s]) - k * (static_cast<opmath_t>(xsrc[s]) - mu) - c0);
      });
    });
  });
  return {gx, gw.to(weight_in.scalar_type()), gb.to(weight_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& gg_x_in, const at::Tensor& gg_w_in, const at::Tensor& gg_b_in, const at::Tensor& grad_out_in,
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  check_batch_norm_double_backward_args(gg_x_in, gg_w_in, gg_b_in, grad_out_in, x_in, weight_in, mean_in, rstd_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor go = grad_out_in.to(x.scalar_type()).contiguous();
  const at::Tensor u = gg_x_in.to(x.scalar_type()).contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  const at::Tensor w = weight_in.to(stat_dtype).contiguous();
  const at::Tensor mean = mean_in.to(stat_dtype).contiguous();
  const at::Tensor rstd = rstd_in.to(stat_dtype).contiguous();
  const at::Tensor ggw = gg_w_in.to(stat_dtype).contiguous();
  const at::Tensor ggb = gg_b_in.to(stat_dtype).contiguous();
  at::Tensor d_go = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor d_w = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor d_mean = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor d_rstd = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  const int64_t M = geo.N * geo.S;
  MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_double_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* dgop = d_go.data_ptr<scalar_t>();
    scalar_t* dxp = d_x.data_ptr<scalar_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* mp = mean.const_data_ptr<opmath_t>();
    const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
    const opmath_t* ggwp = ggw.const_data_ptr<opmath_t>();
    const opmath_t* ggbp = ggb.const_data_ptr<opmath_t>();
    opmath_t* dwp = d_w.data_ptr<opmath_t>();
    opmath_t* dmp = d_mean.data_ptr<opmath_t>();
    opmath_t* drp = d_rstd.data_ptr<opmath_t>();
    // Five sums per group (xc = x - mean, u = gg_x): go, go xc, u, u xc, u go.
    std::vector<opmath_t> sums(static_cast<size_t>(geo.groups() * 5));
    group_sums<5>(geo, sums.data(), [&](int64_t g, int64_t o, int64_t size, opmath_t (&acc)[5]) {
      const opmath_t mu = mp[g];
      add_terms(size, acc, [&](int64_t s, opmath_t (&v)[5]) {
        const opmath_t d = static_cast<opmath_t>(gop[o + s]);
        const opmath_t e = static_cast<opmath_t>(up[o + s]);
        const opmath_t xc = static_cast<opmath_t>(xp[o + s]) - mu;
        v[0] = d;
        v[1] = d * xc;
        v[2] = e;
        v[3] = e * xc;
        v[4] = e * d;
      });
    });
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    std::vector<opmath_t> coef(static_cast<size_t>(geo.groups() * 4));
    for (int64_t g = 0; g < geo.groups(); ++g) {
      const opmath_t* sg = sums.data() + 5 * g;
      const opmath_t s_go = sg[0], s_go_xc = sg[1], s_u = sg[2], s_u_xc = sg[3], s_u_go = sg[4];
      const opmath_t r = rp[g], a = wp[g] * r;
      const opmath_t B = s_go, W = s_go_xc * r, U = s_u, V = s_u_xc * r;
      const opmath_t cb = ggbp[g] - a * U * inv_M, cw = ggwp[g] - a * V * inv_M;
      const opmath_t d_a = s_u_go - (B * U + W * V) * inv_M;
      const opmath_t k = a * W * inv_M;
      dwp[g] = r * d_a;
      dmp[g] = -r * (cw * B - k * U);
      drp[g] = wp[g] * d_a + cw * s_go_xc - k * s_u_xc;
      coef[4 * g] = cb;
      coef[4 * g + 1] = r * cw;
      coef[4 * g + 2] = a;
      coef[4 * g + 3] = r * k;
    }
    // d_go = cb + xhat cw + a u; d_x = r (cw go - k u).
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for_rows(geo, lo, hi, [&](int64_t r, int64_t g) {
        const opmath_t mu = mp[g], cb = coef[4 * g], rcw = coef[4 * g + 1], a = coef[4 * g + 2], rk = coef[4 * g + 3];
        const scalar_t* gsrc = gop + r * geo.S;
        const scalar_t* usrc = up + r * geo.S;
        const scalar_t* xsrc = xp + r * geo.S;
        scalar_t* dgo = dgop + r * geo.S;
        scalar_t* dx = dxp + r * geo.S;
_Pragma("omp simd")
        for (int64_t s = 0; s < geo.S; ++s) {
          const opmath_t e = static_cast<opmath_t>(usrc[s]);
          dgo[s] = static_cast<scalar_t>(cb + (static_cast<opmath_t>(xsrc[s]) - mu) * rcw + a * e);
          dx[s] = static_cast<scalar_t>(rcw * static_cast<opmath_t>(gsrc[s]) - rk * e);
        }
      });
    });
  });
  return {d_go, d_x, d_w.to(weight_in.scalar_type()), d_mean.to(mean_in.scalar_type()), d_rstd.to(rstd_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("batch_norm", &batch_norm);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_double_backward", &batch_norm_double_backward);
}

}  // namespace cpu
}  // namespace meta_kernels
