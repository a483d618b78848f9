// Per-task global L2 norm of a list of [T, ...] grads and the clip factor, in one pass.
// Partial sums per fixed chunk are combined in a fixed order, so the result does not depend on
// the number of threads.
#include <cmath>
#include <limits>

#include "../common.h"
#include "multi_tensor.h"

namespace meta_kernels {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> clip_grad_norm(at::TensorList grads, double max_norm, double eps) {
  check_uniform_list(grads, "clip_grad_norm");
  const int64_t T = leading_tasks(grads, "clip_grad_norm");
  const int64_t n = static_cast<int64_t>(grads.size());

  // One work item per (tensor, task, chunk) so that every partial sum belongs to one task.
  std::vector<at::Tensor> g(n);
  std::vector<Chunk> items;
  std::vector<int64_t> item_task;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = task_blocks_dense(grads[i]) ? grads[i] : grads[i].contiguous();
    const int64_t inner = T > 0 ? g[i].numel() / T : 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < inner; b += kChunk) {
        items.push_back({i, t * inner + b, t * inner + std::min(inner, b + kChunk)});
        item_task.push_back(t);
      }
  }
  std::vector<double> partial(items.size(), 0.0);
  MK_DISPATCH_FLOATING(grads[0].scalar_type(), "clip_grad_norm_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const scalar_t* gp = g[items[k].tensor].const_data_ptr<scalar_t>();
        opmath_t acc = 0;
_Pragma("omp simd reduction(+ : acc)")
        for (int64_t j = items[k].begin; j < items[k].end; ++j) {
          const opmath_t v = static_cast<opmath_t>(gp[j]);
          acc += v * v;
        }
        partial[k] = static_cast<double>(acc);
      }
    });
  });
  std::vector<double> sumsq(T, 0.0);
  for (size_t k = 0; k < items.size(); ++k) sumsq[item_task[k]] += partial[k];

  const auto opts = grads[0].options().dtype(math_dtype(grads[0].scalar_type()));
  at::Tensor norm = at::empty({T}, opts.dtype(at::kDouble));
  at::Tensor factor = at::empty({T}, opts.dtype(at::kDouble));
  double* np = norm.data_ptr<double>();
  double* fp = factor.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t) {
    np[t] = std::sqrt(sumsq[t]);
    // A non-finite norm gives a NaN factor so the update is poisoned visibly, never silently zeroed.
    fp[t] = std::isfinite(np[t]) ? std::min(1.0, max_norm / (np[t] + eps)) : std::numeric_limits<double>::quiet_NaN();
  }
  return {norm.to(opts.dtype()), factor.to(opts.dtype())};
}

}  // namespace

TORCH_LIBRARY_IMPL(meta_kernels, CPU, m) { m.impl("clip_grad_norm", &clip_grad_norm); }

}  // namespace cpu
}  // namespace meta_kernels
