// The strip epilogue in three passes over each row while it sits in L2: (1) row and column
// scales, running max and sum; (2) exp and its sum; (3) the gradient tile. A bf16 strip (the
// product of native bf16 GEMMs) is widened a row at a time into a float32 scratch row, so the
// arithmetic is float32 either way and the gradient tile is rounded to bf16 once.
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
#include <tuple>
#include <vector>

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
  acc_t* row;           // the row in float (a scratch row when the strip is stored in bf16)
  uint16_t* bf16_row;   // the bf16 row of the strip, or null
  int64_t cols;
  acc_t row_scale;
  const acc_t* inv_b;
  int64_t target;       // the target's column within this strip (outside [0, cols) in another chunk)
  bool valid;
  const acc_t* weight;
  acc_t ls;
  acc_t* loss;
  acc_t* lse;
  const acc_t* lse_in;  // column-chunk mode: the row's lse over the vocabulary
  bool partial;         // partial mode: the chunk's lse and loss terms, scores left as they are
  int64_t vocab;
};

// bf16 <-> float32 for a row: a bf16 is the top half of a float32; the way back rounds to
// nearest even and keeps NaN a (quiet) NaN.
template <typename V, typename U32, typename U16>
VS_INLINE V load_bf16(const uint16_t* p) {
  U16 h;
  std::memcpy(&h, p, sizeof(U16));
  return __builtin_bit_cast(V, __builtin_convertvector(h, U32) << 16);
}

template <typename V, typename U32, typename U16>
VS_INLINE void store_bf16(uint16_t* p, V v) {
  const U32 b = __builtin_bit_cast(U32, v);
  const U32 rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const U16 h = __builtin_convertvector(v != v ? (b >> 16) | 0x40u : rounded, U16);
  std::memcpy(p, &h, sizeof(U16));
}

VS_INLINE float bf16_scalar(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(float));
  return x;
}

VS_INLINE uint16_t to_bf16_scalar(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(float));
  return static_cast<uint16_t>(x != x ? (b >> 16) | 0x40u : (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

template <typename V, typename U32, typename U16>
VS_INLINE void bf16_to_f32(const uint16_t* in, float* out, int64_t cols) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + W <= cols; j += W) store(out + j, load_bf16<V, U32, U16>(in + j));
  for (; j < cols; ++j) out[j] = bf16_scalar(in[j]);
}

template <typename V, typename U32, typename U16>
VS_INLINE void f32_to_bf16(const float* in, uint16_t* out, int64_t cols) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + W <= cols; j += W) store_bf16<V, U32, U16>(out + j, load<V>(in + j));
  for (; j < cols; ++j) out[j] = to_bf16_scalar(in[j]);
}

// Whole-row mode: loss, lse and (when weight is given) the gradient row, from the three passes above.
template <typename V, typename I>
VS_INLINE void whole_row_f32(const RowArgs<float>& a) {
  float row_max, row_sum;
  bool has_nan;
  scale_max_sum<V, I>(a.row, a.cols, a.row_scale, a.inv_b, row_max, row_sum, has_nan);
  if (has_nan) row_max = std::numeric_limits<float>::quiet_NaN();
  const float picked = a.row[a.target];
  const float shift = row_max == -std::numeric_limits<float>::infinity() ? 0.0f : row_max;
  const float sum_exp = exp_in_place<V, I>(a.row, a.cols, shift);
  const float row_lse = shift + std::log(sum_exp);
  const float v = static_cast<float>(a.vocab);
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

// Column-chunk mode: the chunk's gradient tile (w exp(z - lse) - w ls / V) / |b_c| (the target's
// column less w (1 - ls) / |b_t|) in one pass over the stored row, bf16 or float32, with the lse
// already known. The target element is formed from its raw score kept aside, so a bf16 tile is
// rounded once there too.
template <typename V, typename I, typename U32, typename U16, bool BF16>
VS_INLINE void chunk_row_f32(const RowArgs<float>& a) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  const float w = *a.weight;
  if (!a.valid || w == 0) {
    if (BF16)
      std::memset(a.bf16_row, 0, sizeof(uint16_t) * a.cols);
    else
      std::memset(a.row, 0, sizeof(float) * a.cols);
    return;
  }
  const bool has_target = a.target >= 0 && a.target < a.cols;
  const float raw_target = !has_target ? 0.0f : BF16 ? bf16_scalar(a.bf16_row[a.target]) : a.row[a.target];
  const float lse = *a.lse_in, offset = w * a.ls / static_cast<float>(a.vocab);
  auto element = [&](float raw, float inv) { return (w * std::exp(raw * a.row_scale * inv - lse) - offset) * inv; };
  int64_t j = 0;
  for (; j + W <= a.cols; j += W) {
    const V raw = BF16 ? load_bf16<V, U32, U16>(a.bf16_row + j) : load<V>(a.row + j);
    const V inv = a.inv_b != nullptr ? load<V>(a.inv_b + j) : splat<V>(1.0f);
    const V g = (vexp<V, I>(raw * (inv * a.row_scale) - lse) * w - offset) * inv;
    if (BF16)
      store_bf16<V, U32, U16>(a.bf16_row + j, g);
    else
      store(a.row + j, g);
  }
  for (; j < a.cols; ++j) {
    const float inv = a.inv_b != nullptr ? a.inv_b[j] : 1.0f;
    if (BF16)
      a.bf16_row[j] = to_bf16_scalar(element(bf16_scalar(a.bf16_row[j]), inv));
    else
      a.row[j] = element(a.row[j], inv);
  }
  if (has_target) {
    const float inv = a.inv_b != nullptr ? a.inv_b[a.target] : 1.0f;
    const float g = element(raw_target, inv) - w * (1 - a.ls) * inv;
    if (BF16)
      a.bf16_row[a.target] = to_bf16_scalar(g);
    else
      a.row[a.target] = g;
  }
}

// Partial mode: over a column chunk, read-only, the chunk's log-sum-exp and its terms of the loss,
// -(1 - ls) z_target (when the target is in the chunk) - ls sum(z) / V; the caller merges chunks.
template <typename V, typename I, typename U32, typename U16, bool BF16>
VS_INLINE void partial_row_f32(const RowArgs<float>& a) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  auto logits = [&](int64_t j) {
    const V raw = BF16 ? load_bf16<V, U32, U16>(a.bf16_row + j) : load<V>(a.row + j);
    return a.inv_b != nullptr ? raw * (load<V>(a.inv_b + j) * a.row_scale) : raw * a.row_scale;
  };
  auto logit = [&](int64_t j) {
    const float raw = BF16 ? bf16_scalar(a.bf16_row[j]) : a.row[j];
    return raw * a.row_scale * (a.inv_b != nullptr ? a.inv_b[j] : 1.0f);
  };
  V vmax = splat<V>(-std::numeric_limits<float>::infinity()), vsum = splat<V>(0.0f);
  I nan_lanes = I{};
  int64_t j = 0;
  for (; j + W <= a.cols; j += W) {
    const V z = logits(j);
    vmax = z > vmax ? z : vmax;
    vsum += z;
    nan_lanes |= z != z;
  }
  float row_max = hmax(vmax), row_sum = hsum(vsum);
  bool has_nan = false;
  for (unsigned l = 0; l < W; ++l) has_nan |= nan_lanes[l] != 0;
  for (int64_t t = j; t < a.cols; ++t) {
    const float z = logit(t);
    row_max = z > row_max ? z : row_max;
    row_sum += z;
    has_nan |= z != z;
  }
  if (has_nan) row_max = std::numeric_limits<float>::quiet_NaN();
  const float shift = row_max == -std::numeric_limits<float>::infinity() ? 0.0f : row_max;
  V vexp_sum = splat<V>(0.0f);
  for (j = 0; j + W <= a.cols; j += W) vexp_sum += vexp<V, I>(logits(j) - shift);
  float sum_exp = hsum(vexp_sum);
  for (int64_t t = j; t < a.cols; ++t) sum_exp += std::exp(logit(t) - shift);
  *a.lse = shift + std::log(sum_exp);
  const bool has_target = a.target >= 0 && a.target < a.cols;
  const float picked = has_target ? (1 - a.ls) * logit(a.target) : 0.0f;
  *a.loss = a.valid ? -picked - (a.ls > 0 ? a.ls * row_sum / static_cast<float>(a.vocab) : 0.0f) : 0.0f;
}

template <typename V, typename I, typename U32, typename U16>
VS_INLINE void epilogue_row_f32(const RowArgs<float>& a) {
  if (a.partial) {
    if (a.bf16_row != nullptr)
      partial_row_f32<V, I, U32, U16, true>(a);
    else
      partial_row_f32<V, I, U32, U16, false>(a);
    return;
  }
  if (a.lse_in != nullptr) {  // straight from the strip, no scratch row
    if (a.bf16_row != nullptr)
      chunk_row_f32<V, I, U32, U16, true>(a);
    else
      chunk_row_f32<V, I, U32, U16, false>(a);
    return;
  }
  if (a.bf16_row != nullptr) bf16_to_f32<V, U32, U16>(a.bf16_row, a.row, a.cols);
  whole_row_f32<V, I>(a);
  if (a.bf16_row != nullptr && a.weight != nullptr) f32_to_bf16<V, U32, U16>(a.row, a.bf16_row, a.cols);
}

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));

__attribute__((target("avx512f,avx512bw"))) void row_avx512(const RowArgs<float>& a) {
  epilogue_row_f32<f32x16, i32x16, u32x16, u16x16>(a);
}
__attribute__((target("avx2,fma"))) void row_avx2(const RowArgs<float>& a) {
  epilogue_row_f32<f32x8, i32x8, u32x8, u16x8>(a);
}
void row_sse2(const RowArgs<float>& a) { epilogue_row_f32<f32x4, i32x4, u32x4, u16x4>(a); }

using RowFn = void (*)(const RowArgs<float>&);

RowFn pick_row_fn() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return row_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return row_avx2;
  return row_sse2;
}

// float64: plain loops (correctness checks and gradcheck, not speed).
void epilogue_row_f64(const RowArgs<double>& a) {
  const double v = static_cast<double>(a.vocab);
  auto scale = [&] {
    double row_max = -std::numeric_limits<double>::infinity(), row_sum = 0;
    bool has_nan = false;
    for (int64_t j = 0; j < a.cols; ++j) {
      a.row[j] *= a.row_scale * (a.inv_b != nullptr ? a.inv_b[j] : 1.0);
      row_max = a.row[j] > row_max ? a.row[j] : row_max;
      row_sum += a.row[j];
      has_nan |= a.row[j] != a.row[j];
    }
    return std::make_tuple(has_nan ? std::numeric_limits<double>::quiet_NaN() : row_max, row_sum);
  };
  auto gradient = [&](double coef, double shift) {
    for (int64_t j = 0; j < a.cols; ++j)
      a.row[j] = (coef * std::exp(a.row[j] - shift) - *a.weight * a.ls / v) * (a.inv_b != nullptr ? a.inv_b[j] : 1.0);
    if (a.target >= 0 && a.target < a.cols)
      a.row[a.target] -= *a.weight * (1 - a.ls) * (a.inv_b != nullptr ? a.inv_b[a.target] : 1.0);
  };
  if (a.partial) {  // read-only: the chunk's lse and loss terms
    double row_max = -std::numeric_limits<double>::infinity(), row_sum = 0;
    bool has_nan = false;
    auto logit = [&](int64_t j) { return a.row[j] * a.row_scale * (a.inv_b != nullptr ? a.inv_b[j] : 1.0); };
    for (int64_t j = 0; j < a.cols; ++j) {
      const double z = logit(j);
      row_max = z > row_max ? z : row_max;
      row_sum += z;
      has_nan |= z != z;
    }
    if (has_nan) row_max = std::numeric_limits<double>::quiet_NaN();
    const double shift = row_max == -std::numeric_limits<double>::infinity() ? 0.0 : row_max;
    double sum_exp = 0;
    for (int64_t j = 0; j < a.cols; ++j) sum_exp += std::exp(logit(j) - shift);
    *a.lse = shift + std::log(sum_exp);
    const double picked = a.target >= 0 && a.target < a.cols ? (1 - a.ls) * logit(a.target) : 0.0;
    *a.loss = a.valid ? -picked - (a.ls > 0 ? a.ls * row_sum / v : 0.0) : 0.0;
    return;
  }
  const bool zero_gradient = a.weight != nullptr && (!a.valid || *a.weight == 0);
  if (a.lse_in != nullptr) {  // column-chunk mode
    if (zero_gradient) {
      std::memset(a.row, 0, sizeof(double) * a.cols);
      return;
    }
    scale();
    gradient(*a.weight, *a.lse_in);
    return;
  }
  const auto [row_max, row_sum] = scale();
  const double picked = a.row[a.target];
  const double shift = row_max == -std::numeric_limits<double>::infinity() ? 0.0 : row_max;
  double sum_exp = 0;
  for (int64_t j = 0; j < a.cols; ++j) sum_exp += std::exp(a.row[j] - shift);
  const double row_lse = shift + std::log(sum_exp);
  *a.lse = row_lse;
  *a.loss = a.valid ? row_lse - (1 - a.ls) * picked - (a.ls > 0 ? a.ls * row_sum / v : 0.0) : 0.0;
  if (a.weight == nullptr) return;
  if (zero_gradient) {
    std::memset(a.row, 0, sizeof(double) * a.cols);
    return;
  }
  gradient(*a.weight / sum_exp, shift);
}

template <typename acc_t, typename Fn>
void run(const StripEpilogue<acc_t>& e, Fn row_fn) {
  const bool partial = e.partial;
  const int64_t vocab = e.lse_in != nullptr || partial ? e.vocab : e.cols;
  at::parallel_for(0, e.rows, 1, [&](int64_t begin, int64_t end) {
    // a bf16 row widened to float (the column-chunk mode works on the stored row directly)
    std::vector<acc_t> scratch(e.scores_bf16 != nullptr && e.lse_in == nullptr && !partial ? e.cols : 0);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* row = e.scores_bf16 != nullptr ? scratch.data() : e.scores + r * e.ld;
      uint16_t* bf16_row = e.scores_bf16 != nullptr ? e.scores_bf16 + r * e.ld : nullptr;
      row_fn(RowArgs<acc_t>{row, bf16_row, e.cols, e.row_scale[r], e.inv_b, e.targets[r] - e.col_offset,
                            e.valid[r], e.weight ? e.weight + r : nullptr, e.label_smoothing,
                            e.loss ? e.loss + r : nullptr, e.lse ? e.lse + r : nullptr,
                            e.lse_in ? e.lse_in + r : nullptr, partial, vocab});
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
