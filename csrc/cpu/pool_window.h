// 2x2 windows of relu(max_pool2d(x, 2)), one or (AVX2) eight at a time: shared by max_pool2x2_relu.cpp and the fused input
// block (conv3x3_bn_pool_relu.cpp), which pools rows it computes itself.
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MK_POOL_AVX2 1
#endif

namespace meta_kernels {
namespace cpu {

// Window j of the rows `top` and `bottom`: the position of the maximum (0..3, row-major; first
// maximum wins ties, a NaN wins and propagates, as in max_pool2d) or -1 where the ReLU zeroes it.
template <typename in_t, typename out_t = in_t>
inline void pool_window(const in_t* top, const in_t* bottom, int64_t j, out_t* out, int8_t* index) {
  using opmath_t = at::opmath_type<in_t>;
  const opmath_t a = static_cast<opmath_t>(top[2 * j]), b = static_cast<opmath_t>(top[2 * j + 1]);
  const opmath_t c = static_cast<opmath_t>(bottom[2 * j]), d = static_cast<opmath_t>(bottom[2 * j + 1]);
  // v != v is the NaN test.
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
  out[j] = static_cast<out_t>(keep ? m : opmath_t(0));
  index[j] = static_cast<int8_t>(keep ? at : -1);
}

#ifdef MK_POOL_AVX2
// 8 windows at once in explicit 8-wide float vectors (GCC / Clang vector extensions, compiled for
// AVX2 + FMA and picked at run time with `available`).
namespace avx2 {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef int8_t c8 __attribute__((vector_size(8)));

#define MK_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

inline bool available() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

MK_AVX2 f8 load(const float* p) { f8 v; std::memcpy(&v, p, sizeof v); return v; }
MK_AVX2 void store(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
// Lane-wise mask ? a : b, by bits (mask lanes are all ones or all zeros).
MK_AVX2 f8 select(i8 mask, f8 a, f8 b) { return (f8)((mask & (i8)a) | (~mask & (i8)b)); }
MK_AVX2 i8 select(i8 mask, i8 a, i8 b) { return (mask & a) | (~mask & b); }

// Windows j .. j + 7 of the 16-wide row pieces top (t0 t1) and bottom (b0 b1): the same
// comparisons as pool_window.
MK_AVX2 void pool8(f8 t0, f8 t1, f8 b0, f8 b1, float* out, int8_t* index) {
  const f8 a = __builtin_shufflevector(t0, t1, 0, 2, 4, 6, 8, 10, 12, 14);
  const f8 b = __builtin_shufflevector(t0, t1, 1, 3, 5, 7, 9, 11, 13, 15);
  const f8 c = __builtin_shufflevector(b0, b1, 0, 2, 4, 6, 8, 10, 12, 14);
  const f8 d = __builtin_shufflevector(b0, b1, 1, 3, 5, 7, 9, 11, 13, 15);
  const i8 zero_i = {}, one = zero_i + 1, two = zero_i + 2, three = zero_i + 3;
  const i8 tb = (b > a) | ((b != b) & (a == a));
  f8 m = select(tb, b, a);
  i8 at = tb & one;
  const i8 tc = (c > m) | ((c != c) & (m == m));
  m = select(tc, c, m);
  at = select(tc, two, at);
  const i8 td = (d > m) | ((d != d) & (m == m));
  m = select(td, d, m);
  at = select(td, three, at);
  const f8 zero = {};
  const i8 keep = (m > zero) | (m != m);
  store(out, select(keep, m, zero));
  const c8 idx = __builtin_convertvector(select(keep, at, zero_i - 1), c8);
  std::memcpy(index, &idx, sizeof idx);
}

// The inverse routing: grad g of windows j .. j + 7 (lanes where `use` is set) to the recorded
// positions of the 16-wide row pieces top (t0 t1) and bottom (b0 b1), zeros elsewhere.
MK_AVX2 void route8(f8 g, const int8_t* index, i8 use, f8& t0, f8& t1, f8& b0, f8& b1) {
  c8 k8;
  std::memcpy(&k8, index, sizeof k8);
  const i8 zero_i = {};
  const i8 k = select(use, __builtin_convertvector(k8, i8), zero_i - 1);
  const f8 zero = {};
  const f8 e0 = select(k == 0, g, zero), e1 = select(k == 1, g, zero);
  const f8 e2 = select(k == 2, g, zero), e3 = select(k == 3, g, zero);
  t0 = __builtin_shufflevector(e0, e1, 0, 8, 1, 9, 2, 10, 3, 11);
  t1 = __builtin_shufflevector(e0, e1, 4, 12, 5, 13, 6, 14, 7, 15);
  b0 = __builtin_shufflevector(e2, e3, 0, 8, 1, 9, 2, 10, 3, 11);
  b1 = __builtin_shufflevector(e2, e3, 4, 12, 5, 13, 6, 14, 7, 15);
}

}  // namespace avx2
#endif

}  // namespace cpu
}  // namespace meta_kernels
