// Private pybind11 module vocabsem_fast._C. Python never calls it directly: the backends in
// vocabsem_fast/backends wrap it, and the public ops reach it through torch.library.
#include <torch/extension.h>

namespace vocabsem {
at::Tensor row_norms(const at::Tensor& x);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vocabsem_fast private C++ kernels";
  m.def("row_norms", &vocabsem::row_norms, "Row L2 norms, float32 accumulation (float64 for double input)",
        pybind11::arg("x"));
#ifdef VOCABSEM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
