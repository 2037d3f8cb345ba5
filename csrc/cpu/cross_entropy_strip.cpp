// The CPU epilogue of one cross-entropy strip, as the strip algorithm (vocabsem_fast/backends/
// strips.py) calls it between its GEMMs: the R x V raw scores of R hidden rows against the whole
// vocabulary become per-row loss and log-sum-exp and, when a weight is given, the gradient tile
// weight_r * (softmax - (1 - ls) onehot - ls / V) * inv_b[c], in place. Given `vocab`, the
// scores are a column chunk starting at col_offset of that vocabulary: without lse, the chunk's
// own lse and loss terms come back (scores unchanged); with the rows' lse, only the chunk's
// gradient tile is written. Scores are float32, float64 or bfloat16 (arithmetic in float32).
#include "checks.h"
#include "strip_epilogue.h"

#include <type_traits>
#include <vector>

namespace vocabsem {

std::vector<at::Tensor> cross_entropy_strip(at::Tensor& scores, const at::Tensor& row_scale,
                                            const c10::optional<at::Tensor>& col_scale, const at::Tensor& targets,
                                            const at::Tensor& valid, const c10::optional<at::Tensor>& weight,
                                            double label_smoothing, const c10::optional<at::Tensor>& lse_in,
                                            int64_t col_offset, int64_t vocab) {
  VS_CHECK_CPU(scores);
  VS_CHECK_DIM(scores, 2);
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble ||
                       scores.scalar_type() == at::kBFloat16,
                   "scores must be float32, float64 or bfloat16, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(scores.stride(1) == 1, "scores must have unit stride along its columns");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  TORCH_CHECK_VALUE(cols > 0, "scores must have at least one column");
  const bool bf16 = scores.scalar_type() == at::kBFloat16;
  const auto acc = bf16 ? at::kFloat : scores.scalar_type();
  auto vector = [&](const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t size) {
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 1 && x.size(0) == size && x.is_contiguous(), name,
                      " must be a contiguous CPU vector of length ", size, ", got shape ", x.sizes());
    TORCH_CHECK_TYPE(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  };
  vector(row_scale, "row_scale", acc, rows);
  vector(targets, "targets", at::kLong, rows);
  vector(valid, "valid", at::kBool, rows);
  if (col_scale) vector(*col_scale, "col_scale", acc, cols);
  if (weight) vector(*weight, "weight", acc, rows);
  const bool chunk = lse_in.has_value(), partial = !chunk && vocab > 0;
  if (chunk || partial) {
    TORCH_CHECK_VALUE(col_offset >= 0 && col_offset + cols <= vocab, "the chunk [", col_offset, ", ",
                      col_offset + cols, ") must lie in the vocabulary [0, ", vocab, ")");
  } else {
    TORCH_CHECK_VALUE(col_offset == 0, "col_offset is only for a column chunk (given vocab)");
    vocab = cols;
  }
  if (chunk) {
    vector(*lse_in, "lse", acc, rows);
    TORCH_CHECK_VALUE(weight.has_value(), "a gradient chunk needs the weight: it only forms the gradient tile");
  }
  TORCH_CHECK_VALUE(!partial || !weight.has_value(),
                    "a partial chunk (vocab without lse) forms no gradient: weight must be None");
  if (rows > 0) {
    const auto [lo, hi] = at::aminmax(targets);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < vocab, "targets must lie in [0, ", vocab, ")");
  }

  const auto out_options = scores.options().dtype(acc);
  at::Tensor loss = at::empty({chunk ? 0 : rows}, out_options), lse = at::empty({chunk ? 0 : rows}, out_options);
  if (rows == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES(acc, "cross_entropy_strip", [&] {
    StripEpilogue<scalar_t> e{};
    if (bf16) {
      if constexpr (std::is_same_v<scalar_t, float>) e.scores_bf16 = reinterpret_cast<uint16_t*>(scores.data_ptr());
    } else {
      e.scores = scores.data_ptr<scalar_t>();
    }
    e.rows = rows;
    e.cols = cols;
    e.ld = scores.stride(0);
    e.row_scale = row_scale.data_ptr<scalar_t>();
    e.inv_b = col_scale ? col_scale->data_ptr<scalar_t>() : nullptr;
    e.targets = targets.data_ptr<int64_t>();
    e.valid = valid.data_ptr<bool>();
    e.weight = weight ? weight->data_ptr<scalar_t>() : nullptr;
    e.label_smoothing = static_cast<scalar_t>(label_smoothing);
    e.loss = chunk ? nullptr : loss.data_ptr<scalar_t>();
    e.lse = chunk ? nullptr : lse.data_ptr<scalar_t>();
    e.lse_in = chunk ? lse_in->data_ptr<scalar_t>() : nullptr;
    e.col_offset = col_offset;
    e.vocab = vocab;
    e.partial = partial;
    run_strip_epilogue(e);
  });
  return {loss, lse};
}

}  // namespace vocabsem
