// Conv4's input block -- conv 3x3 (padding 1, groups), batch norm with batch statistics,
// relu(max_pool2d(., 2)) -- in one op for layers with few input channels per group (Omniglot 1,
// mini-ImageNet 3), where the dense conv output is 64x larger than the input and every pass over
// it is bound by memory.
//
// The statistics come from the moments of each group's K = 9 * C_in patch entries: over all
// M = N * H * W positions, with pbar the mean patch and C the centred Gram matrix (in double),
//   mean = w . pbar + bias,   var = w' C w / M,
// so the conv runs once, row by row, straight into the normalisation and the pooling. The
// backward needs the conv output only at the pooled maxima (the only places grad_out reaches):
// with a = gamma * rstd, gy the pooled gradient routed to the maxima, pc = patch - pbar,
//   d beta = sum(gy),  d gamma = rstd * sum(gy * w . pc),
//   d w = a * sum(gy * pc) - a * rstd^2 * sum(gy * w . pc) / M * C w.
// (The conv bias cancels in the normalisation: its gradient is zero.)
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "pool_window.h"

namespace meta_kernels {
namespace cpu {
namespace {

constexpr int64_t kMaxK = 9 * kConvBnPoolMaxInChannels;

struct Geometry {
  int64_t N, G, Cin, C, H, W, Ho, Wo, K;
  Geometry(const at::Tensor& x, const at::Tensor& weight, int64_t groups)
      : N(x.size(0)), G(groups), Cin(weight.size(1)), C(weight.size(0) / groups), H(x.size(2)), W(x.size(3)),
        Ho(x.size(2) / 2), Wo(x.size(3) / 2), K(9 * weight.size(1)) {}
  int64_t M() const { return N * H * W; }
  // Offset of patch entry k = (ci, dh, dw) at position (0, 0) of sample n, group g, in the padded input.
  int64_t patch_offset(int64_t n, int64_t g, int64_t k) const {
    const int64_t ci = k / 9, dh = (k % 9) / 3, dw = k % 3;
    return ((n * G + g) * Cin + ci) * (H + 2) * (W + 2) + dh * (W + 2) + dw;
  }
};

// x zero-padded by one on each side, in the compute dtype: the taps need no bounds checks.
at::Tensor padded_input(const at::Tensor& x) {
  return at::constant_pad_nd(x.to(math_dtype(x.scalar_type())), {1, 1, 1, 1}).contiguous();
}

// Per group: the mean patch pbar [K] and the centred Gram matrix C [K, K] of the patches over all
// N * H * W positions, in double: [G, K + K * K].
template <typename opmath_t>
at::Tensor patch_moments(const at::Tensor& xp, const Geometry& geo) {
  const int64_t K = geo.K, Wp = geo.W + 2, pairs = K * (K + 1) / 2, width = K + pairs;
  // Sums per (sample, group), reduced over samples afterwards: no shared accumulators.
  at::Tensor part = at::empty({geo.G, geo.N, width}, xp.options().dtype(at::kDouble));
  const opmath_t* src = xp.const_data_ptr<opmath_t>();
  double* pp = part.data_ptr<double>();
  at::parallel_for(0, geo.G * geo.N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t gn = lo; gn < hi; ++gn) {
      const int64_t g = gn / geo.N, n = gn % geo.N;
      double* acc = pp + gn * width;
      for (int64_t i = 0; i < width; ++i) acc[i] = 0;
      const opmath_t* base[kMaxK];
      for (int64_t k = 0; k < K; ++k) base[k] = src + geo.patch_offset(n, g, k);
      for (int64_t h = 0; h < geo.H; ++h) {
        int64_t pair = K;
        for (int64_t i = 0; i < K; ++i) {
          const opmath_t* a = base[i] + h * Wp;
          double s = 0;
_Pragma("omp simd reduction(+ : s)")
          for (int64_t w = 0; w < geo.W; ++w) s += static_cast<double>(a[w]);
          acc[i] += s;
          for (int64_t j = i; j < K; ++j, ++pair) {
            const opmath_t* b = base[j] + h * Wp;
            double p = 0;
_Pragma("omp simd reduction(+ : p)")
            for (int64_t w = 0; w < geo.W; ++w) p += static_cast<double>(a[w]) * static_cast<double>(b[w]);
            acc[pair] += p;
          }
        }
      }
    }
  });
  at::Tensor sums = part.sum(1);  // [G, width]
  at::Tensor moments = at::empty({geo.G, K + K * K}, sums.options());
  const double* sp = sums.const_data_ptr<double>();
  double* mp = moments.data_ptr<double>();
  const double M = static_cast<double>(geo.M());
  for (int64_t g = 0; g < geo.G; ++g) {
    const double* s = sp + g * width;
    double* out = mp + g * (K + K * K);
    for (int64_t i = 0; i < K; ++i) out[i] = s[i] / M;
    int64_t pair = K;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = i; j < K; ++j, ++pair) {
        const double c = s[pair] - s[i] * s[j] / M;
        out[K + i * K + j] = out[K + j * K + i] = c;
      }
  }
  return moments;
}

// One conv output row (row h of sample n, output channel with weights w and group g) into `row`.
template <typename opmath_t>
inline void conv_row(const opmath_t* xp, const Geometry& geo, int64_t n, int64_t g, int64_t h, const opmath_t* w,
                     opmath_t* row) {
  const int64_t Wp = geo.W + 2;
  for (int64_t x = 0; x < geo.W; ++x) row[x] = 0;
  for (int64_t k = 0; k < geo.K; ++k) {
    const opmath_t* src = xp + geo.patch_offset(n, g, k) + h * Wp;
    const opmath_t wk = w[k];
_Pragma("omp simd")
    for (int64_t x = 0; x < geo.W; ++x) row[x] += wk * src[x];
  }
}

#ifdef MK_POOL_AVX2
namespace vec {
using namespace avx2;

// Start of the 8-window chunk after `j0` (or Wo when done); the last chunk ends at Wo and may
// overlap the one before (needs Wo >= 8).
inline int64_t chunk_start(int64_t j0, int64_t Wo) { return std::min(j0, Wo - 8); }

// One output plane (sample, channel) of the forward: conv rows 2i, 2i + 1 over 16 columns at a
// time, normalised and pooled to 8 outputs. xp points at the padded input of the plane's group.
__attribute__((target("avx2,fma"))) void forward_plane(const float* xp, const Geometry& geo, const float* w,
                                                       float mu, float scale, float shift, float* out, int8_t* index) {
  const int64_t Wp = geo.W + 2;
  const f8 zero = {};
  int64_t tap[kMaxK];
  f8 wv[kMaxK];
  for (int64_t k = 0; k < geo.K; ++k) tap[k] = geo.patch_offset(0, 0, k), wv[k] = zero + w[k];
  for (int64_t i = 0; i < geo.Ho; ++i) {
    for (int64_t j0 = 0; j0 < geo.Wo; j0 += 8) {
      const int64_t j = chunk_start(j0, geo.Wo);
      const float* src = xp + 2 * i * Wp + 2 * j;
      f8 t0 = zero, t1 = zero, b0 = zero, b1 = zero;
      for (int64_t k = 0; k < geo.K; ++k) {
        const float* p = src + tap[k];
        const f8 wk = wv[k];
        t0 += wk * load(p);
        t1 += wk * load(p + 8);
        b0 += wk * load(p + Wp);
        b1 += wk * load(p + Wp + 8);
      }
      pool8((t0 - mu) * scale + shift, (t1 - mu) * scale + shift, (b0 - mu) * scale + shift,
            (b1 - mu) * scale + shift, out + i * geo.Wo + j, index + i * geo.Wo + j);
    }
  }
}

// One plane's share of the backward sums: gy routed to the maxima, then over all positions of the
// pooled rows sum(gy), sum(gy * hc) with hc = w . pc, and sum(gy * pc_k) for every tap k.
__attribute__((target("avx2,fma"))) void backward_plane(const float* xp, const Geometry& geo, const float* w,
                                                        const float* pbar, const float* grad_out,
                                                        const int8_t* index, double& sum_go, double& sum_go_hc,
                                                        double* sum_go_pc) {
  const int64_t Wp = geo.W + 2;
  const f8 zero = {};
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  f8 acc_go = zero, acc_hc = zero, acc_pc[kMaxK], wv[kMaxK], pv[kMaxK];
  int64_t tap[kMaxK];
  for (int64_t k = 0; k < geo.K; ++k)
    acc_pc[k] = zero, wv[k] = zero + w[k], pv[k] = zero + pbar[k], tap[k] = geo.patch_offset(0, 0, k);
  for (int64_t i = 0; i < geo.Ho; ++i) {
    for (int64_t j0 = 0; j0 < geo.Wo; j0 += 8) {
      const int64_t j = chunk_start(j0, geo.Wo);
      f8 g0, g1, g2, g3;  // gy on the top (g0 g1) and bottom (g2 g3) rows of the 16 columns
      // Windows before j0 belong to the previous chunk: counted once.
      route8(load(grad_out + i * geo.Wo + j), index + i * geo.Wo + j, lane >= (i8{} + int32_t(j0 - j)), g0, g1, g2, g3);
      const float* src = xp + 2 * i * Wp + 2 * j;
      f8 h0 = zero, h1 = zero, h2 = zero, h3 = zero;
      for (int64_t k = 0; k < geo.K; ++k) {
        const float* p = src + tap[k];
        const f8 pk = pv[k], wk = wv[k];
        const f8 p0 = load(p) - pk, p1 = load(p + 8) - pk, p2 = load(p + Wp) - pk, p3 = load(p + Wp + 8) - pk;
        acc_pc[k] += g0 * p0 + g1 * p1 + g2 * p2 + g3 * p3;
        h0 += wk * p0;
        h1 += wk * p1;
        h2 += wk * p2;
        h3 += wk * p3;
      }
      acc_go += g0 + g1 + g2 + g3;
      acc_hc += g0 * h0 + g1 * h1 + g2 * h2 + g3 * h3;
    }
  }
  auto total = [](f8 v) {
    double s = 0;
    for (int l = 0; l < 8; ++l) s += v[l];
    return s;
  };
  sum_go += total(acc_go);
  sum_go_hc += total(acc_hc);
  for (int64_t k = 0; k < geo.K; ++k) sum_go_pc[k] += total(acc_pc[k]);
}

}  // namespace vec
#endif

// float32 planes of >= 8 windows per row take the vector code where the CPU has AVX2 + FMA.
bool vector_path(const Geometry& geo) {
#ifdef MK_POOL_AVX2
  return geo.Wo >= 8 && avx2::available();
#else
  return false;
#endif
}

template <typename scalar_t, typename opmath_t>
bool vector_forward_plane(const opmath_t*, const Geometry&, const opmath_t*, opmath_t, opmath_t, opmath_t, scalar_t*,
                          int8_t*) {
  return false;
}

template <typename opmath_t>
bool vector_backward_plane(const opmath_t*, const Geometry&, const opmath_t*, const opmath_t*, const opmath_t*,
                           const int8_t*, double&, double&, double*) {
  return false;
}

#ifdef MK_POOL_AVX2
template <>
bool vector_forward_plane<float, float>(const float* xp, const Geometry& geo, const float* w, float mu, float scale,
                                        float shift, float* out, int8_t* index) {
  vec::forward_plane(xp, geo, w, mu, scale, shift, out, index);
  return true;
}

template <>
bool vector_backward_plane<float>(const float* xp, const Geometry& geo, const float* w, const float* pbar,
                                  const float* grad_out, const int8_t* index, double& sum_go, double& sum_go_hc,
                                  double* sum_go_pc) {
  vec::backward_plane(xp, geo, w, pbar, grad_out, index, sum_go, sum_go_hc, sum_go_pc);
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv3x3_bn_pool_relu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& gamma_in, const at::Tensor& beta_in, int64_t groups, double eps) {
  check_conv3x3_bn_pool_relu_args(x_in, weight_in, bias_in, gamma_in, beta_in, groups);
  const Geometry geo(x_in, weight_in, groups);
  const auto stat_dtype = math_dtype(x_in.scalar_type());
  const int64_t OC = geo.G * geo.C;
  const at::Tensor xp = padded_input(x_in);
  const at::Tensor w = weight_in.to(stat_dtype).contiguous();
  const at::Tensor gamma = gamma_in.to(stat_dtype).contiguous(), beta = beta_in.to(stat_dtype).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(stat_dtype).contiguous() : at::zeros({OC}, w.options());
  at::Tensor out = at::empty({geo.N, OC, geo.Ho, geo.Wo}, x_in.options());
  at::Tensor index = at::empty({geo.N, OC, geo.Ho, geo.Wo}, x_in.options().dtype(at::kChar));
  at::Tensor mean = at::empty({OC}, w.options()), rstd = at::empty({OC}, w.options());
  MK_DISPATCH_FLOATING(x_in.scalar_type(), "conv3x3_bn_pool_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::Tensor moments = patch_moments<opmath_t>(xp, geo);
    const double* mom = moments.const_data_ptr<double>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* bp = bias.const_data_ptr<opmath_t>();
    opmath_t* meanp = mean.data_ptr<opmath_t>();
    opmath_t* rstdp = rstd.data_ptr<opmath_t>();
    // centre[o] = w . pbar, the conv output's mean without the bias (which the normalisation removes).
    std::vector<opmath_t> centre(OC);
    const int64_t K = geo.K;
    for (int64_t o = 0; o < OC; ++o) {
      const double* pbar = mom + (o / geo.C) * (K + K * K);
      const double* cov = pbar + K;
      const opmath_t* wo = wp + o * K;
      double mu = 0, var = 0;
      for (int64_t i = 0; i < K; ++i) {
        mu += static_cast<double>(wo[i]) * pbar[i];
        double ci = 0;
        for (int64_t j = 0; j < K; ++j) ci += cov[i * K + j] * static_cast<double>(wo[j]);
        var += static_cast<double>(wo[i]) * ci;
      }
      var = std::max(var / static_cast<double>(geo.M()), 0.0);
      centre[o] = static_cast<opmath_t>(mu);
      meanp[o] = static_cast<opmath_t>(mu + static_cast<double>(bp[o]));
      rstdp[o] = static_cast<opmath_t>(1.0 / std::sqrt(var + eps));
    }
    const opmath_t* xpp = xp.const_data_ptr<opmath_t>();
    const opmath_t* gp = gamma.const_data_ptr<opmath_t>();
    const opmath_t* betap = beta.const_data_ptr<opmath_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int8_t* ip = index.data_ptr<int8_t>();
    const bool vectorised = vector_path(geo);
    at::parallel_for(0, geo.N * OC, 1, [&](int64_t lo, int64_t hi) {
      std::vector<opmath_t> rows(2 * geo.W);
      opmath_t* top = rows.data();
      opmath_t* bottom = top + geo.W;
      for (int64_t plane = lo; plane < hi; ++plane) {
        const int64_t n = plane / OC, o = plane % OC, g = o / geo.C;
        const opmath_t* wo = wp + o * K;
        const opmath_t mu = centre[o], scale = gp[o] * rstdp[o], shift = betap[o];
        if (vectorised && vector_forward_plane(xpp + geo.patch_offset(n, g, 0), geo, wo, mu, scale, shift,
                                               op + plane * geo.Ho * geo.Wo, ip + plane * geo.Ho * geo.Wo))
          continue;
        for (int64_t i = 0; i < geo.Ho; ++i) {
          conv_row(xpp, geo, n, g, 2 * i, wo, top);
          conv_row(xpp, geo, n, g, 2 * i + 1, wo, bottom);
_Pragma("omp simd")
          for (int64_t x = 0; x < 2 * geo.W; ++x) rows[x] = (rows[x] - mu) * scale + shift;
          const int64_t at = (plane * geo.Ho + i) * geo.Wo;
          for (int64_t j = 0; j < geo.Wo; ++j) pool_window(top, bottom, j, op + at, ip + at);
        }
      }
    });
  });
  return {out, index, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_bn_pool_relu_backward(
    const at::Tensor& grad_out_in, const at::Tensor& index_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& gamma_in, const at::Tensor& rstd_in, int64_t groups) {
  check_conv3x3_bn_pool_relu_backward_args(grad_out_in, index_in, x_in, weight_in, gamma_in, rstd_in, groups);
  const Geometry geo(x_in, weight_in, groups);
  const auto stat_dtype = math_dtype(x_in.scalar_type());
  const int64_t OC = geo.G * geo.C, K = geo.K;
  const at::Tensor xp = padded_input(x_in);
  const at::Tensor go = grad_out_in.to(stat_dtype).contiguous(), index = index_in.contiguous();
  const at::Tensor w = weight_in.to(stat_dtype).contiguous();
  const at::Tensor gamma = gamma_in.to(stat_dtype).contiguous(), rstd = rstd_in.to(stat_dtype).contiguous();
  at::Tensor gw = at::empty({OC, K}, w.options());
  at::Tensor ggamma = at::empty({OC}, w.options()), gbeta = at::empty({OC}, w.options());
  MK_DISPATCH_FLOATING(x_in.scalar_type(), "conv3x3_bn_pool_relu_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::Tensor moments = patch_moments<opmath_t>(xp, geo);
    const double* mom = moments.const_data_ptr<double>();
    const opmath_t* xpp = xp.const_data_ptr<opmath_t>();
    const opmath_t* gop = go.const_data_ptr<opmath_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    const opmath_t* gp = gamma.const_data_ptr<opmath_t>();
    const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
    opmath_t* gwp = gw.data_ptr<opmath_t>();
    opmath_t* ggp = ggamma.data_ptr<opmath_t>();
    opmath_t* gbp = gbeta.data_ptr<opmath_t>();
    const int64_t Wp = geo.W + 2, plane_size = geo.Ho * geo.Wo;
    const bool vectorised = vector_path(geo);
    at::parallel_for(0, OC, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o) {
        const int64_t g = o / geo.C;
        const double* pbar = mom + g * (K + K * K);
        const double* cov = pbar + K;
        const opmath_t* wo = wp + o * K;
        opmath_t pb[kMaxK];
        for (int64_t k = 0; k < K; ++k) pb[k] = static_cast<opmath_t>(pbar[k]);
        // Sums over the maxima: gy, gy * (w . pc) and gy * pc.
        double sum_go = 0, sum_go_hc = 0, sum_go_pc[kMaxK] = {};
        for (int64_t n = 0; n < geo.N; ++n) {
          const int64_t plane = (n * OC + o) * plane_size;
          if (vectorised && vector_backward_plane(xpp + geo.patch_offset(n, g, 0), geo, wo, pb, gop + plane, ip + plane,
                                                  sum_go, sum_go_hc, sum_go_pc))
            continue;
          int64_t offset[kMaxK];
          for (int64_t k = 0; k < K; ++k) offset[k] = geo.patch_offset(n, g, k);
          for (int64_t q = 0; q < plane_size; ++q) {
            const int8_t at = ip[plane + q];
            const opmath_t gy = gop[plane + q];
            if (at < 0 || gy == opmath_t(0)) continue;
            const int64_t i = q / geo.Wo, j = q % geo.Wo;
            const int64_t pos = (2 * i + (at >> 1)) * Wp + 2 * j + (at & 1);
            opmath_t pc[kMaxK];
            opmath_t hc = 0;
            for (int64_t k = 0; k < K; ++k) {
              pc[k] = xpp[offset[k] + pos] - pb[k];
              hc += wo[k] * pc[k];
            }
            sum_go += gy;
            sum_go_hc += static_cast<double>(gy) * hc;
            for (int64_t k = 0; k < K; ++k) sum_go_pc[k] += static_cast<double>(gy) * pc[k];
          }
        }
        const double r = rp[o], a = static_cast<double>(gp[o]) * r;
        const double coef = a * r * r * sum_go_hc / static_cast<double>(geo.M());
        gbp[o] = static_cast<opmath_t>(sum_go);
        ggp[o] = static_cast<opmath_t>(sum_go_hc * r);
        for (int64_t k = 0; k < K; ++k) {
          double cw = 0;
          for (int64_t j = 0; j < K; ++j) cw += cov[k * K + j] * static_cast<double>(wo[j]);
          gwp[o * K + k] = static_cast<opmath_t>(a * sum_go_pc[k] - coef * cw);
        }
      }
    });
  });
  return {gw.view(weight_in.sizes()).to(weight_in.scalar_type()), ggamma.to(gamma_in.scalar_type()),
          gbeta.to(gamma_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("conv3x3_bn_pool_relu", &conv3x3_bn_pool_relu);
  m.impl("conv3x3_bn_pool_relu_backward", &conv3x3_bn_pool_relu_backward);
}

}  // namespace cpu
}  // namespace meta_kernels
