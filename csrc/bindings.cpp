// Private pybind11 module vocabsem_fast._C. Python never calls it directly: the backends in
// vocabsem_fast/backends wrap it, and the public ops reach it through torch.library.
#include <torch/extension.h>

namespace vocabsem {
at::Tensor row_norms(const at::Tensor& x);
std::vector<at::Tensor> cross_entropy_strip(at::Tensor& scores, const at::Tensor& row_scale,
                                            const c10::optional<at::Tensor>& col_scale, const at::Tensor& targets,
                                            const at::Tensor& valid, const c10::optional<at::Tensor>& weight,
                                            double label_smoothing, const c10::optional<at::Tensor>& lse_in,
                                            int64_t col_offset, int64_t vocab);
std::vector<at::Tensor> similarity_topk(const at::Tensor& hidden, const at::Tensor& bases, int64_t k, double scale,
                                        bool normalize, double eps, int64_t max_tile_elements);
#ifdef VOCABSEM_WITH_CUDA
void register_cuda(pybind11::module& m);  // csrc/cuda/bindings.cpp
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vocabsem_fast private C++ kernels";
  m.def("row_norms", &vocabsem::row_norms, "Row L2 norms, float32 accumulation (float64 for double input)",
        pybind11::arg("x"));
  m.def("cross_entropy_strip", &vocabsem::cross_entropy_strip,
        "Epilogue of one cross-entropy strip, in place: raw scores -> per-row (loss, lse) and, with a weight, "
        "the gradient tile weight * (softmax - target) * col_scale. Given vocab, a column chunk [col_offset, "
        "col_offset + cols): without lse its own (loss terms, lse); with the rows' lse its gradient tile",
        pybind11::arg("scores"), pybind11::arg("row_scale"), pybind11::arg("col_scale"), pybind11::arg("targets"),
        pybind11::arg("valid"), pybind11::arg("weight"), pybind11::arg("label_smoothing"),
        pybind11::arg("lse") = pybind11::none(), pybind11::arg("col_offset") = 0, pybind11::arg("vocab") = 0);
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
