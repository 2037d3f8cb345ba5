// Row-wise epilogue of the fused similarity cross-entropy on one R x V strip of scores.
#pragma once
#include <cstdint>

namespace vocabsem {

// Inputs/outputs of one strip, float32 or float64 (acc_t). All pointers are to R rows
// (row stride ld) except the per-row vectors (length R) and inv_b (length cols, or null when the
// bases are not normalised). The logits are scores * row_scale[r] * inv_b[c].
//
// Three modes. Whole rows (lse_in null, not partial): the strip spans the vocabulary; per-row
// loss and lse out and, with a weight, the gradient tile in place. Partial (a column chunk
// [col_offset, col_offset + cols) of a vocabulary of `vocab`, no weight): the chunk's own lse and
// its terms of the loss, -(1 - ls) z_target (target in the chunk) - ls sum(z) / V, the scores
// left unchanged; the caller merges the chunks. Gradient chunk (lse_in given, weight required):
// the rows' lse known from the partial pass; only the chunk's gradient tile is written.
template <typename acc_t>
struct StripEpilogue {
  acc_t* scores;             // in: raw hidden . bases; out: the gradient tile G' (or exp scores when no grad)
  uint16_t* scores_bf16;     // instead of scores (float32 only): bfloat16 storage, computed in float32
  int64_t rows, cols, ld;
  const acc_t* row_scale;    // per row: scale / max(|h_r|, eps) (or the scale alone)
  const acc_t* inv_b;        // 1 / max(|B_j|, eps), folded into scores and into G'
  const int64_t* targets;    // per row, already in [0, V) (ignored rows carry any valid id)
  const bool* valid;         // per row: target != ignore_index
  const acc_t* weight;       // per row weight of the loss in the gradient, or null: no gradient
  acc_t label_smoothing;
  acc_t* loss;               // out, per row (0 where ignored)
  acc_t* lse;                // out, per row
  const acc_t* lse_in;       // column-chunk mode: the rows' log-sum-exp over the whole vocabulary
  bool partial;               // partial mode (see above)
  int64_t col_offset, vocab;  // chunk modes: where the chunk starts, the vocabulary size
};

void run_strip_epilogue(const StripEpilogue<float>& e);
void run_strip_epilogue(const StripEpilogue<double>& e);

}  // namespace vocabsem
