// Sums over contiguous blocks with kLanes independent partial sums per quantity. With a single
// vector accumulator every add waits on the previous one (3-4 cycles): batch_norm's reductions ran
// at a third of memory speed on 26x26 maps; independent lanes hide that latency.
#pragma once
#include <cstdint>

namespace meta_kernels {
namespace cpu {

constexpr int kLanes = 16;

// body(s, j) adds element s's terms into lane j of the caller's partial sums (arrays of kLanes).
template <typename Body>
inline void for_each_lane(int64_t size, Body&& body) {
  int64_t s = 0;
  for (; s + kLanes <= size; s += kLanes) {
_Pragma("omp simd")
    for (int j = 0; j < kLanes; ++j) body(s + j, j);
  }
  for (int j = 0; s < size; ++s, ++j) body(s, j);
}

template <typename T>
inline T lanes_total(const T (&lanes)[kLanes]) {
  T total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// acc[k] += the sum over s < size of term k, terms(s, v) writing element s's K terms into v; in
// lanes when the block is long enough to fill them (a short one would pay more for the lanes'
// set-up and totals than they save).
template <int K, typename T, typename Terms>
inline void add_terms(int64_t size, T (&acc)[K], Terms&& terms) {
  if (size < kLanes) {
    for (int64_t s = 0; s < size; ++s) {
      T v[K];
      terms(s, v);
      for (int k = 0; k < K; ++k) acc[k] += v[k];
    }
    return;
  }
  T lanes[K][kLanes] = {};
  for_each_lane(size, [&](int64_t s, int j) {
    T v[K];
    terms(s, v);
    for (int k = 0; k < K; ++k) lanes[k][j] += v[k];
  });
  for (int k = 0; k < K; ++k) acc[k] += lanes_total(lanes[k]);
}

}  // namespace cpu
}  // namespace meta_kernels
