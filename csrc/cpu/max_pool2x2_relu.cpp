// relu(max_pool2d(x, 2)) in one pass over x [..., H, W], and its backward (a scatter of grad_out
// to the recorded window positions). PyTorch's NCHW max_pool2d runs at several ns per element on
// CPUs; this is bound by memory, as ReLU alone is.
//
// Conv4's rows are short (W = 28, 14, 7, 3), too short for the compiler to vectorise a row loop
// and, written as scalar selects, full of mispredicted branches on random data. So float32 on
// x86-64 CPUs with AVX2 takes explicit 8-wide vectors (GCC / Clang vector extensions, compiled
// for AVX2 and picked at run time): rows of >= 8 outputs end with a vector that overlaps the
// previous one; shorter rows compute 8 lanes and let the spare lanes spill into the next rows,
// which rewrite them afterwards (so the last rows of each thread's range take the scalar path).
#include "../common.h"
#include "pool_window.h"


namespace meta_kernels {
namespace cpu {
namespace {

template <typename scalar_t>
inline void unpool_window(const scalar_t* grad_out, const int8_t* index, int64_t j, scalar_t* top, scalar_t* bottom) {
  const scalar_t zero(0);
  top[2 * j] = index[j] == 0 ? grad_out[j] : zero;
  top[2 * j + 1] = index[j] == 1 ? grad_out[j] : zero;
  bottom[2 * j] = index[j] == 2 ? grad_out[j] : zero;
  bottom[2 * j + 1] = index[j] == 3 ? grad_out[j] : zero;
}

// Output rows [r0, r1) of x [planes, H, W]: row r pools input rows 2i, 2i + 1 of its plane.
struct Rows {
  int64_t H, W, Ho, Wo;
  int64_t input_offset(int64_t r) const {
    const int64_t plane = r / Ho;
    return (plane * H + 2 * (r - plane * Ho)) * W;
  }
};

template <typename scalar_t>
void forward_rows_scalar(const scalar_t* x, scalar_t* out, int8_t* index, const Rows& g, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* top = x + g.input_offset(r);
    for (int64_t j = 0; j < g.Wo; ++j) pool_window(top, top + g.W, j, out + r * g.Wo, index + r * g.Wo);
  }
}

template <typename scalar_t>
void backward_rows_scalar(const scalar_t* grad_out, const int8_t* index, scalar_t* grad_x, const Rows& g, int64_t r0,
                          int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* top = grad_x + g.input_offset(r);
    for (int64_t j = 0; j < g.Wo; ++j) unpool_window(grad_out + r * g.Wo, index + r * g.Wo, j, top, top + g.W);
  }
}

#ifdef MK_POOL_AVX2
namespace vec {
using namespace avx2;

// Outputs j .. j + 7 of one row.
MK_AVX2 void pool_rows8(const float* top, const float* bottom, float* out, int8_t* index) {
  avx2::pool8(load(top), load(top + 8), load(bottom), load(bottom + 8), out, index);
}

// Inputs of outputs j .. j + 7: grad_out routed to the recorded positions (lanes >= `valid` give 0).
MK_AVX2 void unpool8(const float* grad_out, const int8_t* index, float* top, float* bottom, int valid) {
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  f8 t0, t1, b0, b1;
  route8(load(grad_out), index, lane < valid, t0, t1, b0, b1);
  store(top, t0);
  store(top + 8, t1);
  store(bottom, b0);
  store(bottom + 8, b1);
}

// Short rows (Wo < 8) read and write 8 outputs and 16 floats of each input row from the row's
// start: rows from the returned one on would reach past the range [r0, r1) -- into another
// thread's rows or past the tensor -- and take the scalar path.
int64_t vector_rows_end(const Rows& g, int64_t r0, int64_t r1) {
  if (g.Wo >= 8) return r1;
  const int64_t input_end = g.input_offset(r1 - 1) + 2 * g.W;
  int64_t r = r1;
  while (r > r0 && ((r - 1) * g.Wo + 8 > r1 * g.Wo || g.input_offset(r - 1) + g.W + 16 > input_end)) --r;
  return r;
}

__attribute__((target("avx2,fma"))) void forward_rows(const float* x, float* out, int8_t* index, const Rows& g, int64_t r0,
                                                  int64_t r1) {
  const int64_t W = g.W, Wo = g.Wo;
  const int64_t r_end = vector_rows_end(g, r0, r1);
  for (int64_t r = r0; r < r_end; ++r) {
    const float* top = x + g.input_offset(r);
    float* o = out + r * Wo;
    int8_t* k = index + r * Wo;
    if (Wo < 8) {
      pool_rows8(top, top + W, o, k);
      continue;
    }
    for (int64_t j = 0; j + 8 <= Wo; j += 8) pool_rows8(top + 2 * j, top + W + 2 * j, o + j, k + j);
    if (Wo % 8) pool_rows8(top + 2 * (Wo - 8), top + W + 2 * (Wo - 8), o + Wo - 8, k + Wo - 8);  // overlaps, same values
  }
  if (r_end < r1) forward_rows_scalar(x, out, index, g, r_end, r1);
}

__attribute__((target("avx2,fma"))) void backward_rows(const float* grad_out, const int8_t* index, float* grad_x,
                                                   const Rows& g, int64_t r0, int64_t r1) {
  const int64_t W = g.W, Wo = g.Wo;
  const int64_t r_end = vector_rows_end(g, r0, r1);
  for (int64_t r = r0; r < r_end; ++r) {
    float* top = grad_x + g.input_offset(r);
    const float* go = grad_out + r * Wo;
    const int8_t* k = index + r * Wo;
    if (Wo < 8) {
      // 16 floats from each row start: the spare lanes write zeros into the next rows (rewritten
      // by their own row later) or into dropped odd rows / columns (which are zero anyway).
      unpool8(go, k, top, top + W, static_cast<int>(Wo));
      continue;
    }
    for (int64_t j = 0; j + 8 <= Wo; j += 8) unpool8(go + j, k + j, top + 2 * j, top + W + 2 * j, 8);
    if (Wo % 8) unpool8(go + Wo - 8, k + Wo - 8, top + 2 * (Wo - 8), top + W + 2 * (Wo - 8), 8);
  }
  if (r_end < r1) backward_rows_scalar(grad_out, index, grad_x, g, r_end, r1);
}

}  // namespace vec
#endif

// The kernels' entry points: every dtype runs the scalar rows; float32 runs AVX2 where the CPU has it.
template <typename scalar_t>
void forward_rows(const scalar_t* x, scalar_t* out, int8_t* index, const Rows& g, int64_t r0, int64_t r1) {
  forward_rows_scalar(x, out, index, g, r0, r1);
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad_out, const int8_t* index, scalar_t* grad_x, const Rows& g, int64_t r0,
                   int64_t r1) {
  backward_rows_scalar(grad_out, index, grad_x, g, r0, r1);
}

#ifdef MK_POOL_AVX2
template <>
void forward_rows<float>(const float* x, float* out, int8_t* index, const Rows& g, int64_t r0, int64_t r1) {
  avx2::available() ? vec::forward_rows(x, out, index, g, r0, r1) : forward_rows_scalar(x, out, index, g, r0, r1);
}

template <>
void backward_rows<float>(const float* grad_out, const int8_t* index, float* grad_x, const Rows& g, int64_t r0,
                          int64_t r1) {
  avx2::available() ? vec::backward_rows(grad_out, index, grad_x, g, r0, r1)
                    : backward_rows_scalar(grad_out, index, grad_x, g, r0, r1);
}
#endif

std::tuple<at::Tensor, at::Tensor> max_pool2x2_relu(const at::Tensor& x_in) {
  check_max_pool2x2_relu_args(x_in);
  const at::Tensor x = x_in.contiguous();
  const Rows g{x.size(-2), x.size(-1), x.size(-2) / 2, x.size(-1) / 2};
  const int64_t rows = x.numel() / (g.H * g.W) * g.Ho;
  const auto out_shape = with_last_two(x.sizes(), g.Ho, g.Wo);
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor index = at::empty(out_shape, x.options().dtype(at::kChar));
  const int64_t grain = std::max<int64_t>(2, 4096 / std::max<int64_t>(g.Wo, 1));
  MK_DISPATCH_FLOATING(x.scalar_type(), "max_pool2x2_relu_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int8_t* ip = index.data_ptr<int8_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      forward_rows(xp, op, ip, g, r0, r1);
    });
  });
  return {out, index};
}

at::Tensor max_pool2x2_relu_backward(const at::Tensor& grad_out_in, const at::Tensor& index_in, int64_t height,
                                     int64_t width) {
  check_max_pool2x2_relu_backward_args(grad_out_in, index_in, height, width);
  const at::Tensor go = grad_out_in.contiguous(), index = index_in.contiguous();
  const Rows g{height, width, go.size(-2), go.size(-1)};
  const int64_t rows = g.Ho > 0 && g.Wo > 0 ? go.numel() / g.Wo : 0;
  const auto shape = with_last_two(go.sizes(), g.H, g.W);
  // Every pooled window is written whole; only a dropped odd row / column needs zeros first.
  at::Tensor grad_x = (g.H % 2 || g.W % 2) ? at::zeros(shape, go.options()) : at::empty(shape, go.options());
  const int64_t grain = std::max<int64_t>(2, 4096 / std::max<int64_t>(g.Wo, 1));
  MK_DISPATCH_FLOATING(go.scalar_type(), "max_pool2x2_relu_backward_cpu", [&] {
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    scalar_t* xp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      backward_rows(gp, ip, xp, g, r0, r1);
    });
  });
  return grad_x;
}

at::Tensor max_pool2x2_relu_gather(const at::Tensor& grad_x_in, const at::Tensor& index_in) {
  check_max_pool2x2_relu_gather_args(grad_x_in, index_in);
  const at::Tensor gx = grad_x_in.contiguous(), index = index_in.contiguous();
  const Rows g{gx.size(-2), gx.size(-1), index.size(-2), index.size(-1)};
  const int64_t rows = g.Ho > 0 && g.Wo > 0 ? index.numel() / g.Wo : 0;
  at::Tensor out = at::empty(index.sizes(), gx.options());
  const int64_t grain = std::max<int64_t>(2, 4096 / std::max<int64_t>(g.Wo, 1));
  MK_DISPATCH_FLOATING(gx.scalar_type(), "max_pool2x2_relu_gather_cpu", [&] {
    const scalar_t* xp = gx.const_data_ptr<scalar_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* top = xp + g.input_offset(r);
        const int8_t* k = ip + r * g.Wo;
        scalar_t* o = op + r * g.Wo;
        // Index -1 reads an entry of the window too (in bounds) and then drops it.
        for (int64_t j = 0; j < g.Wo; ++j)
          o[j] = k[j] < 0 ? scalar_t(0) : top[(k[j] >> 1) * g.W + 2 * j + (k[j] & 1)];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) {
  m.impl("max_pool2x2_relu", &max_pool2x2_relu);
  m.impl("max_pool2x2_relu_backward", &max_pool2x2_relu_backward);
  m.impl("max_pool2x2_relu_gather", &max_pool2x2_relu_gather);
}

}  // namespace cpu
}  // namespace meta_kernels
