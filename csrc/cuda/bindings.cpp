// Torch glue for the CUDA kernels (built only with a CUDA torch): checks every tensor, takes the
// current stream and device, calls the torch-free launchers of kernels.h and turns a CUDA error
// into a Python exception. The Python cuda backend composes these with ATen (cuBLAS) GEMMs.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "similarity.h"

namespace vocabsem {
namespace {

using cuda::DType;
using OptTensor = std::optional<at::Tensor>;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vocabsem_fast CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

DType input_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return DType::kFloat32;
}

void check_rows(const at::Tensor& x, const char* name, int64_t dims = 2) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == dims, name, " must have ", dims, " dimensions, got ", x.dim());
  TORCH_CHECK(x.stride(-1) == 1, name, " must have unit stride along its last dimension");
}

void check_vector(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t size) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.numel() == size, name, " must have ", size, " elements, got ", x.numel());
}

const float* optional_vector(const OptTensor& x, const char* name, int64_t size) {
  if (!x.has_value()) return nullptr;
  check_vector(*x, name, at::kFloat, size);
  return x->data_ptr<float>();
}

void check_scores(const at::Tensor& s) {
  check_rows(s, "scores");
  TORCH_CHECK(s.scalar_type() == at::kFloat, "scores must be float32, got ", s.scalar_type());
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

at::Tensor row_inverse_norms(const at::Tensor& x, double eps) {
  check_rows(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto inv = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_cuda(cuda::row_inverse_norms(x.data_ptr(), input_dtype(x, "x"), x.size(0), x.size(1), x.stride(0),
                                     (float)eps, inv.data_ptr<float>(), stream_of(x)),
             "row_inverse_norms");
  return inv;
}

at::Tensor normalization_backward(const at::Tensor& x, const at::Tensor& inv, const at::Tensor& grad, double eps,
                                  bool grad_times_inv) {
  check_rows(x, "x");
  check_vector(inv, "inv", at::kFloat, x.size(0));
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous() && grad.scalar_type() == at::kFloat &&
                  grad.sizes() == x.sizes(),
              "grad must be a contiguous float32 CUDA tensor shaped like x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(grad);
  check_cuda(cuda::normalization_backward(x.data_ptr(), input_dtype(x, "x"), inv.data_ptr<float>(),
                                          grad.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), (float)eps,
                                          grad_times_inv, out.data_ptr<float>(), stream_of(x)),
             "normalization_backward");
  return out;
}

at::Tensor lse_partial(const at::Tensor& scores, double scale, const OptTensor& row_inv, const OptTensor& col_inv,
                       const at::Tensor& targets, double smoothing, int64_t splits) {
  check_scores(scores);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  check_vector(targets, "targets", at::kLong, rows);
  TORCH_CHECK(splits >= 1 && splits <= 65535, "splits must be in [1, 65535], got ", splits);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto partial = at::empty({4, splits, rows}, scores.options());
  check_cuda(cuda::lse_partial(scores.data_ptr<float>(), rows, cols, scores.stride(0), (float)scale,
                               optional_vector(row_inv, "row_inv", rows), optional_vector(col_inv, "col_inv", cols),
                               targets.data_ptr<int64_t>(), (float)smoothing, splits, partial.data_ptr<float>(),
                               stream_of(scores)),
             "lse_partial");
  return partial;
}

std::vector<at::Tensor> lse_finish(const at::Tensor& partial, const at::Tensor& targets, int64_t ignore_index,
                                   double smoothing, int64_t vocab) {
  const int64_t rows = targets.numel();
  check_vector(targets, "targets", at::kLong, rows);
  TORCH_CHECK(partial.is_cuda() && partial.is_contiguous() && partial.scalar_type() == at::kFloat &&
                  partial.dim() == 3 && partial.size(0) == 4 && partial.size(2) == rows,
              "partial must be a contiguous float32 (4, splits, rows) CUDA tensor");
  const c10::cuda::CUDAGuard guard(targets.device());
  auto lse = at::empty({rows}, partial.options()), loss = at::empty({rows}, partial.options());
  check_cuda(cuda::lse_finish(rows, partial.size(1), partial.data_ptr<float>(), targets.data_ptr<int64_t>(),
                              ignore_index, (float)smoothing, vocab, lse.data_ptr<float>(), loss.data_ptr<float>(),
                              stream_of(targets)),
             "lse_finish");
  return {lse, loss};
}

void softmax_grad_tile(at::Tensor& scores, int64_t col0, double scale, const OptTensor& row_inv,
                       const OptTensor& col_inv, const at::Tensor& lse, const at::Tensor& targets,
                       const at::Tensor& weight, double smoothing, int64_t vocab, const OptTensor& col_mul) {
  check_scores(scores);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  check_vector(lse, "lse", at::kFloat, rows);
  check_vector(targets, "targets", at::kLong, rows);
  check_vector(weight, "weight", at::kFloat, rows);
  const c10::cuda::CUDAGuard guard(scores.device());
  check_cuda(cuda::softmax_grad_tile(scores.data_ptr<float>(), rows, cols, scores.stride(0), col0, (float)scale,
                                     optional_vector(row_inv, "row_inv", rows),
                                     optional_vector(col_inv, "col_inv", cols), lse.data_ptr<float>(),
                                     targets.data_ptr<int64_t>(), weight.data_ptr<float>(), (float)smoothing, vocab,
                                     optional_vector(col_mul, "col_mul", cols), stream_of(scores)),
             "softmax_grad_tile");
}

std::vector<at::Tensor> topk_partial(const at::Tensor& scores, double scale, const OptTensor& row_inv,
                                     const OptTensor& col_inv, int64_t k, int64_t splits) {
  check_scores(scores);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= cuda::kMaxTopK, "k must be in [1, ", cuda::kMaxTopK, "] for the CUDA top-k, got ", k);
  TORCH_CHECK(splits >= 1 && splits <= 65535, "splits must be in [1, 65535], got ", splits);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto values = at::empty({splits, rows, k}, scores.options());
  auto indices = at::empty({splits, rows, k}, scores.options().dtype(at::kLong));
  check_cuda(cuda::topk_partial(scores.data_ptr<float>(), rows, cols, scores.stride(0), (float)scale,
                                optional_vector(row_inv, "row_inv", rows), optional_vector(col_inv, "col_inv", cols), k,
                                splits, values.data_ptr<float>(), indices.data_ptr<int64_t>(), stream_of(scores)),
             "topk_partial");
  return {values, indices};
}

void check_batched(const at::Tensor& points, const at::Tensor& centroids) {
  TORCH_CHECK(points.is_cuda() && points.is_contiguous() && points.dim() == 3, "points must be contiguous (B, N, d) on CUDA");
  TORCH_CHECK(centroids.is_cuda() && centroids.is_contiguous() && centroids.dim() == 3,
              "centroids must be contiguous (B, K, d) on CUDA");
  TORCH_CHECK(points.size(0) == centroids.size(0) && points.size(2) == centroids.size(2),
              "points and centroids must agree in batch and d");
  TORCH_CHECK(points.scalar_type() == centroids.scalar_type(), "points and centroids must share a dtype");
  TORCH_CHECK(centroids.size(1) >= 1 && centroids.size(1) <= cuda::kMaxSoftAssignK,
              "the fused CUDA soft assignment takes 1 to ", cuda::kMaxSoftAssignK, " centroids, got ",
              centroids.size(1));
}

at::Tensor soft_assign_forward(const at::Tensor& points, const at::Tensor& centroids, const OptTensor& inv_p,
                               const OptTensor& inv_c, double scale) {
  check_batched(points, centroids);
  const int64_t b = points.size(0), n = points.size(1), k = centroids.size(1), d = points.size(2);
  const c10::cuda::CUDAGuard guard(points.device());
  auto probs = at::empty({b, n, k}, points.options().dtype(at::kFloat));
  check_cuda(cuda::soft_assign_forward(points.data_ptr(), centroids.data_ptr(), input_dtype(points, "points"), b, n, k,
                                       d, optional_vector(inv_p, "inv_points", b * n),
                                       optional_vector(inv_c, "inv_centroids", b * k), (float)scale,
                                       probs.data_ptr<float>(), stream_of(points)),
             "soft_assign_forward");
  return probs;
}

std::vector<at::Tensor> soft_assign_backward(const at::Tensor& points, const at::Tensor& centroids,
                                             const OptTensor& inv_p, const OptTensor& inv_c, double scale,
                                             const at::Tensor& probs, const at::Tensor& grad) {
  check_batched(points, centroids);
  const int64_t b = points.size(0), n = points.size(1), k = centroids.size(1), d = points.size(2);
  for (auto* t : {&probs, &grad}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == at::kFloat &&
                    t->sizes() == at::IntArrayRef({b, n, k}),
                "probs and grad must be contiguous float32 (B, N, K) CUDA tensors");
  }
  const c10::cuda::CUDAGuard guard(points.device());
  auto grad_points = at::empty({b, n, d}, points.options().dtype(at::kFloat));
  auto grad_centroids = at::zeros({b, k, d}, points.options().dtype(at::kFloat));
  check_cuda(cuda::soft_assign_backward(points.data_ptr(), centroids.data_ptr(), input_dtype(points, "points"), b, n,
                                        k, d, optional_vector(inv_p, "inv_points", b * n),
                                        optional_vector(inv_c, "inv_centroids", b * k), (float)scale,
                                        probs.data_ptr<float>(), grad.data_ptr<float>(),
                                        grad_points.data_ptr<float>(), grad_centroids.data_ptr<float>(),
                                        stream_of(points)),
             "soft_assign_backward");
  return {grad_points, grad_centroids};
}

std::vector<at::Tensor> centroid_sums(const at::Tensor& points, const at::Tensor& labels, int64_t clusters) {
  TORCH_CHECK(points.is_cuda() && points.is_contiguous() && points.dim() == 2, "points must be contiguous (N, d) on CUDA");
  check_vector(labels, "labels", at::kLong, points.size(0));
  TORCH_CHECK(clusters >= 1, "clusters must be >= 1");
  const c10::cuda::CUDAGuard guard(points.device());
  // checked on the device (no host sync): a bad label fails the stream's next synchronisation
  if (labels.numel() > 0) {
    at::_assert_async(((labels >= 0) & (labels < clusters)).all(), "labels must lie in [0, clusters)");
  }
  auto sums = at::zeros({clusters, points.size(1)}, points.options().dtype(at::kFloat));
  auto counts = at::zeros({clusters}, points.options().dtype(at::kFloat));
  check_cuda(cuda::centroid_sums(points.data_ptr(), input_dtype(points, "points"), points.size(0), points.size(1),
                                 labels.data_ptr<int64_t>(), clusters, sums.data_ptr<float>(),
                                 counts.data_ptr<float>(), stream_of(points)),
             "centroid_sums");
  return {sums, counts};
}

}  // namespace

void register_cuda(pybind11::module& m) {
  using pybind11::arg;
  m.def("cuda_row_inverse_norms", &row_inverse_norms, arg("x"), arg("eps"));
  m.def("cuda_normalization_backward", &normalization_backward, arg("x"), arg("inv"), arg("grad"), arg("eps"),
        arg("grad_times_inv"));
  m.def("cuda_lse_partial", &lse_partial, arg("scores"), arg("scale"), arg("row_inv"), arg("col_inv"),
        arg("targets"), arg("smoothing"), arg("splits"));
  m.def("cuda_lse_finish", &lse_finish, arg("partial"), arg("targets"), arg("ignore_index"), arg("smoothing"),
        arg("vocab"));
  m.def("cuda_softmax_grad_tile", &softmax_grad_tile, arg("scores"), arg("col0"), arg("scale"), arg("row_inv"),
        arg("col_inv"), arg("lse"), arg("targets"), arg("weight"), arg("smoothing"), arg("vocab"), arg("col_mul"));
  m.def("cuda_topk_partial", &topk_partial, arg("scores"), arg("scale"), arg("row_inv"), arg("col_inv"), arg("k"),
        arg("splits"));
  m.def("cuda_soft_assign_forward", &soft_assign_forward, arg("points"), arg("centroids"), arg("inv_points"),
        arg("inv_centroids"), arg("scale"));
  m.def("cuda_soft_assign_backward", &soft_assign_backward, arg("points"), arg("centroids"), arg("inv_points"),
        arg("inv_centroids"), arg("scale"), arg("probs"), arg("grad"));
  m.def("cuda_centroid_sums", &centroid_sums, arg("points"), arg("labels"), arg("clusters"));
  m.attr("cuda_max_topk") = cuda::kMaxTopK;
  m.attr("cuda_max_soft_assign_k") = cuda::kMaxSoftAssignK;
}

}  // namespace vocabsem
