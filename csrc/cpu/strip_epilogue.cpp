// The strip epilogue in three passes over each row while it sits in L2: (1) column scale,
// running max and sum; (2) exp and its sum; (3) the gradient tile. The float32 exp is a
// branch-free polynomial so that GCC vectorises the loop; target_clones builds AVX-512, AVX2 and
// baseline versions and picks one at load time (no -march flag needed, so the .so runs anywhere).
#include "strip_epilogue.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace vocabsem {
namespace {

// exp(x) for float32: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 Taylor polynomial
// (relative error below 1e-8 on that range), 2^n assembled in the exponent bits. Saturates to
// 0 below -87.3 and to +inf above 88.7; NaN stays NaN.
inline float exp_f32(float x) {
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = std::floor(xc * log2e + 0.5f);
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.7f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp_f32(x); }

template <typename acc_t>
__attribute__((always_inline)) inline void epilogue_row_body(acc_t* row, int64_t cols, const acc_t* inv_b, int64_t target, bool valid, const acc_t* weight_ptr,
                  acc_t ls, acc_t* loss, acc_t* lse) {
  // pass 1: scale columns by the bases' inverse norms, running max and sum of scores
  acc_t row_max = -std::numeric_limits<acc_t>::infinity(), row_sum = 0;
  bool has_nan = false;
  if (inv_b != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] *= inv_b[j];
  }
#pragma omp simd reduction(max : row_max) reduction(+ : row_sum) reduction(| : has_nan)
  for (int64_t j = 0; j < cols; ++j) {
    row_max = row[j] > row_max ? row[j] : row_max;
    row_sum += row[j];
    has_nan |= row[j] != row[j];
  }
  if (has_nan) row_max = std::numeric_limits<acc_t>::quiet_NaN();  // the simd max drops NaN
  const acc_t picked = row[target];
  const acc_t shift = row_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : row_max;
  // pass 2: exponentials and their sum
  acc_t sum_exp = 0;
#pragma omp simd reduction(+ : sum_exp)
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t e = exp_any(row[j] - shift);
    row[j] = e;
    sum_exp += e;
  }
  const acc_t row_lse = shift + std::log(sum_exp);
  *lse = row_lse;
  const acc_t v = static_cast<acc_t>(cols);
  *loss = valid ? row_lse - (1 - ls) * picked - (ls > 0 ? ls * row_sum / v : acc_t(0)) : acc_t(0);
  if (weight_ptr == nullptr) return;
  // pass 3: G'_j = w (softmax_j - ls / V - (1 - ls) [j == t]) / |B_j|
  const acc_t w = *weight_ptr;
  if (!valid || w == 0) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = 0;
    return;
  }
  const acc_t coef = w / sum_exp, offset = w * ls / v;
  if (inv_b != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = (coef * row[j] - offset) * inv_b[j];
    row[target] -= w * (1 - ls) * inv_b[target];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = coef * row[j] - offset;
    row[target] -= w * (1 - ls);
  }
}

// target_clones needs plain functions: one per accumulation type.
__attribute__((target_clones("avx512f", "avx2", "default")))
void epilogue_row(float* row, int64_t cols, const float* inv_b, int64_t target, bool valid, const float* weight,
                  float ls, float* loss, float* lse) {
  epilogue_row_body<float>(row, cols, inv_b, target, valid, weight, ls, loss, lse);
}

void epilogue_row(double* row, int64_t cols, const double* inv_b, int64_t target, bool valid, const double* weight,
                  double ls, double* loss, double* lse) {
  epilogue_row_body<double>(row, cols, inv_b, target, valid, weight, ls, loss, lse);
}

template <typename acc_t>
void run(const StripEpilogue<acc_t>& e) {
  at::parallel_for(0, e.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      epilogue_row(e.scores + r * e.ld, e.cols, e.inv_b, e.targets[r], e.valid[r],
                          e.weight ? e.weight + r : nullptr, e.label_smoothing, e.loss + r, e.lse + r);
    }
  });
}

}  // namespace

void run_strip_epilogue(const StripEpilogue<float>& e) { run(e); }
void run_strip_epilogue(const StripEpilogue<double>& e) { run(e); }

}  // namespace vocabsem
