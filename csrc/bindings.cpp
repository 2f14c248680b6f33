// Op schemas (TORCH_LIBRARY), their CPU and CUDA implementations per dispatch key, and a small
// pybind11 module with build information. Kernels live in kernels/, ATen glue in ops/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/python.h>  // at::Tensor arguments of the module functions

#include <ATen/Parallel.h>

#include "ops/autotune.h"
#include "ops/ops.h"

TORCH_LIBRARY(mcsmoe_fast, m) {
  m.def("linear_assignment(Tensor cost, bool maximize=False) -> Tensor");
  m.def("moe_align(Tensor top_k_index, Tensor top_k_weights, Tensor expert_map, int num_slots) -> "
        "(Tensor sorted_token_ids, Tensor slot_offsets, Tensor sorted_weights, Tensor token_rows)");
  // b_in [S, F], b_out [S, d]: optional expert biases; alpha, limit: clamped_swiglu's (GPT-OSS) parameters.
  m.def("grouped_expert_ffn(Tensor hidden, Tensor w_in, Tensor w_out, Tensor expert_map, Tensor top_k_index, "
        "Tensor top_k_weights, str activation, Tensor? b_in=None, Tensor? b_out=None, float alpha=1.702, "
        "float limit=7.0) -> Tensor");
  // The same, and the routed rows' pre-activations H [T k, F] (in the alignment's order) for the backward.
  m.def("grouped_expert_ffn_keep_h(Tensor hidden, Tensor w_in, Tensor w_out, Tensor expert_map, "
        "Tensor top_k_index, Tensor top_k_weights, str activation, Tensor? b_in=None, Tensor? b_out=None, "
        "float alpha=1.702, float limit=7.0) -> (Tensor out, Tensor h_rows)");
  // Gradients of grouped_expert_ffn (hidden, w_in, w_out, top_k_weights, b_in, b_out) for grad_out;
  // output_mask picks which are computed, the others are empty tensors [0] (so are those of absent biases).
  m.def("grouped_expert_ffn_backward(Tensor grad_out, Tensor hidden, Tensor w_in, Tensor w_out, Tensor expert_map, "
        "Tensor top_k_index, Tensor top_k_weights, str activation, bool[6] output_mask, Tensor? b_in=None, "
        "Tensor? b_out=None, float alpha=1.702, float limit=7.0, Tensor? h_rows=None) -> (Tensor grad_hidden, Tensor grad_w_in, "
        "Tensor grad_w_out, Tensor grad_top_k_weights, Tensor grad_b_in, Tensor grad_b_out)");
  m.def("sparse_lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor S_rows, Tensor row_idx, Tensor? bias=None) -> "
        "Tensor");
  m.def("grouped_expert_ffn_slr(Tensor hidden, Tensor[] w_in, Tensor[] w_out, Tensor expert_map, "
        "Tensor top_k_index, Tensor top_k_weights, str activation, Tensor? b_in=None, Tensor? b_out=None, "
        "float alpha=1.702, float limit=7.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(mcsmoe_fast, CPU, m) {
  m.impl("linear_assignment", &mcsmoe::ops::linear_assignment_cpu);
  m.impl("moe_align", &mcsmoe::ops::moe_align_cpu);
  m.impl("grouped_expert_ffn", &mcsmoe::ops::grouped_expert_ffn_cpu);
  m.impl("grouped_expert_ffn_keep_h", &mcsmoe::ops::grouped_expert_ffn_keep_h_cpu);
  m.impl("grouped_expert_ffn_backward", &mcsmoe::ops::grouped_expert_ffn_backward_cpu);
  m.impl("sparse_lowrank_linear", &mcsmoe::ops::sparse_lowrank_linear_cpu);
  m.impl("grouped_expert_ffn_slr", &mcsmoe::ops::grouped_expert_ffn_slr_cpu);
}

#ifdef MCSMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(mcsmoe_fast, CUDA, m) {
  m.impl("linear_assignment", &mcsmoe::ops::linear_assignment_cuda);
  m.impl("moe_align", &mcsmoe::ops::moe_align_cuda);
  m.impl("grouped_expert_ffn", &mcsmoe::ops::grouped_expert_ffn_cuda);
  m.impl("grouped_expert_ffn_backward", &mcsmoe::ops::grouped_expert_ffn_backward_cuda);
  m.impl("sparse_lowrank_linear", &mcsmoe::ops::sparse_lowrank_linear_cuda);
  m.impl("grouped_expert_ffn_slr", &mcsmoe::ops::grouped_expert_ffn_slr_cuda);
}
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mcsmoe-fast native extension: build information (ops are under torch.ops.mcsmoe_fast)";
#ifdef MCSMOE_WITH_CUDA
  m.attr("cuda_enabled") = true;
#else
  m.attr("cuda_enabled") = false;
#endif
  m.def("openmp_threads", [] { return at::get_num_threads(); }, "threads torch's CPU pool uses");
  m.def("dequantize_fp8_into", &mcsmoe::ops::dequantize_fp8_into, "block-FP8 e4m3 bytes [N, rows, cols] times their "
        "float32 block scales into out (float32 / bfloat16 / float16), CPU", py::arg("weight"), py::arg("scale"),
        py::arg("block_rows"), py::arg("block_cols"), py::arg("out"));
  m.def("dequantize_mxfp4_into", &mcsmoe::ops::dequantize_mxfp4_into, "MXFP4 blocks [N, rows, G, 16] and e8m0 scales "
        "[N, rows, G] into out [N, rows, cols] (or [N, cols, rows] with transpose), CPU", py::arg("blocks"),
        py::arg("scales"), py::arg("transpose"), py::arg("out"));
  m.def("fp8_block_amax_into", &mcsmoe::ops::fp8_block_amax_into, "max |w| per block of w [N, rows, cols] into out "
        "(float32 [N, ceil(rows/br), ceil(cols/bc)]), CPU", py::arg("w"), py::arg("block_rows"), py::arg("block_cols"),
        py::arg("out"));
  m.def("quantize_fp8_into", &mcsmoe::ops::quantize_fp8_into, "e4m3fn bytes of clamp(w / block scale, -448, 448) into "
        "out (uint8 [N, rows, cols]), CPU", py::arg("w"), py::arg("scale"), py::arg("block_rows"),
        py::arg("block_cols"), py::arg("out"));
  // The CPU ops' choices by measurement (ops/autotune.h): the cache, its reset, the decisions and their pins.
  m.def("autotune_snapshot", &mcsmoe::ops::autotune::snapshot,
        "[(decision, shape class, winner label or '' while measuring, median ms per candidate or -1)]");
  m.def("autotune_reset", &mcsmoe::ops::autotune::reset, "forget every measurement");
  m.def("autotune_decisions", [] {
    std::vector<std::tuple<std::string, std::string, std::vector<std::string>>> out;
    for (const auto* d : mcsmoe::ops::autotune::decisions())
      out.emplace_back(d->name, d->env, std::vector<std::string>(d->labels.begin(), d->labels.end()));
    return out;
  }, "[(decision, the environment variable that pins it, candidate labels)]");
}
