// Op schemas (TORCH_LIBRARY), their CPU and CUDA implementations per dispatch key, and a small
// pybind11 module with build information. Kernels live in kernels/, ATen glue in ops/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include "ops/ops.h"

TORCH_LIBRARY(mcsmoe_fast, m) {
  m.def("linear_assignment(Tensor cost, bool maximize=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(mcsmoe_fast, CPU, m) {
  m.impl("linear_assignment", &mcsmoe::ops::linear_assignment_cpu);
}

#ifdef MCSMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(mcsmoe_fast, CUDA, m) {
  m.impl("linear_assignment", &mcsmoe::ops::linear_assignment_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mcsmoe-fast native extension: build information (ops are under torch.ops.mcsmoe_fast)";
#ifdef MCSMOE_WITH_CUDA
  m.attr("cuda_enabled") = true;
#else
  m.attr("cuda_enabled") = false;
#endif
  m.def("openmp_threads", [] { return at::get_num_threads(); }, "threads torch's CPU pool uses");
}
