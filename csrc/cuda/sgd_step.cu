// phi_i = theta_i - lrs[i] * scale[t] * g_i for a whole list of tensors in one launch.
//
// Layout: one multi-tensor table (cuda_common.cuh) per launch, so up to 64 tensors (the Conv4 set
// of 18 included, at any T) take a single launch; 256 threads per block, one 4096-element chunk
// per block (grid = number of chunks). lrs[i] and scale[t] are read inside the kernel from device
// memory in whatever floating dtype they have; the coefficient is formed in double and rounded to
// the math type, as on the CPU. Contiguous 16-byte-aligned tensors use 16-byte packs.
#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {
namespace {

template <typename scalar_t>
struct SgdOp {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int V = vec_size<scalar_t>();
  const scalar_t* p;
  const scalar_t* g;
  scalar_t* out;  // may alias p (the in-place op): each element is read before it is written, by one thread
  opmath_t coef;

  __device__ __forceinline__ void one(int64_t i) const {
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(p[i]) - coef * static_cast<opmath_t>(g[i]));
  }
  __device__ __forceinline__ void vec(int64_t i) const {
    using P = Pack<scalar_t, V>;
    const P pp = *reinterpret_cast<const P*>(p + i);
    const P gg = *reinterpret_cast<const P*>(g + i);
    P oo;
#pragma unroll
    for (int k = 0; k < V; ++k)
      oo.v[k] = static_cast<scalar_t>(static_cast<opmath_t>(pp.v[k]) - coef * static_cast<opmath_t>(gg.v[k]));
    *reinterpret_cast<P*>(out + i) = oo;
  }
};

// A chunk spanning at most this many tasks is done task segment by task segment (vectorised);
// beyond that (small tensors, many tasks per chunk) each element finds its own task.
constexpr int64_t kMaxSegments = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sgd_step_kernel(const TensorTable<3> tab, const int64_t chunks, const ScalarRef lrs, const ScalarRef scale,
                const bool has_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int j = tab.find(c);
    const int64_t n = tab.numel[j];
    const int64_t begin = (c - tab.chunk_start[j]) * kChunk;
    const int64_t end = min64(n, begin + kChunk);
    const bool vec = tab.vec_ok[j];
    SgdOp<scalar_t> op{static_cast<const scalar_t*>(tab.ptr[0][j]), static_cast<const scalar_t*>(tab.ptr[1][j]),
                       static_cast<scalar_t*>(tab.ptr[2][j]), opmath_t(0)};
    const double lr = lrs.load(tab.index[j]);
    if (!has_scale) {
      op.coef = static_cast<opmath_t>(lr);
      for_range<V>(begin, end, vec, op);
      continue;
    }
    const int64_t inner = tab.aux[j];  // elements per task, >= 1
    const int64_t t0 = begin / inner, t1 = (end - 1) / inner;
    if (t1 - t0 < kMaxSegments) {
      for (int64_t t = t0; t <= t1; ++t) {
        op.coef = static_cast<opmath_t>(lr * scale.load(t));
        for_range<V>(max64(begin, t * inner), min64(end, (t + 1) * inner), vec, op);
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        op.coef = static_cast<opmath_t>(lr * scale.load(i / inner));
        op.one(i);
      }
    }
  }
}

// Writes p - lr * s[t] * g into outs (which may alias the contiguous params).
void sgd_launch(at::TensorList params, at::TensorList grads, std::vector<at::Tensor>& outs, const at::Tensor& lrs,
                const c10::optional<at::Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t n = static_cast<int64_t>(params.size());
  const ScalarSource lr_src = scalar_source(lrs);
  const bool has_scale = scale.has_value();
  const ScalarSource sc_src = has_scale ? scalar_source(*scale) : ScalarSource{at::Tensor(), ScalarRef{nullptr, 0, 0, 0}};
  std::vector<at::Tensor> p(n), g(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = params[i].contiguous();
    g[i] = grads[i].contiguous();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MK_DISPATCH_FLOATING(params[0].scalar_type(), "sgd_step_cuda", [&] {
    TableBuilder<3> tb;
    auto launch = [&]() {
      sgd_step_kernel<scalar_t><<<grid_for(tb.chunks()), kThreads, 0, stream>>>(tb.table(), tb.chunks(), lr_src.ref,
                                                                                sc_src.ref, has_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tb.reset();
    };
    for (int64_t i = 0; i < n; ++i) {
      const int64_t numel = p[i].numel();
      if (numel == 0) continue;
      // With a per-task scale the leading dim is the task dim; otherwise the tensor is one task.
      const int64_t inner = has_scale ? numel / p[i].size(0) : numel;
      void* pp = p[i].data_ptr();
      void* gp = g[i].data_ptr();
      void* op = outs[i].data_ptr();
      const bool vec = aligned16(pp) && aligned16(gp) && aligned16(op);
      if (tb.add({pp, gp, op}, numel, inner, static_cast<int32_t>(i), vec)) launch();
    }
    if (!tb.empty()) launch();
  });
}

std::vector<at::Tensor> sgd_step(at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
                                 const c10::optional<at::Tensor>& scale) {
  return sgd_step_out_of_place(sgd_launch, params, grads, lrs, scale);
}

void sgd_step_(at::TensorList params, at::TensorList grads, const at::Tensor& lrs,
               const c10::optional<at::Tensor>& scale) {
  sgd_step_in_place(sgd_launch, params, grads, lrs, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CUDA, m) {
  m.impl("sgd_step", &sgd_step);
  m.impl("sgd_step_", &sgd_step_);
}

}  // namespace cuda
}  // namespace meta_kernels
