// theta_i += epsilon * (mean_t adapted_i[t] - theta_i), fused over the whole list, in place.
#include "../common.h"
#include "multi_tensor.h"

namespace meta_kernels {
namespace cpu {
namespace {

void reptile_update_(at::TensorList params, at::TensorList adapted, double epsilon) {
  const int64_t T = check_reptile_args(params, adapted);
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<at::Tensor> theta(n), phi(n);
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) {
    theta[i] = params[i].is_contiguous() ? params[i] : params[i].contiguous();
    phi[i] = adapted[i].contiguous();
    numels[i] = theta[i].numel();
  }
  // Smaller chunks: each keeps a running sum over tasks in a local buffer.
  const auto chunks = make_chunks(numels, 2048);
  MK_DISPATCH_FLOATING(params[0].scalar_type(), "reptile_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t eps = static_cast<opmath_t>(epsilon);
    const opmath_t inv_T = opmath_t(1) / static_cast<opmath_t>(T);
    for_each_chunk(chunks, [&](const Chunk& c) {
      opmath_t acc[2048];
      const int64_t len = c.end - c.begin;
      const int64_t inner = numels[c.tensor];
      const scalar_t* pp = phi[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      scalar_t* tp = theta[c.tensor].data_ptr<scalar_t>() + c.begin;
      for (int64_t j = 0; j < len; ++j) acc[j] = 0;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* src = pp + t * inner;
_Pragma("omp simd")
        for (int64_t j = 0; j < len; ++j) acc[j] += static_cast<opmath_t>(src[j]);
      }
_Pragma("omp simd")
      for (int64_t j = 0; j < len; ++j) {
        const opmath_t th = static_cast<opmath_t>(tp[j]);
        tp[j] = static_cast<scalar_t>(th + eps * (acc[j] * inv_T - th));
      }
    });
  });
  for (int64_t i = 0; i < n; ++i)
    if (!params[i].is_contiguous()) const_cast<at::Tensor&>(params[i]).copy_(theta[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) { m.impl("reptile_update_", &reptile_update_); }

}  // namespace cpu
}  // namespace meta_kernels
