// Splits a list of tensors into fixed-size chunks so that one at::parallel_for covers the whole
// list: small tensors share a thread, large ones are split across threads.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace meta_kernels {
namespace cpu {

constexpr int64_t kChunk = 16384;

struct Chunk {
  int64_t tensor;  // index into the list
  int64_t begin;   // element range [begin, end) inside that tensor
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk = kChunk) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i)
    for (int64_t b = 0; b < numels[i]; b += chunk) chunks.push_back({i, b, std::min(numels[i], b + chunk)});
  return chunks;
}

// Whether t's elements of each task (dim 0) fill one contiguous block of memory, in some order:
// a reduction over each task's elements (a sum of squares) may then read that block as it lies,
// e.g. a bmm's weight gradient [T, out, in] laid out as [T, in, out] (no copy needed).
inline bool task_blocks_dense(const at::Tensor& t) {
  return t.is_contiguous() ||
         (t.dim() > 0 && t.is_non_overlapping_and_dense() && t.stride(0) * t.size(0) == t.numel());
}

// Runs fn(chunk) for every chunk, in parallel when there is more than one.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) fn(chunks[c]);
  });
}

}  // namespace cpu
}  // namespace meta_kernels
