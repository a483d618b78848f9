// relu(max_pool2d(x, 2)) in one pass over x [..., H, W], and its backward (a scatter of grad_out
// to the recorded window positions). PyTorch's NCHW max_pool2d runs at several ns per element on
// CPUs; this is bound by memory, as ReLU alone is.
#include "../common.h"

namespace meta_kernels {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> max_pool2x2_relu(const at::Tensor& x_in) {
  check_max_pool2x2_relu_args(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-2), W = x.size(-1), Ho = H / 2, Wo = W / 2;
  const int64_t planes = x.numel() / (H * W);
  const auto out_shape = with_last_two(x.sizes(), Ho, Wo);
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor index = at::empty(out_shape, x.options().dtype(at::kChar));
  MK_DISPATCH_FLOATING(x.scalar_type(), "max_pool2x2_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int8_t* ip = index.data_ptr<int8_t>();
    // One task per output row; rows are independent.
    at::parallel_for(0, planes * Ho, std::max<int64_t>(1, 4096 / std::max<int64_t>(Wo, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / Ho, i = r - plane * Ho;
        const scalar_t* top = xp + (plane * H + 2 * i) * W;
        const scalar_t* bottom = top + W;
        scalar_t* o = op + r * Wo;
        int8_t* k = ip + r * Wo;
        // Branch-free, so the compiler vectorises it. First maximum wins ties; a NaN wins and
        // propagates (as max_pool2d and relu do): v != v is the NaN test.
_Pragma("omp simd")
        for (int64_t j = 0; j < Wo; ++j) {
          const opmath_t a = static_cast<opmath_t>(top[2 * j]), b = static_cast<opmath_t>(top[2 * j + 1]);
          const opmath_t c = static_cast<opmath_t>(bottom[2 * j]), d = static_cast<opmath_t>(bottom[2 * j + 1]);
          const bool tb = (b > a) | ((b != b) & (a == a));
          opmath_t m = tb ? b : a;
          int32_t at = tb ? 1 : 0;
          const bool tc = (c > m) | ((c != c) & (m == m));
          m = tc ? c : m;
          at = tc ? 2 : at;
          const bool td = (d > m) | ((d != d) & (m == m));
          m = td ? d : m;
          at = td ? 3 : at;
          const bool keep = (m > opmath_t(0)) | (m != m);
          o[j] = static_cast<scalar_t>(keep ? m : opmath_t(0));
          k[j] = static_cast<int8_t>(keep ? at : -1);
        }
      }
    });
  });
  return {out, index};
}

at::Tensor max_pool2x2_relu_backward(const at::Tensor& grad_out_in, const at::Tensor& index_in, int64_t height,
                                     int64_t width) {
  check_max_pool2x2_relu_backward_args(grad_out_in, index_in, height, width);
  const at::Tensor go = grad_out_in.contiguous(), index = index_in.contiguous();
  const int64_t H = height, W = width, Ho = go.size(-2), Wo = go.size(-1);
  const int64_t planes = Ho * Wo ? go.numel() / (Ho * Wo) : 0;
  const auto shape = with_last_two(go.sizes(), H, W);
  // Every pooled window is written whole; only a dropped odd row / column needs zeros first.
  at::Tensor grad_x = (H % 2 || W % 2) ? at::zeros(shape, go.options()) : at::empty(shape, go.options());
  MK_DISPATCH_FLOATING(go.scalar_type(), "max_pool2x2_relu_backward_cpu", [&] {
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    scalar_t* xp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, planes * Ho, std::max<int64_t>(1, 4096 / std::max<int64_t>(Wo, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / Ho, i = r - plane * Ho;
        scalar_t* top = xp + (plane * H + 2 * i) * W;
        scalar_t* bottom = top + W;
        const scalar_t* g = gp + r * Wo;
        const int8_t* k = ip + r * Wo;
_Pragma("omp simd")
        for (int64_t j = 0; j < Wo; ++j) {
          const scalar_t zero(0);
          top[2 * j] = k[j] == 0 ? g[j] : zero;
          top[2 * j + 1] = k[j] == 1 ? g[j] : zero;
          bottom[2 * j] = k[j] == 2 ? g[j] : zero;
          bottom[2 * j + 1] = k[j] == 3 ? g[j] : zero;
        }
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("max_pool2x2_relu", &max_pool2x2_relu);
  m.impl("max_pool2x2_relu_backward", &max_pool2x2_relu_backward);
}

}  // namespace cpu
}  // namespace meta_kernels
