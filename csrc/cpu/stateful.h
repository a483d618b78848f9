// The loop the CPU kernels of the inner optimizers with state share: every tensor of the list cut
// into chunks (multi_tensor.h) run in parallel, each chunk cut again where a task ends, so that a
// segment has one rate, one per-task scale and one offset into the per-element rates.
#pragma once
#include "../common.h"
#include "multi_tensor.h"

namespace meta_kernels {
namespace cpu {

template <typename scalar_t>
struct Segment {
  int64_t tensor;       // index into the lists
  int64_t begin, end;   // element range inside that tensor
  double lr;            // lrs[tensor]
  double scale;         // scale[t] (1 without a scale)
  int64_t rate_offset;  // rates index = element - rate_offset (t * inner for rates without the task dim)

  const scalar_t* in(const std::vector<at::Tensor>& list) const { return list[tensor].const_data_ptr<scalar_t>(); }
  scalar_t* out(const std::vector<at::Tensor>& list) const { return list[tensor].data_ptr<scalar_t>(); }
  const scalar_t* rates(const StatefulLists& l) const {
    return l.rates.empty() ? nullptr : l.rates[tensor].const_data_ptr<scalar_t>();
  }
};

template <typename scalar_t, typename F>
void for_each_segment(const StatefulLists& l, const at::Tensor& lrs, const c10::optional<at::Tensor>& scale, const F& fn) {
  const at::Tensor lrs_d = lrs.detach().to(at::kDouble).contiguous();
  const at::Tensor scale_d = scale.has_value() ? scale->detach().to(at::kDouble).contiguous() : at::Tensor();
  const double* lr = lrs_d.data_ptr<double>();
  const double* s = scale_d.defined() ? scale_d.data_ptr<double>() : nullptr;
  std::vector<int64_t> numels;
  for (const auto& t : l.p) numels.push_back(t.numel());
  for_each_chunk(make_chunks(numels), [&](const Chunk& c) {
    const int64_t in = l.inner[c.tensor];
    for (int64_t b = c.begin; b < c.end;) {
      const int64_t t = b / in;
      const int64_t e = std::min(c.end, (t + 1) * in);
      fn(Segment<scalar_t>{c.tensor, b, e, lr[c.tensor], s ? s[t] : 1.0, l.rates_full ? 0 : t * in});
      b = e;
    }
  });
}

// Runs update(j, rate) over a segment's elements, the per-element rates' branch outside the loop.
// `omp simd` lets the compiler vectorize although outputs may be the inputs (in place): each
// element is read and written at the same index only, so there is no dependence between elements.
template <typename scalar_t, typename opmath_t, typename F>
inline void for_each_element(const Segment<scalar_t>& s, const scalar_t* rates, opmath_t lr, const F& update) {
  if (rates) {
#pragma omp simd
    for (int64_t j = s.begin; j < s.end; ++j) update(j, lr * static_cast<opmath_t>(rates[j - s.rate_offset]));
  } else {
#pragma omp simd
    for (int64_t j = s.begin; j < s.end; ++j) update(j, lr);
  }
}

}  // namespace cpu
}  // namespace meta_kernels
