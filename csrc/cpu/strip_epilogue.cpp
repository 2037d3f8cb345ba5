// The strip epilogue in three passes over each row while it sits in L2: (1) row and column
// scales, running max and sum; (2) exp and its sum; (3) the gradient tile.
//
// The float32 passes are written with GCC vector extensions so that they are SIMD whatever the
// auto-vectoriser decides: one body, instantiated for 16 lanes in an AVX-512 function, 8 lanes
// in an AVX2 function and 4 lanes (SSE2, every x86-64) otherwise; the CPU picks at run time, so
// the extension needs no -march flag and runs anywhere. float64 (gradcheck) stays scalar.
#include "strip_epilogue.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace vocabsem {
namespace {

#define VS_INLINE __attribute__((always_inline)) inline

template <typename V>
VS_INLINE V splat(float x) {
  return V{} + x;
}

template <typename V>
VS_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
VS_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// exp for a vector of float32: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 Taylor
// polynomial (relative error below 1e-8 there), 2^n written into the exponent bits. Saturates to
// 0 below -87.3 and +inf above 88.7; NaN stays NaN.
template <typename V, typename I>
VS_INLINE V vexp(V x) {
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
  const V lo = splat<V>(-87.3f), hi = splat<V>(88.7f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V y = xc * log2e + 0.5f;
  const V t = __builtin_convertvector(__builtin_convertvector(y, I), V);  // truncation
  const V n = y < t ? t - 1.0f : t;                                       // floor
  const V r = (xc - n * ln2_hi) - n * ln2_lo;
  V p = splat<V>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V out = p * __builtin_bit_cast(V, bits);
  out = x < lo ? splat<V>(0.0f) : out;
  out = x > hi ? splat<V>(std::numeric_limits<float>::infinity()) : out;
  return x != x ? x : out;
}

template <typename V>
VS_INLINE float hsum(V v) {
  float s = 0;
  for (unsigned l = 0; l < sizeof(V) / sizeof(float); ++l) s += v[l];
  return s;
}

template <typename V>
VS_INLINE float hmax(V v) {
  float m = v[0];
  for (unsigned l = 1; l < sizeof(V) / sizeof(float); ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// Pass 1 of one float32 row: scale by the row factor and the columns' inverse norms; max, sum
// and whether a NaN was seen.
template <typename V, typename I>
VS_INLINE void scale_max_sum(float* row, int64_t cols, float row_scale, const float* inv_b, float& row_max,
                             float& row_sum, bool& has_nan) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  V vmax = splat<V>(-std::numeric_limits<float>::infinity()), vsum = splat<V>(0.0f);
  I nan_lanes = I{};
  int64_t j = 0;
  for (; j + W <= cols; j += W) {
    V v = load<V>(row + j);
    if (inv_b != nullptr) {
      v *= load<V>(inv_b + j) * row_scale;
      store(row + j, v);
    } else if (row_scale != 1.0f) {
      v *= row_scale;
      store(row + j, v);
    }
    vmax = v > vmax ? v : vmax;
    vsum += v;
    nan_lanes |= v != v;
  }
  float m = hmax(vmax), s = hsum(vsum);
  bool nan = false;
  for (unsigned l = 0; l < W; ++l) nan |= nan_lanes[l] != 0;
  for (; j < cols; ++j) {
    row[j] *= row_scale * (inv_b != nullptr ? inv_b[j] : 1.0f);
    m = row[j] > m ? row[j] : m;
    s += row[j];
    nan |= row[j] != row[j];
  }
  row_max = m;
  row_sum = s;
  has_nan = nan;
}

template <typename V, typename I>
VS_INLINE float exp_in_place(float* row, int64_t cols, float shift) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  V vsum = splat<V>(0.0f);
  int64_t j = 0;
  for (; j + W <= cols; j += W) {
    const V e = vexp<V, I>(load<V>(row + j) - shift);
    store(row + j, e);
    vsum += e;
  }
  float s = hsum(vsum);
  if (j < cols) {  // the tail through one padded vector
    float tail[W];
    for (int64_t l = 0; l < W; ++l) tail[l] = j + l < cols ? row[j + l] - shift : -std::numeric_limits<float>::infinity();
    const V e = vexp<V, I>(load<V>(tail));
    for (int64_t l = 0; j + l < cols; ++l) {
      row[j + l] = e[l];
      s += e[l];
    }
  }
  return s;
}

template <typename V>
VS_INLINE void gradient_in_place(float* row, int64_t cols, const float* inv_b, float coef, float offset) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + W <= cols; j += W) {
    V g = load<V>(row + j) * coef - offset;
    if (inv_b != nullptr) g *= load<V>(inv_b + j);
    store(row + j, g);
  }
  for (; j < cols; ++j) row[j] = (coef * row[j] - offset) * (inv_b != nullptr ? inv_b[j] : 1.0f);
}

template <typename acc_t>
struct RowArgs {
  acc_t* row;
  int64_t cols;
  acc_t row_scale;
  const acc_t* inv_b;
  int64_t target;
  bool valid;
  const acc_t* weight;
  acc_t ls;
  acc_t* loss;
  acc_t* lse;
};

// Loss, lse and (when weight is given) the gradient row, from the three passes above.
template <typename V, typename I>
VS_INLINE void epilogue_row_f32(const RowArgs<float>& a) {
  float row_max, row_sum;
  bool has_nan;
  scale_max_sum<V, I>(a.row, a.cols, a.row_scale, a.inv_b, row_max, row_sum, has_nan);
  if (has_nan) row_max = std::numeric_limits<float>::quiet_NaN();
  const float picked = a.row[a.target];
  const float shift = row_max == -std::numeric_limits<float>::infinity() ? 0.0f : row_max;
  const float sum_exp = exp_in_place<V, I>(a.row, a.cols, shift);
  const float row_lse = shift + std::log(sum_exp);
  const float v = static_cast<float>(a.cols);
  *a.lse = row_lse;
  *a.loss = a.valid ? row_lse - (1 - a.ls) * picked - (a.ls > 0 ? a.ls * row_sum / v : 0.0f) : 0.0f;
  if (a.weight == nullptr) return;
  const float w = *a.weight;
  if (!a.valid || w == 0) {
    std::memset(a.row, 0, sizeof(float) * a.cols);
    return;
  }
  gradient_in_place<V>(a.row, a.cols, a.inv_b, w / sum_exp, w * a.ls / v);
  a.row[a.target] -= w * (1 - a.ls) * (a.inv_b != nullptr ? a.inv_b[a.target] : 1.0f);
}

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

__attribute__((target("avx512f"))) void row_avx512(const RowArgs<float>& a) { epilogue_row_f32<f32x16, i32x16>(a); }
__attribute__((target("avx2,fma"))) void row_avx2(const RowArgs<float>& a) { epilogue_row_f32<f32x8, i32x8>(a); }
void row_sse2(const RowArgs<float>& a) { epilogue_row_f32<f32x4, i32x4>(a); }

using RowFn = void (*)(const RowArgs<float>&);

RowFn pick_row_fn() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return row_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return row_avx2;
  return row_sse2;
}

// float64: plain loops (correctness checks and gradcheck, not speed).
void epilogue_row_f64(const RowArgs<double>& a) {
  double row_max = -std::numeric_limits<double>::infinity(), row_sum = 0;
  bool has_nan = false;
  for (int64_t j = 0; j < a.cols; ++j) {
    a.row[j] *= a.row_scale * (a.inv_b != nullptr ? a.inv_b[j] : 1.0);
    row_max = a.row[j] > row_max ? a.row[j] : row_max;
    row_sum += a.row[j];
    has_nan |= a.row[j] != a.row[j];
  }
  if (has_nan) row_max = std::numeric_limits<double>::quiet_NaN();
  const double picked = a.row[a.target];
  const double shift = row_max == -std::numeric_limits<double>::infinity() ? 0.0 : row_max;
  double sum_exp = 0;
  for (int64_t j = 0; j < a.cols; ++j) sum_exp += (a.row[j] = std::exp(a.row[j] - shift));
  const double row_lse = shift + std::log(sum_exp), v = static_cast<double>(a.cols);
  *a.lse = row_lse;
  *a.loss = a.valid ? row_lse - (1 - a.ls) * picked - (a.ls > 0 ? a.ls * row_sum / v : 0.0) : 0.0;
  if (a.weight == nullptr) return;
  const double w = *a.weight;
  if (!a.valid || w == 0) {
    std::memset(a.row, 0, sizeof(double) * a.cols);
    return;
  }
  const double coef = w / sum_exp, offset = w * a.ls / v;
  for (int64_t j = 0; j < a.cols; ++j)
    a.row[j] = (coef * a.row[j] - offset) * (a.inv_b != nullptr ? a.inv_b[j] : 1.0);
  a.row[a.target] -= w * (1 - a.ls) * (a.inv_b != nullptr ? a.inv_b[a.target] : 1.0);
}

template <typename acc_t, typename Fn>
void run(const StripEpilogue<acc_t>& e, Fn row_fn) {
  at::parallel_for(0, e.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row_fn(RowArgs<acc_t>{e.scores + r * e.ld, e.cols, e.row_scale[r], e.inv_b, e.targets[r], e.valid[r],
                            e.weight ? e.weight + r : nullptr, e.label_smoothing, e.loss + r, e.lse + r});
    }
  });
}

}  // namespace

void run_strip_epilogue(const StripEpilogue<float>& e) {
  static const RowFn row_fn = pick_row_fn();
  run(e, row_fn);
}

void run_strip_epilogue(const StripEpilogue<double>& e) { run(e, epilogue_row_f64); }

}  // namespace vocabsem
