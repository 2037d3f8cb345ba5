// Torch-free CUDA kernels of vocabsem_fast: raw pointers, sizes and a stream. The torch glue in
// bindings.cpp (built only with a CUDA torch) checks tensors and calls these launchers; the .cu
// file compiles with nvcc alone, which is how CI checks it on machines without a GPU.
//
// Conventions: row-major, unit stride along the last dimension, `ld` the row stride in elements.
// Score tiles are fp32; inputs are fp32, bf16 or fp16 (DType); accumulation is fp32. Inverse row
// norms are 1 / max(||x||, eps); a null inverse-norm pointer means "not normalised" (factor 1).
// Every launcher returns the launch's cudaError_t.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace vocabsem {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// inv[r] = 1 / max(||x[r]||, eps) for rows x r of length d; NaN where the row holds an infinite entry.
cudaError_t row_inverse_norms(const void* x, DType dtype, int64_t rows, int64_t d, int64_t ld, float eps,
                              float* inv, cudaStream_t stream);

// Partial online log-sum-exp of a score tile S (rows x cols, row stride ld) over `splits` column
// ranges per row, so that few rows still occupy the whole GPU: block (r, s) reads the columns
// [s * span, min(cols, (s + 1) * span)), span = ceil(cols / splits), of z = scale * S * row_inv[r]
// * col_inv[c] and writes its max, rescaled sum, target logit (targets in [0, cols); others match
// no column) and, when smoothing > 0, logit sum to partial[q * splits * rows + s * rows + r],
// q = 0..3. An empty range writes -inf, 0, 0, 0.
cudaError_t lse_partial(const float* scores, int64_t rows, int64_t cols, int64_t ld, float scale,
                        const float* row_inv, const float* col_inv, const int64_t* targets, float smoothing,
                        int64_t splits, float* partial, cudaStream_t stream);

// Merges the splits of lse_partial: lse = max + log(sum of rescaled sums); loss = lse - (1 - ls)
// * target_logit - ls * logit_sum / V (0 where ignored).
cudaError_t lse_finish(int64_t rows, int64_t splits, const float* partial, const int64_t* targets,
                       int64_t ignore_index, float smoothing, int64_t vocab, float* lse, float* loss,
                       cudaStream_t stream);

// In place: S <- weight[r] * scale * (softmax - (1 - ls) onehot - ls / V) * col_mul[c], the
// gradient tile of sum_r weight[r] * loss[r] with respect to the scores, scaled per column
// (col_mul null: 1). Rows with weight 0 (ignored) become 0.
cudaError_t softmax_grad_tile(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t col0, float scale,
                              const float* row_inv, const float* col_inv, const float* lse, const int64_t* targets,
                              const float* weight, float smoothing, int64_t vocab, const float* col_mul,
                              cudaStream_t stream);

// Gradient through y = x * inv: dx = inv * (g - y (y . g)) where ||x|| >= eps, inv * g where the
// eps clamp is active. grad_times_inv: g already carries the factor inv (a gradient accumulated
// from inverse-norm-scaled tiles), so dx = g - y (y . g) without a second one. x in `dtype`, g and
// out fp32 (out may alias g).
cudaError_t normalization_backward(const void* x, DType dtype, const float* inv, const float* grad, int64_t rows,
                                   int64_t d, int64_t ld, float eps, bool grad_times_inv, float* out,
                                   cudaStream_t stream);

// Partial top-k over `splits` column ranges per row (ranges as in lse_partial): block (r, s)
// writes the k best (z as in lse_partial) of its range, sorted descending, to values / indices
// [(s * rows + r) * k ...]; slots beyond the range's columns hold -inf / -1. The tile is only read
// (a zero scale factor cannot bring back an entry already taken). k <= kMaxTopK.
constexpr int kMaxTopK = 64;
cudaError_t topk_partial(const float* scores, int64_t rows, int64_t cols, int64_t ld, float scale,
                         const float* row_inv, const float* col_inv, int64_t k, int64_t splits, float* values,
                         int64_t* indices, cudaStream_t stream);

// Batched soft assignment, fused: probs[b, n, :] = softmax_k(scale * cos(points[b, n], centroids[b, k]))
// (dot products when the inverse norms are null), for k <= kMaxSoftAssignK.
constexpr int kMaxSoftAssignK = 64;
cudaError_t soft_assign_forward(const void* points, const void* centroids, DType dtype, int64_t batch, int64_t n,
                                int64_t k, int64_t d, const float* inv_points, const float* inv_centroids,
                                float scale, float* probs, cudaStream_t stream);

// Its backward with respect to the normalised points and centroids (fp32; grad_centroids is
// accumulated with atomics and must start at zero): the normalisation backward comes after.
cudaError_t soft_assign_backward(const void* points, const void* centroids, DType dtype, int64_t batch, int64_t n,
                                 int64_t k, int64_t d, const float* inv_points, const float* inv_centroids,
                                 float scale, const float* probs, const float* grad, float* grad_points,
                                 float* grad_centroids, cudaStream_t stream);

// k-means update: sums[labels[i]] += points[i] (fp32) and counts[labels[i]] += 1 (start at zero).
cudaError_t centroid_sums(const void* points, DType dtype, int64_t n, int64_t d, const int64_t* labels,
                          int64_t clusters, float* sums, float* counts, cudaStream_t stream);

}  // namespace cuda
}  // namespace vocabsem
