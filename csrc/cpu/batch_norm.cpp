// Batch norm with statistics per (task, channel): x [T, N, C, *spatial], weight/bias [T, C].
// One parallel pass over the T*C groups; each group reads its N contiguous spatial blocks.
#include <cmath>

#include "../common.h"

namespace meta_kernels {
namespace cpu {
namespace {

struct Geometry {
  int64_t T, N, C, S;
  explicit Geometry(const at::Tensor& x)
      : T(x.size(0)), N(x.size(1)), C(x.size(2)), S(x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1) * x.size(2))) {}
  // Offset of the spatial block of sample n in group (t, c).
  int64_t block(int64_t t, int64_t n, int64_t c) const { return ((t * N + n) * C + c) * S; }
};

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
    at::parallel_for(0, geo.T * geo.C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t t = g / geo.C, c = g % geo.C;
        // Two passes (mean, then centred squares) for accuracy; both stay in cache for small groups.
        opmath_t sum = 0;
        for (int64_t n = 0; n < geo.N; ++n) {
          const scalar_t* src = xp + geo.block(t, n, c);
_Pragma("omp simd reduction(+ : sum)")
          for (int64_t s = 0; s < geo.S; ++s) sum += static_cast<opmath_t>(src[s]);
        }
        const opmath_t mu = M > 0 ? sum / static_cast<opmath_t>(M) : opmath_t(0);
        opmath_t sq = 0;
        for (int64_t n = 0; n < geo.N; ++n) {
          const scalar_t* src = xp + geo.block(t, n, c);
_Pragma("omp simd reduction(+ : sq)")
          for (int64_t s = 0; s < geo.S; ++s) {
            const opmath_t d = static_cast<opmath_t>(src[s]) - mu;
            sq += d * d;
          }
        }
        const opmath_t var = M > 0 ? sq / static_cast<opmath_t>(M) : opmath_t(0);
        const opmath_t r = opmath_t(1) / std::sqrt(var + static_cast<opmath_t>(eps));
        mp[g] = mu;
        rp[g] = r;
        // (x - mu) * scale + b rather than x * scale + shift: no cancellation when rstd is large.
        const opmath_t scale = wp[g] * r, shift = bp[g];
        for (int64_t n = 0; n < geo.N; ++n) {
          const scalar_t* src = xp + geo.block(t, n, c);
          scalar_t* dst = op + geo.block(t, n, c);
_Pragma("omp simd")
          for (int64_t s = 0; s < geo.S; ++s)
            dst[s] = static_cast<scalar_t>((static_cast<opmath_t>(src[s]) - mu) * scale + shift);
        }
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
    at::parallel_for(0, geo.T * geo.C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t t = g / geo.C, c = g % geo.C;
        const opmath_t mu = mp[g], r = rp[g];
        opmath_t sum_go = 0, sum_go_xc = 0;  // xc = x - mean
        for (int64_t n = 0; n < geo.N; ++n) {
          const int64_t off = geo.block(t, n, c);
_Pragma("omp simd reduction(+ : sum_go, sum_go_xc)")
          for (int64_t s = 0; s < geo.S; ++s) {
            const opmath_t d = static_cast<opmath_t>(gop[off + s]);
            sum_go += d;
            sum_go_xc += d * (static_cast<opmath_t>(xp[off + s]) - mu);
          }
        }
        gbp[g] = sum_go;
        gwp[g] = sum_go_xc * r;
        // grad_x = w r (go - mean(go) - xhat mean(go xhat)) = a go - k (x - mean) - c0.
        const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
        const opmath_t a = wp[g] * r;
        const opmath_t k = a * r * r * sum_go_xc * inv_M;
        const opmath_t c0 = a * sum_go * inv_M;
        for (int64_t n = 0; n < geo.N; ++n) {
          const int64_t off = geo.block(t, n, c);
_Pragma("omp simd")
          for (int64_t s = 0; s < geo.S; ++s)
            gxp[off + s] = static_cast<scalar_t>(a * static_cast<opmath_t>(gop[off + s]) -
                                                 k * (static_cast<opmath_t>(xp[off + s]) - mu) - c0);
        }
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
    at::parallel_for(0, geo.T * geo.C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t t = g / geo.C, c = g % geo.C;
        const opmath_t mu = mp[g], r = rp[g];
        // One pass for the five sums (xc = x - mean, u = gg_x), one pass writing both outputs.
        opmath_t s_go = 0, s_go_xc = 0, s_u = 0, s_u_xc = 0, s_u_go = 0;
        for (int64_t n = 0; n < geo.N; ++n) {
          const int64_t off = geo.block(t, n, c);
_Pragma("omp simd reduction(+ : s_go, s_go_xc, s_u, s_u_xc, s_u_go)")
          for (int64_t s = 0; s < geo.S; ++s) {
            const opmath_t d = static_cast<opmath_t>(gop[off + s]);
            const opmath_t e = static_cast<opmath_t>(up[off + s]);
            const opmath_t xc = static_cast<opmath_t>(xp[off + s]) - mu;
            s_go += d;
            s_go_xc += d * xc;
            s_u += e;
            s_u_xc += e * xc;
            s_u_go += e * d;
          }
        }
        const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
        const opmath_t a = wp[g] * r;
        const opmath_t B = s_go, W = s_go_xc * r, U = s_u, V = s_u_xc * r;
        const opmath_t cb = ggbp[g] - a * U * inv_M, cw = ggwp[g] - a * V * inv_M;
        const opmath_t d_a = s_u_go - (B * U + W * V) * inv_M;
        const opmath_t k = a * W * inv_M;
        dwp[g] = r * d_a;
        dmp[g] = -r * (cw * B - k * U);
        drp[g] = wp[g] * d_a + cw * s_go_xc - k * s_u_xc;
        // d_go = cb + xhat cw + a u; d_x = r (cw go - k u).
        const opmath_t rcw = r * cw, rk = r * k;
        for (int64_t n = 0; n < geo.N; ++n) {
          const int64_t off = geo.block(t, n, c);
_Pragma("omp simd")
          for (int64_t s = 0; s < geo.S; ++s) {
            const opmath_t e = static_cast<opmath_t>(up[off + s]);
            dgop[off + s] = static_cast<scalar_t>(cb + (static_cast<opmath_t>(xp[off + s]) - mu) * rcw + a * e);
            dxp[off + s] = static_cast<scalar_t>(rcw * static_cast<opmath_t>(gop[off + s]) - rk * e);
          }
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
