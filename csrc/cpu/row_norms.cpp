// Euclidean norms of the rows of a matrix, accumulated in float32 (float64 for double input);
// NaN for a row holding an infinite entry (its normalised form is NaN, not the 0 of an overflow).
// The similarity ops normalise hidden states and bases by these norms: computing them once per
// tensor lets the GEMM tiles run on raw inputs with the inverse norm applied as a rank-1 scale.
#include "checks.h"

#include <ATen/Parallel.h>
#include <cmath>
#include <limits>

namespace vocabsem {
namespace {

template <typename scalar_t, typename acc_t>
void row_norms_kernel(const scalar_t* x, int64_t rows, int64_t cols, int64_t row_stride, acc_t* out) {
  at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * row_stride;  // int64 offset: rows * stride can pass 2^31
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        sum += v * v;
      }
      out[r] = std::sqrt(sum);
      // An infinite norm is an overflow of finite entries (the row normalises to 0, as
      // x / max(|x|, eps) does) or an infinite entry (it normalises to NaN): tell them apart
      // here, where it costs a second look at the rare overflowing row only.
      if (std::isinf(out[r])) {
        for (int64_t c = 0; c < cols; ++c) {
          if (std::isinf(static_cast<acc_t>(row[c]))) {
            out[r] = std::numeric_limits<acc_t>::quiet_NaN();
            break;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor row_norms(const at::Tensor& x) {
  VS_CHECK_CPU(x);
  VS_CHECK_DIM(x, 2);
  VS_CHECK_FLOATING(x);
  // Rows may be strided (a slice of a larger matrix); elements within a row must be adjacent.
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor out = at::empty({xs.size(0)}, xs.options().dtype(accumulate_type(xs.scalar_type())));
  if (xs.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "row_norms", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    row_norms_kernel<scalar_t, acc_t>(xs.data_ptr<scalar_t>(), xs.size(0), xs.size(1), xs.stride(0),
                                      out.data_ptr<acc_t>());
  });
  return out;
}

}  // namespace vocabsem
