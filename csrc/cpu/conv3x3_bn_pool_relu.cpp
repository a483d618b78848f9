// Conv4's input block -- conv 3x3 (padding 1, groups), batch norm with batch statistics,
// relu(max_pool2d(., 2)) -- in one op for layers with few input channels per group (Omniglot 1,
// mini-ImageNet 3), where the dense conv output is 64x larger than the input and every pass over
// it is bound by memory.
//
// The statistics come from the moments of each group's K = 9 * C_in patch entries: over all
// M = N * H * W positions, with pbar the mean patch and C the centred Gram matrix (in double),
//   mean = w . pbar + bias,   var = w' C w / M,
// so the conv runs once, row by row, straight into the normalisation and the pooling. The
// backward needs the input only at the pooled maxima (the only places grad_out reaches): with
// pc = patch - pbar there, V = sum(g * pc) and S = sum(g) per channel (patch_sums), and the
// gradients of weight, gamma and beta are small [C_out, K] formulas in V, S, w and C (written in
// Python, so that autograd differentiates them again for MAML). patch_gather is patch_sums'
// adjoint: u . pc + c at each kept maximum.
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
  Geometry(const at::Tensor& x, int64_t groups, int64_t out_channels)
      : N(x.size(0)), G(groups), Cin(x.size(1) / groups), C(out_channels / groups), H(x.size(2)), W(x.size(3)),
        Ho(x.size(2) / 2), Wo(x.size(3) / 2), K(9 * (x.size(1) / groups)) {}
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

// Pooled rows i .. i + R - 1, windows j .. j + 7, of one output plane: conv rows 2i .. 2i + 2R - 1
// over 16 columns, normalised and pooled. R = 2 runs 8 independent FMA chains (the 9-tap sums of
// R = 1 wait on FMA latency). src points at input row 2i, column 2j of the plane's padded group.
template <int R>
MK_AVX2 void forward_chunk(const float* src, int64_t Wp, int64_t K, const int64_t* tap, const f8* wv, f8 mu, f8 scale,
                           f8 shift, float* out, int8_t* index, int64_t Wo) {
  f8 acc[R][4] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* p = src + tap[k];
    for (int r = 0; r < R; ++r, p += 2 * Wp) {
      acc[r][0] += wv[k] * load(p);
      acc[r][1] += wv[k] * load(p + 8);
      acc[r][2] += wv[k] * load(p + Wp);
      acc[r][3] += wv[k] * load(p + Wp + 8);
    }
  }
  for (int r = 0; r < R; ++r)
    pool8((acc[r][0] - mu) * scale + shift, (acc[r][1] - mu) * scale + shift, (acc[r][2] - mu) * scale + shift,
          (acc[r][3] - mu) * scale + shift, out + r * Wo, index + r * Wo);
}

// One output plane (sample, channel) of the forward. xp points at the padded input of the plane's group.
__attribute__((target("avx2,fma"))) void forward_plane(const float* xp, const Geometry& geo, const float* w,
                                                       float mu, float scale, float shift, float* out, int8_t* index) {
  const int64_t Wp = geo.W + 2, Wo = geo.Wo;
  const f8 zero = {};
  int64_t tap[kMaxK];
  f8 wv[kMaxK];
  for (int64_t k = 0; k < geo.K; ++k) tap[k] = geo.patch_offset(0, 0, k), wv[k] = zero + w[k];
  for (int64_t i = 0; i < geo.Ho; i += 2) {
    for (int64_t j0 = 0; j0 < Wo; j0 += 8) {
      const int64_t j = chunk_start(j0, Wo);
      const float* src = xp + 2 * i * Wp + 2 * j;
      if (i + 1 < geo.Ho)
        forward_chunk<2>(src, Wp, geo.K, tap, wv, zero + mu, zero + scale, zero + shift, out + i * Wo + j,
                         index + i * Wo + j, Wo);
      else
        forward_chunk<1>(src, Wp, geo.K, tap, wv, zero + mu, zero + scale, zero + shift, out + i * Wo + j,
                         index + i * Wo + j, Wo);
    }
  }
}

// patch_sums over pooled rows i .. i + R - 1, windows j .. j + 7 (lanes where `use` is set): g
// routed to the maxima, then sum(g) and sum(g * pc_k) for every tap k over the positions.
template <int R>
MK_AVX2 void patch_sums_chunk(const float* src, int64_t Wp, int64_t K, const int64_t* tap, const f8* pv,
                              const float* grad_out, const int8_t* index, int64_t Wo, i8 use, f8& acc_g, f8* acc_pc) {
  f8 g[R][4];  // g on the top (0 1) and bottom (2 3) rows of the 16 columns
  for (int r = 0; r < R; ++r) {
    route8(load(grad_out + r * Wo), index + r * Wo, use, g[r][0], g[r][1], g[r][2], g[r][3]);
    acc_g += g[r][0] + g[r][1] + g[r][2] + g[r][3];
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* p = src + tap[k];
    f8 sum = acc_pc[k];
    for (int r = 0; r < R; ++r, p += 2 * Wp)
      sum += g[r][0] * (load(p) - pv[k]) + g[r][1] * (load(p + 8) - pv[k]) + g[r][2] * (load(p + Wp) - pv[k]) +
             g[r][3] * (load(p + Wp + 8) - pv[k]);
    acc_pc[k] = sum;
  }
}

// One plane's (sample, channel) share of patch_sums.
__attribute__((target("avx2,fma"))) void patch_sums_plane(const float* xp, const Geometry& geo, const float* pbar,
                                                          const float* grad_out, const int8_t* index, double& sum_g,
                                                          double* sum_pc) {
  const int64_t Wp = geo.W + 2, Wo = geo.Wo;
  const f8 zero = {};
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  f8 acc_g = zero, acc_pc[kMaxK], pv[kMaxK];
  int64_t tap[kMaxK];
  for (int64_t k = 0; k < geo.K; ++k) acc_pc[k] = zero, pv[k] = zero + pbar[k], tap[k] = geo.patch_offset(0, 0, k);
  for (int64_t i = 0; i < geo.Ho; i += 2) {
    for (int64_t j0 = 0; j0 < Wo; j0 += 8) {
      const int64_t j = chunk_start(j0, Wo);
      const i8 use = lane >= (i8{} + int32_t(j0 - j));  // windows before j0 belong to the previous chunk
      const float* src = xp + 2 * i * Wp + 2 * j;
      if (i + 1 < geo.Ho)
        patch_sums_chunk<2>(src, Wp, geo.K, tap, pv, grad_out + i * Wo + j, index + i * Wo + j, Wo, use, acc_g, acc_pc);
      else
        patch_sums_chunk<1>(src, Wp, geo.K, tap, pv, grad_out + i * Wo + j, index + i * Wo + j, Wo, use, acc_g, acc_pc);
    }
  }
  auto total = [](const f8& v) {  // by reference: no vector-ABI note from GCC
    double s = 0;
    for (int l = 0; l < 8; ++l) s += v[l];
    return s;
  };
  sum_g += total(acc_g);
  for (int64_t k = 0; k < geo.K; ++k) sum_pc[k] += total(acc_pc[k]);
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
bool vector_patch_sums_plane(const opmath_t*, const Geometry&, const opmath_t*, const opmath_t*, const int8_t*, double&,
                             double*) {
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
bool vector_patch_sums_plane<float>(const float* xp, const Geometry& geo, const float* pbar, const float* grad_out,
                                    const int8_t* index, double& sum_g, double* sum_pc) {
  vec::patch_sums_plane(xp, geo, pbar, grad_out, index, sum_g, sum_pc);
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv3x3_bn_pool_relu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& gamma_in, const at::Tensor& beta_in, int64_t groups, double eps) {
  check_conv3x3_bn_pool_relu_args(x_in, weight_in, bias_in, gamma_in, beta_in, groups);
  const Geometry geo(x_in, groups, weight_in.size(0));
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

std::tuple<at::Tensor, at::Tensor> conv3x3_bn_pool_relu_moments(const at::Tensor& x_in, int64_t groups) {
  check_patch_input_args(x_in, groups);
  const Geometry geo(x_in, groups, groups);
  const int64_t K = geo.K;
  at::Tensor moments;
  MK_DISPATCH_FLOATING(x_in.scalar_type(), "conv3x3_bn_pool_relu_moments_cpu", [&] {
    moments = patch_moments<at::opmath_type<scalar_t>>(padded_input(x_in), geo);
  });
  return {moments.narrow(1, 0, K).clone(), moments.narrow(1, K, K * K).reshape({geo.G, K, K}).clone()};
}

// The kept windows' patch entries of plane (n, o), centred: visit(q, g_q or 0, pc[K]).
template <typename opmath_t, typename Visit>
inline void for_each_kept_max(const opmath_t* xpp, const Geometry& geo, int64_t n, int64_t g, const int8_t* index,
                              const opmath_t* pbar, Visit&& visit) {
  const int64_t Wp = geo.W + 2;
  int64_t offset[kMaxK];
  for (int64_t k = 0; k < geo.K; ++k) offset[k] = geo.patch_offset(n, g, k);
  for (int64_t q = 0; q < geo.Ho * geo.Wo; ++q) {
    const int8_t at = index[q];
    if (at < 0) continue;
    const int64_t pos = (2 * (q / geo.Wo) + (at >> 1)) * Wp + 2 * (q % geo.Wo) + (at & 1);
    opmath_t pc[kMaxK];
    for (int64_t k = 0; k < geo.K; ++k) pc[k] = xpp[offset[k] + pos] - pbar[k];
    visit(q, pc);
  }
}

std::tuple<at::Tensor, at::Tensor> conv3x3_bn_pool_relu_patch_sums(const at::Tensor& grad_out_in,
                                                                   const at::Tensor& index_in, const at::Tensor& x_in,
                                                                   const at::Tensor& pbar_in, int64_t groups) {
  check_patch_pooled_args(grad_out_in, index_in, x_in, pbar_in, groups);
  const Geometry geo(x_in, groups, grad_out_in.size(1));
  const auto stat_dtype = math_dtype(x_in.scalar_type());
  const int64_t OC = grad_out_in.size(1), K = geo.K, plane_size = geo.Ho * geo.Wo;
  const at::Tensor xp = padded_input(x_in);
  const at::Tensor go = grad_out_in.to(stat_dtype).contiguous(), index = index_in.contiguous();
  const at::Tensor pbar = pbar_in.to(stat_dtype).contiguous();
  at::Tensor sum_pc = at::empty({OC, K}, x_in.options().dtype(at::kDouble));
  at::Tensor sum_g = at::empty({OC}, x_in.options().dtype(at::kDouble));
  MK_DISPATCH_FLOATING(x_in.scalar_type(), "conv3x3_bn_pool_relu_patch_sums_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* xpp = xp.const_data_ptr<opmath_t>();
    const opmath_t* gop = go.const_data_ptr<opmath_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    const opmath_t* pb = pbar.const_data_ptr<opmath_t>();
    double* spc = sum_pc.data_ptr<double>();
    double* sg = sum_g.data_ptr<double>();
    const bool vectorised = vector_path(geo);
    at::parallel_for(0, OC, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o) {
        const int64_t g = o / geo.C;
        double total_g = 0, total_pc[kMaxK] = {};
        for (int64_t n = 0; n < geo.N; ++n) {
          const int64_t plane = (n * OC + o) * plane_size;
          if (vectorised && vector_patch_sums_plane(xpp + geo.patch_offset(n, g, 0), geo, pb + g * K, gop + plane,
                                                    ip + plane, total_g, total_pc))
            continue;
          for_each_kept_max(xpp, geo, n, g, ip + plane, pb + g * K, [&](int64_t q, const opmath_t* pc) {
            const double gy = gop[plane + q];
            total_g += gy;
            for (int64_t k = 0; k < K; ++k) total_pc[k] += gy * pc[k];
          });
        }
        sg[o] = total_g;
        for (int64_t k = 0; k < K; ++k) spc[o * K + k] = total_pc[k];
      }
    });
  });
  return {sum_pc, sum_g};
}

at::Tensor conv3x3_bn_pool_relu_patch_gather(const at::Tensor& u_in, const at::Tensor& c_in, const at::Tensor& index_in,
                                             const at::Tensor& x_in, const at::Tensor& pbar_in, int64_t groups) {
  check_patch_pooled_args(index_in, index_in, x_in, pbar_in, groups);
  const Geometry geo(x_in, groups, index_in.size(1));
  const int64_t OC = index_in.size(1), K = geo.K, plane_size = geo.Ho * geo.Wo;
  TORCH_CHECK_VALUE(u_in.dim() == 2 && u_in.size(0) == OC && u_in.size(1) == K && c_in.dim() == 1 && c_in.size(0) == OC,
                    "u must be [", OC, ", ", K, "] and c [", OC, "], got ", u_in.sizes(), " and ", c_in.sizes());
  TORCH_CHECK_VALUE(u_in.device() == x_in.device() && c_in.device() == x_in.device(), "u and c must be on ", x_in.device());
  const auto stat_dtype = math_dtype(x_in.scalar_type());
  const at::Tensor xp = padded_input(x_in), index = index_in.contiguous();
  const at::Tensor u = u_in.to(stat_dtype).contiguous(), c = c_in.to(stat_dtype).contiguous();
  const at::Tensor pbar = pbar_in.to(stat_dtype).contiguous();
  at::Tensor out = at::zeros({geo.N, OC, geo.Ho, geo.Wo}, x_in.options());
  MK_DISPATCH_FLOATING(x_in.scalar_type(), "conv3x3_bn_pool_relu_patch_gather_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* xpp = xp.const_data_ptr<opmath_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    const opmath_t* up = u.const_data_ptr<opmath_t>();
    const opmath_t* cp = c.const_data_ptr<opmath_t>();
    const opmath_t* pb = pbar.const_data_ptr<opmath_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, geo.N * OC, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t plane = lo; plane < hi; ++plane) {
        const int64_t n = plane / OC, o = plane % OC, g = o / geo.C;
        const opmath_t* uo = up + o * K;
        for_each_kept_max(xpp, geo, n, g, ip + plane * plane_size, pb + g * K, [&](int64_t q, const opmath_t* pc) {
          opmath_t v = cp[o];
          for (int64_t k = 0; k < K; ++k) v += uo[k] * pc[k];
          op[plane * plane_size + q] = static_cast<scalar_t>(v);
        });
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("conv3x3_bn_pool_relu", &conv3x3_bn_pool_relu);
  m.impl("conv3x3_bn_pool_relu_moments", &conv3x3_bn_pool_relu_moments);
  m.impl("conv3x3_bn_pool_relu_patch_sums", &conv3x3_bn_pool_relu_patch_sums);
  m.impl("conv3x3_bn_pool_relu_patch_gather", &conv3x3_bn_pool_relu_patch_gather);
}

}  // namespace cpu
}  // namespace meta_kernels
