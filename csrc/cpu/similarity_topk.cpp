// Fused similarity top-k on the CPU: GEMM tiles of rows x V-chunk scores and, per row, a
// running top-k (sorted, insertion only when a score beats the current k-th). The N x V scores
// never exist; the bases' inverse norms scale each tile as it is scanned.
#include "checks.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace vocabsem {

at::Tensor row_norms(const at::Tensor& x);

namespace {

// torch.topk's order: NaN ranks above every number.
template <typename T>
inline bool ranks_above(T a, T b) {
  return (a != a && b == b) || a > b;
}

// Insert (value, index) into row's descending top-k list of current length `filled`.
template <typename T>
inline void insert(T* values, int64_t* indices, int64_t k, int64_t& filled, T value, int64_t index) {
  int64_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && ranks_above(value, values[pos - 1])) {
    values[pos] = values[pos - 1];
    indices[pos] = indices[pos - 1];
    --pos;
  }
  values[pos] = value;
  indices[pos] = index;
}

template <typename T>
void scan_tile(const T* tile, int64_t rows, int64_t cols, int64_t ld, int64_t col0, const T* inv_b, int64_t k,
               T* values, int64_t* indices, int64_t* filled) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* z = tile + r * ld;
      T* v = values + r * k;
      int64_t* idx = indices + r * k;
      int64_t& n = filled[r];
      for (int64_t j = 0; j < cols; ++j) {
        const T s = inv_b != nullptr ? z[j] * inv_b[col0 + j] : z[j];
        if (n < k || ranks_above(s, v[k - 1])) insert(v, idx, k, n, s, col0 + j);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> similarity_topk(const at::Tensor& hidden, const at::Tensor& bases, int64_t k, double scale,
                                        bool normalize, double eps, int64_t max_tile_elements) {
  VS_CHECK_CPU(hidden);
  VS_CHECK_CPU(bases);
  VS_CHECK_DIM(hidden, 2);
  VS_CHECK_DIM(bases, 2);
  VS_CHECK_FLOATING(hidden);
  TORCH_CHECK_TYPE(bases.scalar_type() == hidden.scalar_type(), "bases must have the dtype of hidden");
  TORCH_CHECK_VALUE(hidden.size(1) == bases.size(1), "hidden and bases must have the same hidden size");
  TORCH_CHECK_VALUE(k >= 1 && k <= bases.size(0), "k must lie in [1, V]");
  TORCH_CHECK_VALUE(max_tile_elements > 0, "max_tile_elements must be positive");

  const auto acc = accumulate_type(hidden.scalar_type());
  const auto opts = hidden.options().dtype(acc);
  const int64_t n = hidden.size(0), v = bases.size(0);
  at::Tensor values = at::empty({n, k}, opts);
  at::Tensor indices = at::empty({n, k}, hidden.options().dtype(at::kLong));
  if (n == 0) return {values, indices};

  // Row factors scale * / max(|h|, eps), applied a block at a time (no scaled copy of hidden).
  at::Tensor row_factor, inv_b;
  if (normalize) {
    row_factor = row_norms(hidden).clamp_min(eps).reciprocal().mul_(scale).unsqueeze(1);
    inv_b = row_norms(bases).clamp_min(eps).reciprocal();
  }
  // Tiles of at most max_tile_elements scores: V-chunks of up to 8192 columns, as many rows as fit
  // (a small vocabulary of centroids gets tall tiles, which keeps the GEMMs efficient).
  const int64_t chunk = std::min<int64_t>(v, 8192);
  const int64_t block_rows = std::min<int64_t>(n, std::max<int64_t>(1, max_tile_elements / chunk));
  at::Tensor tile_buffer = at::empty({block_rows, chunk}, opts);
  std::vector<int64_t> filled(block_rows);

  // bf16 inputs multiply natively (oneDNN): the scaled rows and each product are rounded to bf16,
  // as the naive bf16 path rounds its normalised inputs and logits; other dtypes compute in acc.
  const bool native_bf16 = hidden.scalar_type() == at::kBFloat16;
  AT_DISPATCH_FLOATING_TYPES(acc, "similarity_topk", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
      const int64_t rows = std::min(block_rows, n - r0);
      std::fill(filled.begin(), filled.end(), 0);
      at::Tensor Hb = hidden.narrow(0, r0, rows).to(acc);
      if (normalize) {
        Hb = Hb * row_factor.narrow(0, r0, rows);
      } else if (scale != 1.0) {
        Hb = Hb * scale;
      }
      if (native_bf16) Hb = Hb.to(at::kBFloat16);
      for (int64_t c0 = 0; c0 < v; c0 += chunk) {
        const int64_t cols = std::min(chunk, v - c0);
        at::Tensor tile = tile_buffer.narrow(0, 0, rows).narrow(1, 0, cols);
        if (native_bf16) {
          tile.copy_(at::mm(Hb, bases.narrow(0, c0, cols).t()));
        } else {
          at::mm_out(tile, Hb, bases.narrow(0, c0, cols).to(acc).t());
        }
        scan_tile<scalar_t>(tile.data_ptr<scalar_t>(), rows, cols, tile.stride(0), c0,
                            normalize ? inv_b.data_ptr<scalar_t>() : nullptr, k,
                            values.data_ptr<scalar_t>() + r0 * k, indices.data_ptr<int64_t>() + r0 * k,
                            filled.data());
      }
    }
  });
  return {values, indices};
}

}  // namespace vocabsem
