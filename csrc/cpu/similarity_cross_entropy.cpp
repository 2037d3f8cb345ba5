// Fused similarity cross-entropy on the CPU.
//
// Rows are processed in strips of R rows against the whole vocabulary: one GEMM fills the
// R x V strip (the inverse norms of the bases applied as a rank-1 column scale), the epilogue
// turns it into log-sum-exp, target logit and loss, and, when gradients are wanted, into the
// weighted softmax-minus-one-hot in place; two more GEMMs then give dHidden for the strip and
// accumulate dBases. Forward plus backward thus costs three GEMMs (not four) and the strip,
// bounded by max_strip_elements, is the only workspace. GEMMs run on the raw bases (folding the
// inverse norms into the strip), so no normalised copy of the (V, d) bases is made; half-precision
// bases are converted a V-chunk at a time.
#include "checks.h"
#include "strip_epilogue.h"

#include <algorithm>
#include <vector>

namespace vocabsem {

at::Tensor row_norms(const at::Tensor& x);

namespace {

constexpr int64_t kConvertChunk = 4096;  // rows of bases converted or renormalised at a time

// The bases rows [start, stop) in the accumulation dtype (a view when already in it).
at::Tensor bases_chunk(const at::Tensor& bases, int64_t start, int64_t stop, at::ScalarType acc) {
  return bases.narrow(0, start, stop - start).to(acc);
}

}  // namespace

std::vector<at::Tensor> similarity_cross_entropy(const at::Tensor& hidden, const at::Tensor& bases,
                                                 const at::Tensor& targets, double scale, bool normalize,
                                                 double eps, int64_t ignore_index, double label_smoothing,
                                                 const at::Tensor& row_weight, bool need_hidden, bool need_bases,
                                                 int64_t max_strip_elements) {
  VS_CHECK_CPU(hidden);
  VS_CHECK_CPU(bases);
  VS_CHECK_CPU(targets);
  VS_CHECK_DIM(hidden, 2);
  VS_CHECK_DIM(bases, 2);
  VS_CHECK_DIM(targets, 1);
  VS_CHECK_FLOATING(hidden);
  TORCH_CHECK_TYPE(bases.scalar_type() == hidden.scalar_type(), "bases must have the dtype of hidden");
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK_VALUE(hidden.size(1) == bases.size(1), "hidden and bases must have the same hidden size");
  TORCH_CHECK_VALUE(targets.size(0) == hidden.size(0), "targets must have one entry per row of hidden");
  TORCH_CHECK_VALUE(bases.size(0) > 0, "bases must have at least one row");
  TORCH_CHECK_VALUE(max_strip_elements > 0, "max_strip_elements must be positive");
  const bool need_grad = need_hidden || need_bases;
  if (need_grad) {
    VS_CHECK_DIM(row_weight, 1);
    TORCH_CHECK_VALUE(row_weight.size(0) == hidden.size(0), "row_weight must have one entry per row");
  }

  const auto acc = accumulate_type(hidden.scalar_type());
  const auto opts = hidden.options().dtype(acc);
  const int64_t n = hidden.size(0), v = bases.size(0);
  const double ls = label_smoothing;
  const bool convert = bases.scalar_type() != acc;
  const int64_t chunk = convert ? kConvertChunk : v;

  // Hidden side, once: H = scale * hidden / max(|hidden|, eps).
  at::Tensor hidden_acc = hidden.to(acc);
  at::Tensor inv_h, pass_h, inv_b, pass_b;
  if (normalize) {
    const at::Tensor norms_h = row_norms(hidden), norms_b = row_norms(bases);
    inv_h = norms_h.clamp_min(eps).reciprocal();
    pass_h = norms_h.ge(eps);  // where the eps clamp is inactive the norm carries a gradient
    inv_b = norms_b.clamp_min(eps).reciprocal();
    pass_b = norms_b.ge(eps);
  }
  const at::Tensor H = normalize ? hidden_acc * (inv_h * scale).unsqueeze(1) : hidden_acc * scale;

  const at::Tensor valid = targets.ne(ignore_index).contiguous();
  const at::Tensor safe_targets = at::where(valid, targets, at::zeros_like(targets)).contiguous();
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor grad_H = need_hidden ? at::empty({n, hidden.size(1)}, opts) : at::Tensor();
  // filled by the first strip's GEMM (beta = 0), accumulated by the others: no zero-fill pass
  at::Tensor grad_X = need_bases ? at::empty({v, bases.size(1)}, opts) : at::Tensor();

  // Every strip adds its G^T H into the whole (V, d) bases gradient, so the strip count is the
  // number of passes over that gradient: keep strips at least d / 2 rows (the strip then holds at
  // most half as many scores as the gradient has entries) so that large heads are not swept
  // dozens of times; otherwise max_strip_elements bounds the strip.
  const int64_t wanted_rows = std::max<int64_t>(max_strip_elements / v, need_bases ? hidden.size(1) / 2 : 1);
  const int64_t strip_rows = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(n, 1), wanted_rows));
  at::Tensor strip_buffer = at::empty({strip_rows, v}, opts);
  const at::Tensor weight = need_grad ? row_weight.to(acc).contiguous() : at::Tensor();

  for (int64_t r0 = 0; r0 < n; r0 += strip_rows) {
    const int64_t rows = std::min(strip_rows, n - r0);
    at::Tensor S = strip_buffer.narrow(0, 0, rows);
    const at::Tensor Hb = H.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < v; c0 += chunk) {
      const int64_t c1 = std::min(v, c0 + chunk);
      at::Tensor out = S.narrow(1, c0, c1 - c0);
      at::mm_out(out, Hb, bases_chunk(bases, c0, c1, acc).t());
    }
    // Epilogue: scores -> per-row loss and lse, and (when wanted) the gradient tile
    // G' = w (softmax - (1 - ls) onehot - ls / V) / |B| in place, which lets both gradient GEMMs
    // use the raw bases.
    AT_DISPATCH_FLOATING_TYPES(acc, "similarity_cross_entropy_epilogue", [&] {
      StripEpilogue<scalar_t> e{};
      e.scores = S.data_ptr<scalar_t>();
      e.rows = rows;
      e.cols = v;
      e.ld = S.stride(0);
      e.inv_b = normalize ? inv_b.data_ptr<scalar_t>() : nullptr;
      e.targets = safe_targets.data_ptr<int64_t>() + r0;
      e.valid = valid.data_ptr<bool>() + r0;
      e.weight = need_grad ? weight.data_ptr<scalar_t>() + r0 : nullptr;
      e.label_smoothing = static_cast<scalar_t>(ls);
      e.loss = loss.data_ptr<scalar_t>() + r0;
      e.lse = lse.data_ptr<scalar_t>() + r0;
      run_strip_epilogue(e);
    });
    if (!need_grad) continue;

    at::Tensor gH = need_hidden ? grad_H.narrow(0, r0, rows) : at::Tensor();
    for (int64_t c0 = 0; c0 < v; c0 += chunk) {
      const int64_t c1 = std::min(v, c0 + chunk);
      const at::Tensor Bc = bases_chunk(bases, c0, c1, acc);
      const at::Tensor Gc = S.narrow(1, c0, c1 - c0);
      if (need_hidden) {
        if (c0 == 0) {
          at::mm_out(gH, Gc, Bc);
        } else {
          gH.addmm_(Gc, Bc);
        }
      }
      if (need_bases) {
        at::Tensor X = grad_X.narrow(0, c0, c1 - c0);
        if (r0 == 0) {
          at::mm_out(X, Gc.t(), Hb);
        } else {
          X.addmm_(Gc.t(), Hb);
        }
      }
    }
  }

  if (need_bases && n == 0) grad_X.zero_();  // no strip ran: the gradient is zero

  at::Tensor grad_hidden, grad_bases;
  if (need_hidden) {
    at::Tensor g = grad_H.mul_(scale);  // d loss / d(hidden / |hidden|)
    if (normalize) {
      const at::Tensor hn = hidden_acc * inv_h.unsqueeze(1);
      const at::Tensor radial = at::where(pass_h, (hn * g).sum(1), at::zeros_like(inv_h));
      g = (g - hn * radial.unsqueeze(1)) * inv_h.unsqueeze(1);
    }
    grad_hidden = g.to(hidden.scalar_type());
  }
  if (need_bases) {
    // grad_X rows hold |B_j|^-1 dL/d(bn_j); the normalisation backward removes their radial part.
    if (normalize) {
      for (int64_t c0 = 0; c0 < v; c0 += kConvertChunk) {
        const int64_t c1 = std::min(v, c0 + kConvertChunk);
        const at::Tensor bn = bases_chunk(bases, c0, c1, acc) * inv_b.narrow(0, c0, c1 - c0).unsqueeze(1);
        at::Tensor X = grad_X.narrow(0, c0, c1 - c0);
        const at::Tensor radial = at::where(pass_b.narrow(0, c0, c1 - c0), (bn * X).sum(1),
                                            at::zeros({c1 - c0}, opts));
        X.sub_(bn * radial.unsqueeze(1));
      }
    }
    grad_bases = grad_X.to(bases.scalar_type());
  }
  return {loss, lse, grad_hidden.defined() ? grad_hidden : at::empty({0}, hidden.options()),
          grad_bases.defined() ? grad_bases : at::empty({0}, bases.options())};
}

}  // namespace vocabsem
