// The launch the CUDA inner optimizers with state share (momentum_step, adam_step): one
// multi-tensor table per launch holding, per tensor, the inputs (params, grads, states), the
// outputs (params, states; they may alias the inputs: in place) and the per-element rates. A
// thread updates elements one at a time: each reads every input of its element before writing
// it, so outputs aliasing inputs are safe.
#pragma once
#include "cuda_common.cuh"

namespace meta_kernels {
namespace cuda {

// Tensors per table: DEPTH pointers each, so that the table stays in a 4 KB argument block.
constexpr int kStatefulMaxTensors = 32;

template <int DEPTH>
using StatefulTable = TensorTable<DEPTH, kStatefulMaxTensors>;
static_assert(sizeof(StatefulTable<8>) <= 3584, "the table must leave room in a 4 KB kernel-argument block");

// What a kernel needs besides its table: the rates and scale, read on the device.
struct StatefulScalars {
  ScalarRef lrs;
  ScalarRef scale;
  bool has_scale;
  bool has_rates;
  bool rates_full;  // rates carry the task dim (indexed by element), or not (element within the task)
};

// Calls launch(table, chunks) for each full table of the list and the last one. The pointer rows
// are: the inputs of StatefulLists (p, g, states), its outputs (p_out, states_out), then the
// rates (null when not given): DEPTH = 2 * (2 + states).
template <int DEPTH, typename Launch>
void for_each_table(const StatefulLists& l, const Launch& launch) {
  TableBuilder<DEPTH, kStatefulMaxTensors> tb;
  for (size_t i = 0; i < l.p.size(); ++i) {
    const int64_t numel = l.p[i].numel();
    if (numel == 0) continue;
    std::array<void*, DEPTH> ptrs{};
    int k = 0;
    ptrs[k++] = l.p[i].data_ptr();
    ptrs[k++] = l.g[i].data_ptr();
    for (const auto& s : l.state) ptrs[k++] = s[i].data_ptr();
    ptrs[k++] = l.p_out[i].data_ptr();
    for (const auto& s : l.state_out) ptrs[k++] = s[i].data_ptr();
    ptrs[k++] = l.rates.empty() ? nullptr : l.rates[i].data_ptr();
    TORCH_INTERNAL_ASSERT(k == DEPTH);
    if (tb.add(ptrs, numel, l.inner[i], static_cast<int32_t>(i), false)) {
      launch(tb.table(), tb.chunks());
      tb.reset();
    }
  }
  if (!tb.empty()) launch(tb.table(), tb.chunks());
}

// The rates and scale on the device, with the copies they may read from kept alive.
struct StatefulSources {
  ScalarSource lrs, scale;
  StatefulScalars scalars;
};

inline StatefulSources stateful_sources(const at::Tensor& lrs, const c10::optional<at::Tensor>& scale,
                                        const StatefulLists& l) {
  StatefulSources src;
  src.lrs = scalar_source(lrs);
  if (scale.has_value()) src.scale = scalar_source(*scale);
  src.scalars = StatefulScalars{src.lrs.ref, scale.has_value() ? src.scale.ref : ScalarRef{nullptr, 0, 0, 0},
                                scale.has_value(), !l.rates.empty(), l.rates_full};
  return src;
}

// Element e of tensor entry j: its per-task scale and its rate lrs[i] * rates[.].
template <typename opmath_t, typename scalar_t>
__device__ __forceinline__ void element_coefs(const StatefulScalars& sc, double lr, const scalar_t* rates, int64_t e,
                                              int64_t inner, opmath_t& scale, opmath_t& rate) {
  const int64_t t = e / inner;
  scale = sc.has_scale ? static_cast<opmath_t>(sc.scale.load(t)) : opmath_t(1);
  rate = static_cast<opmath_t>(lr);
  if (rates != nullptr) rate *= static_cast<opmath_t>(rates[sc.rates_full ? e : e - t * inner]);
}

// The element range [begin, end) of chunk c, which belongs to table entry j.
template <int DEPTH>
__device__ __forceinline__ void chunk_range(const StatefulTable<DEPTH>& tab, int64_t c, int& j, int64_t& begin,
                                            int64_t& end) {
  j = tab.find(c);
  begin = (c - tab.chunk_start[j]) * kChunk;
  end = min64(tab.numel[j], begin + kChunk);
}

}  // namespace cuda
}  // namespace meta_kernels
