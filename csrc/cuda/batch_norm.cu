// Batch norm with statistics per (task, channel): x [T, N, C, *spatial], weight/bias [T, C].
//
// Layout: one launch, one block per (t, c) group (grid = T * C, blocks loop if it is larger than
// the grid cap), 64-512 threads by group size. Element m of a group (m < M = N * S) lives at
// ((t * N + n) * C + c) * S + s with n = m / S, s = m % S (a multiply-shift division for groups
// under 2^31 elements). Forward: two passes for the statistics (mean, then centred squares) each
// reduced with a fixed-order block reduction in the math type, then a third pass writing
// (x - mean) * (w * rstd) + b. Backward: one pass for sum(go) and sum(go * (x - mean)), then
// grad_x = a * go - k * (x - mean) - c0. Double backward: one pass for five sums of go, gg_x and
// x - mean, then d_grad_out and d_x elementwise. weight, bias, mean and rstd are read on the device in
// their own dtype and strides; grad_weight/grad_bias are written in weight's dtype.
#include <cmath>

#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

// n / d for n, d < 2^31 by a multiply and a shift (Granlund-Montgomery, as in ATen's IntDivider).
struct FastDiv32 {
  uint32_t d = 1, m1 = 0, shift = 0;
  FastDiv32() = default;
  explicit FastDiv32(uint32_t divisor) : d(divisor) {
    TORCH_INTERNAL_ASSERT(divisor >= 1 && divisor <= static_cast<uint32_t>(INT32_MAX));
    for (shift = 0; shift < 32; ++shift)
      if ((uint64_t(1) << shift) >= divisor) break;
    const uint64_t magic = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1;
    TORCH_INTERNAL_ASSERT(magic > 0 && magic <= UINT32_MAX);
    m1 = static_cast<uint32_t>(magic);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m1) + n) >> shift; }
};

// Offset of element m of a group relative to the group's first element.
template <bool kSmall>
struct GroupIndex {
  int64_t S;   // spatial size, >= 1
  int64_t CS;  // C * S: distance between samples
  FastDiv32 div;
  __device__ __forceinline__ int64_t operator()(int64_t m) const {
    if (kSmall) {
      const uint32_t mm = static_cast<uint32_t>(m);
      const uint32_t n = div.div(mm);
      return static_cast<int64_t>(n) * CS + static_cast<int64_t>(mm - n * static_cast<uint32_t>(S));
    }
    const int64_t n = m / S;
    return n * CS + (m - n * S);
  }
};

struct Geometry {
  int64_t T, N, C, S, M;
  explicit Geometry(const at::Tensor& x)
      : T(x.size(0)), N(x.size(1)), C(x.size(2)),
        S(x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1) * x.size(2))), M(x.size(1) * S) {}
  bool small() const { return M <= INT32_MAX && S <= INT32_MAX; }
  template <bool kSmall>
  GroupIndex<kSmall> index() const {
    GroupIndex<kSmall> gi;
    gi.S = std::max<int64_t>(S, 1);
    gi.CS = C * S;
    if (kSmall) gi.div = FastDiv32(static_cast<uint32_t>(gi.S));
    return gi;
  }
  // About 4+ elements per thread per pass, 64 to 512 threads.
  int threads() const {
    int t = 64;
    while (t < 512 && static_cast<int64_t>(t) * 4 < M) t *= 2;
    return t;
  }
};

template <typename scalar_t, bool kSmall>
__global__ void __launch_bounds__(512)
bn_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const ScalarRef w, const ScalarRef b,
                  at::opmath_type<scalar_t>* __restrict__ mean, at::opmath_type<scalar_t>* __restrict__ rstd,
                  const int64_t groups, const int64_t N, const int64_t C, const int64_t M,
                  const GroupIndex<kSmall> idx, const double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shm[32];
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t t = grp / C, c = grp - t * C;
    const int64_t base = (t * N * C + c) * idx.S;
    const scalar_t* xg = x + base;
    scalar_t* og = out + base;
    opmath_t v[1] = {0};
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) v[0] += static_cast<opmath_t>(xg[idx(m)]);
    block_sum(v, shm);
    const opmath_t mu = M > 0 ? v[0] / static_cast<opmath_t>(M) : opmath_t(0);
    v[0] = 0;
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
      const opmath_t d = static_cast<opmath_t>(xg[idx(m)]) - mu;
      v[0] += d * d;
    }
    block_sum(v, shm);
    const opmath_t var = M > 0 ? v[0] / static_cast<opmath_t>(M) : opmath_t(0);
    const opmath_t r = opmath_t(1) / dev_sqrt(var + static_cast<opmath_t>(eps));
    if (threadIdx.x == 0) {
      mean[grp] = mu;
      rstd[grp] = r;
    }
    // (x - mu) * scale + b rather than x * scale + shift: no cancellation when rstd is large.
    const opmath_t scale = static_cast<opmath_t>(w.load(t, c)) * r;
    const opmath_t shift = static_cast<opmath_t>(b.load(t, c));
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
      const int64_t o = idx(m);
      og[o] = static_cast<scalar_t>((static_cast<opmath_t>(xg[o]) - mu) * scale + shift);
    }
  }
}

template <typename scalar_t, bool kSmall>
__global__ void __launch_bounds__(512)
bn_backward_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x, scalar_t* __restrict__ gx,
                   const ScalarRef w, const ScalarRef mean, const ScalarRef rstd, const ScalarRef gmean,
                   const ScalarRef grstd, void* __restrict__ gw,
                   void* __restrict__ gb, const int out_code, const int64_t groups, const int64_t N, const int64_t C,
                   const int64_t M, const GroupIndex<kSmall> idx) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shm[64];
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t t = grp / C, c = grp - t * C;
    const int64_t base = (t * N * C + c) * idx.S;
    const scalar_t* xg = x + base;
    const scalar_t* gog = go + base;
    scalar_t* gxg = gx + base;
    const opmath_t mu = static_cast<opmath_t>(mean.load(t, c));
    const opmath_t r = static_cast<opmath_t>(rstd.load(t, c));
    opmath_t v[2] = {0, 0};  // sum(go), sum(go * (x - mean))
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
      const int64_t o = idx(m);
      const opmath_t d = static_cast<opmath_t>(gog[o]);
      v[0] += d;
      v[1] += d * (static_cast<opmath_t>(xg[o]) - mu);
    }
    block_sum(v, shm);
    const opmath_t sum_go = v[0], sum_go_xc = v[1];
    if (threadIdx.x == 0) {
      store_as(gb, out_code, grp, static_cast<double>(sum_go));
      store_as(gw, out_code, grp, static_cast<double>(sum_go_xc * r));
    }
    // grad_x = w r (go - mean(go) - xhat mean(go xhat)) = a go - k (x - mean) - c0; the statistics'
    // own gradients add grad_mean / M - grad_rstd r^3 (x - mean) / M.
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    const opmath_t a = static_cast<opmath_t>(w.load(t, c)) * r;
    const opmath_t k = (a * sum_go_xc + static_cast<opmath_t>(grstd.load(t, c)) * r) * r * r * inv_M;
    const opmath_t c0 = (a * sum_go - static_cast<opmath_t>(gmean.load(t, c))) * inv_M;
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
      const int64_t o = idx(m);
      gxg[o] = static_cast<scalar_t>(a * static_cast<opmath_t>(gog[o]) - k * (static_cast<opmath_t>(xg[o]) - mu) - c0);
    }
  }
}

// The double backward: one pass for five sums (xc = x - mean, u = gg_x), then d_grad_out and d_x.
template <typename scalar_t, bool kSmall>
__global__ void __launch_bounds__(512)
bn_double_backward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ go,
                          const scalar_t* __restrict__ x, scalar_t* __restrict__ d_go, scalar_t* __restrict__ d_x,
                          const ScalarRef gg_w, const ScalarRef gg_b, const ScalarRef w, const ScalarRef mean,
                          const ScalarRef rstd, at::opmath_type<scalar_t>* __restrict__ d_w,
                          at::opmath_type<scalar_t>* __restrict__ d_mean, at::opmath_type<scalar_t>* __restrict__ d_rstd,
                          const int64_t groups, const int64_t N, const int64_t C, const int64_t M,
                          const GroupIndex<kSmall> idx) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shm[5 * 32];
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t t = grp / C, c = grp - t * C;
    const int64_t base = (t * N * C + c) * idx.S;
    const opmath_t mu = static_cast<opmath_t>(mean.load(t, c));
    const opmath_t r = static_cast<opmath_t>(rstd.load(t, c));
    opmath_t v[5] = {0, 0, 0, 0, 0};  // sum(go), sum(go xc), sum(u), sum(u xc), sum(u go)
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
      const int64_t o = base + idx(m);
      const opmath_t d = static_cast<opmath_t>(go[o]);
      const opmath_t e = static_cast<opmath_t>(u[o]);
      const opmath_t xc = static_cast<opmath_t>(x[o]) - mu;
      v[0] += d;
      v[1] += d * xc;
      v[2] += e;
      v[3] += e * xc;
      v[4] += e * d;
    }
    block_sum(v, shm);
    const opmath_t inv_M = M > 0 ? opmath_t(1) / static_cast<opmath_t>(M) : opmath_t(0);
    const opmath_t wg = static_cast<opmath_t>(w.load(t, c));
    const opmath_t a = wg * r;
    const opmath_t B = v[0], W = v[1] * r, U = v[2], V = v[3] * r;
    const opmath_t cb = static_cast<opmath_t>(gg_b.load(t, c)) - a * U * inv_M;
    const opmath_t cw = static_cast<opmath_t>(gg_w.load(t, c)) - a * V * inv_M;
    const opmath_t d_a = v[4] - (B * U + W * V) * inv_M;
    const opmath_t k = a * W * inv_M;
    if (threadIdx.x == 0) {
      d_w[grp] = r * d_a;
      d_mean[grp] = -r * (cw * B - k * U);
      d_rstd[grp] = wg * d_a + cw * v[1] - k * v[3];
    }
    // d_go = cb + xhat cw + a u; d_x = r (cw go - k u).
    const opmath_t rcw = r * cw, rk = r * k;
    for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
      const int64_t o = base + idx(m);
      const opmath_t e = static_cast<opmath_t>(u[o]);
      d_go[o] = static_cast<scalar_t>(cb + (static_cast<opmath_t>(x[o]) - mu) * rcw + a * e);
      d_x[o] = static_cast<scalar_t>(rcw * static_cast<opmath_t>(go[o]) - rk * e);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                         const at::Tensor& bias_in, double eps) {
  check_batch_norm_forward_args(x_in, weight_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  const int64_t groups = geo.T * geo.C;
  if (groups == 0) return {out, mean, rstd};
  const ScalarSource w = scalar_source(weight_in);
  const ScalarSource b = scalar_source(bias_in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto run = [&](auto small) {
      constexpr bool kSmall = decltype(small)::value;
      bn_forward_kernel<scalar_t, kSmall><<<grid_for(groups), geo.threads(), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), w.ref, b.ref, mean.data_ptr<opmath_t>(),
          rstd.data_ptr<opmath_t>(), groups, geo.N, geo.C, geo.M, geo.index<kSmall>(), eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (geo.small()) run(std::true_type()); else run(std::false_type());
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                  const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in,
                                                                  const c10::optional<at::Tensor>& grad_mean_in,
                                                                  const c10::optional<at::Tensor>& grad_rstd_in) {
  check_batch_norm_backward_args(grad_out_in, x_in, weight_in, mean_in, rstd_in, grad_mean_in, grad_rstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor go = grad_out_in.to(x.scalar_type()).contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  // grad_weight / grad_bias are computed in the math type and written straight in weight's dtype
  // (the CPU kernel's .to(weight.dtype) after the fact); other weight dtypes go through a copy.
  int out_code = 0;
  const bool direct = dtype_code(weight_in.scalar_type(), &out_code);
  const auto gw_dtype = direct ? weight_in.scalar_type() : stat_dtype;
  if (!direct) dtype_code(stat_dtype, &out_code);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::empty({geo.T, geo.C}, x.options().dtype(gw_dtype));
  at::Tensor gb = at::empty({geo.T, geo.C}, x.options().dtype(gw_dtype));
  const int64_t groups = geo.T * geo.C;
  if (groups > 0) {
    const ScalarSource w = scalar_source(weight_in);
    const ScalarSource mean = scalar_source(mean_in);
    const ScalarSource rstd = scalar_source(rstd_in);
    // grad_mean / grad_rstd read in their own dtype and strides, zeros where not given.
    const auto stat_grad = [&](const c10::optional<at::Tensor>& t) {
      return scalar_source(t.has_value() ? *t : at::zeros({geo.T, geo.C}, x.options().dtype(stat_dtype)));
    };
    const ScalarSource gmean = stat_grad(grad_mean_in), grstd = stat_grad(grad_rstd_in);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_backward_cuda", [&] {
      auto run = [&](auto small) {
        constexpr bool kSmall = decltype(small)::value;
        bn_backward_kernel<scalar_t, kSmall><<<grid_for(groups), geo.threads(), 0, stream>>>(
            go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), w.ref, mean.ref,
            rstd.ref, gmean.ref, grstd.ref, gw.data_ptr(), gb.data_ptr(), out_code, groups, geo.N, geo.C, geo.M,
            geo.index<kSmall>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (geo.small()) run(std::true_type()); else run(std::false_type());
    });
  }
  if (!direct) return {gx, gw.to(weight_in.scalar_type()), gb.to(weight_in.scalar_type())};
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& gg_x_in, const at::Tensor& gg_w_in, const at::Tensor& gg_b_in, const at::Tensor& grad_out_in,
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  check_batch_norm_double_backward_args(gg_x_in, gg_w_in, gg_b_in, grad_out_in, x_in, weight_in, mean_in, rstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor go = grad_out_in.to(x.scalar_type()).contiguous();
  const at::Tensor u = gg_x_in.to(x.scalar_type()).contiguous();
  const Geometry geo(x);
  const auto stat_dtype = math_dtype(x.scalar_type());
  at::Tensor d_go = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor d_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor d_w = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor d_mean = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  at::Tensor d_rstd = at::empty({geo.T, geo.C}, x.options().dtype(stat_dtype));
  const int64_t groups = geo.T * geo.C;
  if (groups > 0) {
    const ScalarSource gg_w = scalar_source(gg_w_in);
    const ScalarSource gg_b = scalar_source(gg_b_in);
    const ScalarSource w = scalar_source(weight_in);
    const ScalarSource mean = scalar_source(mean_in);
    const ScalarSource rstd = scalar_source(rstd_in);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    MK_DISPATCH_FLOATING(x.scalar_type(), "batch_norm_double_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      auto run = [&](auto small) {
        constexpr bool kSmall = decltype(small)::value;
        bn_double_backward_kernel<scalar_t, kSmall><<<grid_for(groups), geo.threads(), 0, stream>>>(
            u.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            d_go.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(), gg_w.ref, gg_b.ref, w.ref, mean.ref, rstd.ref,
            d_w.data_ptr<opmath_t>(), d_mean.data_ptr<opmath_t>(), d_rstd.data_ptr<opmath_t>(), groups, geo.N, geo.C,
            geo.M, geo.index<kSmall>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (geo.small()) run(std::true_type()); else run(std::false_type());
    });
  }
  return {d_go, d_x, d_w.to(weight_in.scalar_type()), d_mean.to(mean_in.scalar_type()), d_rstd.to(rstd_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) {
  m.impl("batch_norm", &batch_norm);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_double_backward", &batch_norm_double_backward);
}

}  // namespace cuda
}  // namespace meta_kernels
