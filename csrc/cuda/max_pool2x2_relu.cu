// relu(max_pool2d(x, 2)) over x [..., H, W], its backward and the backward's adjoint (a gather).
// One thread per output element (grid-stride loop over planes * Ho * Wo), reading its 2x2 window;
// the backward writes the whole window (grad_out at the recorded position, zeros elsewhere).
// Current stream, no sync.
#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

// Offset of the top-left corner of output element e's window in x [planes, H, W].
__device__ __forceinline__ int64_t window_top(int64_t e, int64_t H, int64_t W, int64_t Ho, int64_t Wo) {
  const int64_t row = e / Wo, j = e - row * Wo;
  const int64_t plane = row / Ho, i = row - plane * Ho;
  return (plane * H + 2 * i) * W + 2 * j;
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
pool_relu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int8_t* __restrict__ index,
                 const int64_t total, const int64_t H, const int64_t W, const int64_t Ho, const int64_t Wo) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const scalar_t* top = x + window_top(e, H, W, Ho, Wo);
    const opmath_t v[4] = {static_cast<opmath_t>(top[0]), static_cast<opmath_t>(top[1]),
                           static_cast<opmath_t>(top[W]), static_cast<opmath_t>(top[W + 1])};
    // First maximum wins ties; a NaN wins and propagates (as max_pool2d and relu do).
    opmath_t m = v[0];
    int8_t at = 0;
    for (int8_t q = 1; q < 4; ++q)
      if (v[q] > m || (isnan(v[q]) && !isnan(m))) {
        m = v[q];
        at = q;
      }
    const bool keep = m > opmath_t(0) || isnan(m);
    out[e] = static_cast<scalar_t>(keep ? m : opmath_t(0));
    index[e] = keep ? at : int8_t(-1);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
pool_relu_backward_kernel(const scalar_t* __restrict__ go, const int8_t* __restrict__ index, scalar_t* __restrict__ gx,
                          const int64_t total, const int64_t H, const int64_t W, const int64_t Ho, const int64_t Wo) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    scalar_t* top = gx + window_top(e, H, W, Ho, Wo);
    const scalar_t g = go[e], zero(0);
    const int8_t k = index[e];
    top[0] = k == 0 ? g : zero;
    top[1] = k == 1 ? g : zero;
    top[W] = k == 2 ? g : zero;
    top[W + 1] = k == 3 ? g : zero;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
pool_relu_gather_kernel(const scalar_t* __restrict__ gx, const int8_t* __restrict__ index, scalar_t* __restrict__ out,
                        const int64_t total, const int64_t H, const int64_t W, const int64_t Ho, const int64_t Wo) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int8_t k = index[e];
    out[e] = k < 0 ? scalar_t(0) : gx[window_top(e, H, W, Ho, Wo) + (k >> 1) * W + (k & 1)];
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_relu(const at::Tensor& x_in) {
  check_max_pool2x2_relu_args(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t H = x.size(-2), W = x.size(-1), Ho = H / 2, Wo = W / 2;
  const auto shape = with_last_two(x.sizes(), Ho, Wo);
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor index = at::empty(shape, x.options().dtype(at::kChar));
  const int64_t total = out.numel();
  if (total == 0) return {out, index};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(x.scalar_type(), "max_pool2x2_relu_cuda", [&] {
    pool_relu_kernel<scalar_t><<<grid_for((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), index.data_ptr<int8_t>(), total, H, W, Ho, Wo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, index};
}

at::Tensor max_pool2x2_relu_backward(const at::Tensor& grad_out_in, const at::Tensor& index_in, int64_t height,
                                     int64_t width) {
  check_max_pool2x2_relu_backward_args(grad_out_in, index_in, height, width);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor go = grad_out_in.contiguous(), index = index_in.contiguous();
  const int64_t Ho = go.size(-2), Wo = go.size(-1);
  const auto shape = with_last_two(go.sizes(), height, width);
  // Every pooled window is written whole; only a dropped odd row / column needs zeros first.
  at::Tensor gx = (height % 2 || width % 2) ? at::zeros(shape, go.options()) : at::empty(shape, go.options());
  const int64_t total = go.numel();
  if (total == 0) return gx;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(go.scalar_type(), "max_pool2x2_relu_backward_cuda", [&] {
    pool_relu_backward_kernel<scalar_t><<<grid_for((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), index.const_data_ptr<int8_t>(), gx.data_ptr<scalar_t>(), total, height, width,
        Ho, Wo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

at::Tensor max_pool2x2_relu_gather(const at::Tensor& grad_x_in, const at::Tensor& index_in) {
  check_max_pool2x2_relu_gather_args(grad_x_in, index_in);
  const c10::cuda::CUDAGuard guard(grad_x_in.device());
  const at::Tensor gx = grad_x_in.contiguous(), index = index_in.contiguous();
  at::Tensor out = at::empty(index.sizes(), gx.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(gx.scalar_type(), "max_pool2x2_relu_gather_cuda", [&] {
    pool_relu_gather_kernel<scalar_t><<<grid_for((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        gx.const_data_ptr<scalar_t>(), index.const_data_ptr<int8_t>(), out.data_ptr<scalar_t>(), total, gx.size(-2),
        gx.size(-1), index.size(-2), index.size(-1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) {
  m.impl("max_pool2x2_relu", &max_pool2x2_relu);
  m.impl("max_pool2x2_relu_backward", &max_pool2x2_relu_backward);
  m.impl("max_pool2x2_relu_gather", &max_pool2x2_relu_gather);
}

}  // namespace cuda
}  // namespace meta_kernels
