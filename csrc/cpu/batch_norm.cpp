// Batch norm with statistics per (task, channel): x [T, N, C, *spatial], weight/bias [T, C].
// Every pass walks x in memory order, one row (a sample's spatial block of one channel) at a
// time: per-row partial sums, merged per (task, channel) group, then one pass writing the result.
// Walking a group's N strided blocks instead ran the reductions ~3x slower than memory once x
// left the cache (26x26 maps of 512 channels).
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
  // The (task, channel) group of row r = (t * N + n) * C + c.
  int64_t group(int64_t r) const { return r / (N * C) * C + r % C; }
  // The row of sample n in group g.
  int64_t row(int64_t g, int64_t n) const { return (g / C * N + n) * C + g % C; }
  // Rows per parallel task: at least ~16K elements each.
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)); }
};

// part[r * K + k] for each row r, summed over the N rows of group g into out[k].
template <int K, typename opmath_t>
inline void group_sums(const Geometry& geo, const opmath_t* part, int64_t g, opmath_t (&out)[K]) {
  for (int k = 0; k < K; ++k) out[k] = 0;
  for (int64_t n = 0; n < geo.N; ++n) {
    const opmath_t* p = part + geo.row(g, n) * K;
    for (int k = 0; k < K; ++k) out[k] += p[k];
  }
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
  at::Tensor part = at::empty({geo.rows(), 2}, x.options().dtype(stat_dtype));
  const int64_t M = geo.N * geo.S;
  MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* bp = b.const_data_ptr<opmath_t>();
    opmath_t* mp = mean.data_ptr<opmath_t>();
    opmath_t* rp = rstd.data_ptr<opmath_t>();
    opmath_t* pp = part.data_ptr<opmath_t>();
    const opmath_t S = static_cast<opmath_t>(geo.S);
    // Each row's mean and centred sum of squares: two passes over a block still in cache.
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* src = xp + r * geo.S;
        opmath_t sums[kLanes] = {};
        for_each_lane(geo.S, [&](int64_t s, int j) { sums[j] += static_cast<opmath_t>(src[s]); });
        const opmath_t m = geo.S > 0 ? lanes_total(sums) / S : opmath_t(0);
        opmath_t squares[kLanes] = {};
        for_each_lane(geo.S, [&](int64_t s, int j) {
          const opmath_t d = static_cast<opmath_t>(src[s]) - m;
          squares[j] += d * d;
        });
        pp[2 * r] = m;
        pp[2 * r + 1] = lanes_total(squares);
      }
    });
    // Rows of equal size merge exactly (Chan et al.): the mean of the row means, and the rows'
    // centred squares plus S times the squared deviations of the row means.
    at::parallel_for(0, geo.T * geo.C, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        opmath_t mu = 0;
        for (int64_t n = 0; n < geo.N; ++n) mu += pp[2 * geo.row(g, n)];
        mu = geo.N > 0 ? mu / static_cast<opmath_t>(geo.N) : opmath_t(0);
        opmath_t sq = 0, spread = 0;
        for (int64_t n = 0; n < geo.N; ++n) {
          const opmath_t* p = pp + 2 * geo.row(g, n);
          sq += p[1];
          spread += (p[0] - mu) * (p[0] - mu);
        }
        const opmath_t var = M > 0 ? (sq + S * spread) / static_cast<opmath_t>(M) : opmath_t(0);
        mp[g] = mu;
        rp[g] = opmath_t(1) / std::sqrt(var + static_cast<opmath_t>(eps));
      }
    });
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t g = geo.group(r);
        // (x - mu) * scale + b rather than x * scale + shift: no cancellation when rstd is large.
        const opmath_t mu = mp[g], scale = wp[g] * rp[g], shift = bp[g];
        const scalar_t* src = xp + r * geo.S;
        scalar_t* dst = op + r * geo.S;
_Pragma("omp simd")
        for (int64_t s = 0; s < geo.S; ++s)
          dst[s] = static_cast<scalar_t>((static_cast<opmath_t>(src[s]) - mu) * scale + shift);
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                  const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in) {
  check_batch_norm_backward_args(grad_out_in, x_in, weight_in, mean_in, rstd_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor go = grad_out_in.to(x.scalar_type()).contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  const at::Tensor w = weight_in.to(stat_dtype).contiguous();
  const at::Tensor mean = mean_in.to(stat_dtype).contiguous();
  const at::Tensor rstd = rstd_in.to(stat_dtype).contiguous();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor gb = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor part = at::empty({geo.rows(), 2}, x.options().dtype(stat_dtype));
  at::Tensor coef = at::empty({geo.T * geo.C, 3}, x.options().dtype(stat_dtype));
  const int64_t M = geo.N * geo.S;
  MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* mp = mean.const_data_ptr<opmath_t>();
    const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
    opmath_t* gwp = gw.data_ptr<opmath_t>();
    opmath_t* gbp = gb.data_ptr<opmath_t>();
    opmath_t* pp = part.data_ptr<opmath_t>();
    opmath_t* cp = coef.data_ptr<opmath_t>();
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const opmath_t mu = mp[geo.group(r)];
        const scalar_t* gsrc = gop + r * geo.S;
        const scalar_t* xsrc = xp + r * geo.S;
        opmath_t go_lanes[kLanes] = {}, go_xc_lanes[kLanes] = {};  // xc = x - mean
        for_each_lane(geo.S, [&](int64_t s, int j) {
          const opmath_t d = static_cast<opmath_t>(gsrc[s]);
          go_lanes[j] += d;
          go_xc_lanes[j] += d * (static_cast<opmath_t>(xsrc[s]) - mu);
        });
        pp[2 * r] = lanes_total(go_lanes);
        pp[2 * r + 1] = lanes_total(go_xc_lanes);
      }
    });
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    at::parallel_for(0, geo.T * geo.C, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        opmath_t sums[2];
        group_sums<2>(geo, pp, g, sums);
        const opmath_t r = rp[g], sum_go = sums[0], sum_go_xc = sums[1];
        gbp[g] = sum_go;
        gwp[g] = sum_go_xc * r;
        // grad_x = w r (go - mean(go) - xhat mean(go xhat)) = a go - k (x - mean) - c0.
        const opmath_t a = wp[g] * r;
        cp[3 * g] = a;
        cp[3 * g + 1] = a * r * r * sum_go_xc * inv_M;
        cp[3 * g + 2] = a * sum_go * inv_M;
      }
    });
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t g = geo.group(r);
        const opmath_t mu = mp[g], a = cp[3 * g], k = cp[3 * g + 1], c0 = cp[3 * g + 2];
        const scalar_t* gsrc = gop + r * geo.S;
        const scalar_t* xsrc = xp + r * geo.S;
        scalar_t* dst = gxp + r * geo.S;
_Pragma("omp simd")
        for (int64_t s = 0; s < geo.S; ++s)
          dst[s] = static_cast<scalar_t>(a * static_cast<opmath_t>(gsrc[s]) - k * (static_cast<opmath_t>(xsrc[s]) - mu) - c0);
      }
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
  at::Tensor part = at::empty({geo.rows(), 5}, x.options().dtype(stat_dtype));
  at::Tensor coef = at::empty({geo.T * geo.C, 4}, x.options().dtype(stat_dtype));
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
    opmath_t* pp = part.data_ptr<opmath_t>();
    opmath_t* cp = coef.data_ptr<opmath_t>();
    // One pass for the five sums per row (xc = x - mean, u = gg_x), one pass writing both outputs.
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const opmath_t mu = mp[geo.group(r)];
        const scalar_t* gsrc = gop + r * geo.S;
        const scalar_t* usrc = up + r * geo.S;
        const scalar_t* xsrc = xp + r * geo.S;
        opmath_t l_go[kLanes] = {}, l_go_xc[kLanes] = {}, l_u[kLanes] = {}, l_u_xc[kLanes] = {}, l_u_go[kLanes] = {};
        for_each_lane(geo.S, [&](int64_t s, int j) {
          const opmath_t d = static_cast<opmath_t>(gsrc[s]);
          const opmath_t e = static_cast<opmath_t>(usrc[s]);
          const opmath_t xc = static_cast<opmath_t>(xsrc[s]) - mu;
          l_go[j] += d;
          l_go_xc[j] += d * xc;
          l_u[j] += e;
          l_u_xc[j] += e * xc;
          l_u_go[j] += e * d;
        });
        opmath_t* p = pp + 5 * r;
        p[0] = lanes_total(l_go);
        p[1] = lanes_total(l_go_xc);
        p[2] = lanes_total(l_u);
        p[3] = lanes_total(l_u_xc);
        p[4] = lanes_total(l_u_go);
      }
    });
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    at::parallel_for(0, geo.T * geo.C, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        opmath_t sums[5];
        group_sums<5>(geo, pp, g, sums);
        const opmath_t s_go = sums[0], s_go_xc = sums[1], s_u = sums[2], s_u_xc = sums[3], s_u_go = sums[4];
        const opmath_t r = rp[g], a = wp[g] * r;
        const opmath_t B = s_go, W = s_go_xc * r, U = s_u, V = s_u_xc * r;
        const opmath_t cb = ggbp[g] - a * U * inv_M, cw = ggwp[g] - a * V * inv_M;
        const opmath_t d_a = s_u_go - (B * U + W * V) * inv_M;
        const opmath_t k = a * W * inv_M;
        dwp[g] = r * d_a;
        dmp[g] = -r * (cw * B - k * U);
        drp[g] = wp[g] * d_a + cw * s_go_xc - k * s_u_xc;
        cp[4 * g] = cb;
        cp[4 * g + 1] = r * cw;
        cp[4 * g + 2] = a;
        cp[4 * g + 3] = r * k;
      }
    });
    // d_go = cb + xhat cw + a u; d_x = r (cw go - k u).
    at::parallel_for(0, geo.rows(), geo.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t g = geo.group(r);
        const opmath_t mu = mp[g], cb = cp[4 * g], rcw = cp[4 * g + 1], a = cp[4 * g + 2], rk = cp[4 * g + 3];
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
      }
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
