// Private pybind11 module vocabsem_fast._C. Python never calls it directly: the backends in
// vocabsem_fast/backends wrap it, and the public ops reach it through torch.library.
#include <torch/extension.h>

namespace vocabsem {
at::Tensor row_norms(const at::Tensor& x);
std::vector<at::Tensor> similarity_cross_entropy(const at::Tensor& hidden, const at::Tensor& bases,
                                                 const at::Tensor& targets, double scale, bool normalize,
                                                 double eps, int64_t ignore_index, double label_smoothing,
                                                 const at::Tensor& row_weight, bool need_hidden, bool need_bases,
                                                 int64_t max_strip_elements);
std::vector<at::Tensor> similarity_topk(const at::Tensor& hidden, const at::Tensor& bases, int64_t k, double scale,
                                        bool normalize, double eps, int64_t max_tile_elements);
#ifdef VOCABSEM_WITH_CUDA
void register_cuda(pybind11::module& m);  // csrc/cuda/cuda_ops.cpp
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vocabsem_fast private C++ kernels";
  m.def("row_norms", &vocabsem::row_norms, "Row L2 norms, float32 accumulation (float64 for double input)",
        pybind11::arg("x"));
  m.def("similarity_cross_entropy", &vocabsem::similarity_cross_entropy,
        "Fused similarity cross-entropy over row strips: per-row (loss, lse) and, when asked, the gradients "
        "of sum_i row_weight_i * loss_i w.r.t. hidden and bases",
        pybind11::arg("hidden"), pybind11::arg("bases"), pybind11::arg("targets"), pybind11::arg("scale"),
        pybind11::arg("normalize"), pybind11::arg("eps"), pybind11::arg("ignore_index"),
        pybind11::arg("label_smoothing"), pybind11::arg("row_weight"), pybind11::arg("need_hidden"),
        pybind11::arg("need_bases"), pybind11::arg("max_strip_elements"));
  m.def("similarity_topk", &vocabsem::similarity_topk,
        "Fused similarity top-k: GEMM tiles and a running per-row top-k; (values, indices), values descending",
        pybind11::arg("hidden"), pybind11::arg("bases"), pybind11::arg("k"), pybind11::arg("scale"),
        pybind11::arg("normalize"), pybind11::arg("eps"), pybind11::arg("max_tile_elements"));
#ifdef VOCABSEM_WITH_CUDA
  vocabsem::register_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
