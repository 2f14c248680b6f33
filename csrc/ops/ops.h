// ATen-facing op implementations, one function per (op, device), registered in bindings.cpp, and the pieces
// the ops share. One section per op, named by the op's stem: ops/<stem>.cpp (CPU), ops/cuda/<stem>_cuda.cpp
// (CUDA), kernels/<stem>.h (torch-free kernels), tests/cpp/test_<stem>.cpp and tests/test_<stem>.py:
//   linear_assignment -> lap                 grouped_expert_ffn          -> grouped_ffn
//   moe_align         -> moe_align           grouped_expert_ffn_backward -> grouped_ffn_backward
//   sparse_lowrank_linear -> slr             grouped_expert_ffn_slr      -> grouped_ffn_slr
// Shared pieces: the expert activations (activation.cpp), linear_nt.cpp, slot_parallel.h.
// Not ops: the CPU (de)quantization of checkpoint formats (dequant.cpp, quantize.cpp), plain functions of the module.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/activation.h"
#include "kernels/lap.h"
#include "kernels/moe_align.h"

namespace mcsmoe::ops {

// --- linear_assignment (lap.cpp, cuda/lap_cuda.cpp) ---
at::Tensor linear_assignment_cpu(const at::Tensor& cost, bool maximize);
#ifdef MCSMOE_WITH_CUDA
at::Tensor linear_assignment_cuda(const at::Tensor& cost, bool maximize);
#endif
// Shared by the CPU and CUDA linear_assignment (ops/lap.cpp): the cost as a contiguous [B, r, k] float32 or
// float64 problem with r <= k (bool/integers as float64, n > m transposed); the answer mapped back to
// cost's rows (-1 for rows without a column when n > m); ValueErrors for invalid or infeasible problems.
at::Tensor check_assignment_cost(const at::Tensor& cost);
at::Tensor finish_assignment(const at::Tensor& cost, at::Tensor cols);
void check_assignment_status(const std::vector<lap::Status>& status);

// --- moe_align (moe_align.cpp, cuda/moe_align_cuda.cpp): the routing alignment every grouped FFN runs ---
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& top_k_index,
                                                                         const at::Tensor& top_k_weights,
                                                                         const at::Tensor& expert_map,
                                                                         int64_t num_slots);
#ifdef MCSMOE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& top_k_index,
                                                                          const at::Tensor& top_k_weights,
                                                                          const at::Tensor& expert_map,
                                                                          int64_t num_slots);
#endif
// Shared checks (CPU and CUDA, every MoE op): the routing tensors; an alignment's status.
void check_moe_routing(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                       int64_t num_slots, const char* op);
void check_align_status(const moe::AlignStatus& st, int64_t k, int64_t E, int64_t S, const char* op);
// CPU alignment with weights summed in `acc` (kFloat or kDouble): sorted_tokens, offsets, weights, token_rows;
// `op` (the calling op's name) prefixes its errors.
std::vector<at::Tensor> moe_align_cpu_impl(const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                           const at::Tensor& expert_map, int64_t num_slots, at::ScalarType acc,
                                           const char* op);

// --- shared: the expert activations (activation.cpp) and the CPU GEMM (linear_nt.cpp) ---
// An expert activation (mcsmoe_fast/activations.py): act(h), or act(gate) * up when gated, or GPT-OSS's
// clamped SwiGLU (gated; fn = clamped_swiglu) with its alpha and limit.
struct Activation {
  moe::ActFn fn;
  bool gated;
  double alpha = 1.702, limit = 7.0;
  bool interleaved = false;  // gate and up columns interleaved (gate0, up0, gate1, ...): GPT-OSS's stored order
  bool clamped() const { return fn == moe::ActFn::clamped_swiglu; }
};
// Where a gated row of h [n, 2 ff] holds gate j and up j: at j * step and j * step + up_at. Gate columns then up
// columns are (1, ff); GPT-OSS's interleaved order (gate0, up0, gate1, ...) is (2, 1).
struct GateUpLayout {
  int64_t step, up_at;
};
inline GateUpLayout gate_up_layout(bool interleaved, int64_t ff) {
  return interleaved ? GateUpLayout{2, 1} : GateUpLayout{1, ff};
}
// "relu", "relu2", "gelu", "gelu_tanh", "silu", "reglu", "geglu", "geglu_tanh", "swiglu", "clamped_swiglu", and
// "clamped_swiglu_interleaved" (GPT-OSS's stored gate/up order; grouped_expert_ffn on the CPU only, forward and
// backward: refuse_interleaved in the other ops); a ValueError otherwise (and for clamped_swiglu with a limit
// that is not a number >= 0 or an alpha that is not finite).
Activation parse_activation(c10::string_view name, const char* op, double alpha = 1.702, double limit = 7.0);
// act(h) in place, or act(gate) * up in place into the gate half (a strided [n, ff] view of h). ATen's
// ops: works on any device (the CUDA ops use their fused gated kernel instead), but clamped_swiglu, a
// loop over the rows of h on the CPU only (clamped_swiglu_cpu_).
at::Tensor expert_activation(const at::Tensor& h, Activation act);
// A ValueError naming `op` for the interleaved activation, which only grouped_expert_ffn on the CPU runs.
void refuse_interleaved(const Activation& act, const char* op);
// clamped_swiglu of h [n, 2 ff] (rows contiguous; gate columns, then up columns, or interleaved gate0, up0, ...)
// in place into the first ff columns, which it returns (a strided [n, ff] view). CPU.
at::Tensor clamped_swiglu_cpu_(const at::Tensor& h, double alpha, double limit, bool interleaved = false);
// x [n, K] w [N, K]^T (+ bias [N]) on the CPU, written into `out` when given; the backend (at::mm, oneDNN, or
// float32 for bfloat16/float16) chosen per shape class by measurement (linear_nt.cpp, autotune.h).
at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w, std::optional<at::Tensor> out = std::nullopt,
                     const std::optional<at::Tensor>& bias = std::nullopt);
// out = a b (accumulate: out += a b) for a [M, K], b [K, N] of any strides; bfloat16/float16 choose between
// at::mm and a float32 product by measurement as linear_nt does. gemm: into a fresh [M, N] tensor.
void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate);
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

// --- grouped_expert_ffn over merged slots (grouped_ffn.cpp, cuda/grouped_ffn_cuda.cpp) ---
// Optional expert biases b_in [S, F] and b_out [S, d]: y_s = act(x W_in[s]^T + b_in[s]) W_out[s]^T + b_out[s].
// alpha and limit: clamped_swiglu's parameters (ignored by the other activations).
at::Tensor grouped_expert_ffn_cpu(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                  const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                  const at::Tensor& top_k_weights, c10::string_view activation,
                                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                  double alpha, double limit);
#ifdef MCSMOE_WITH_CUDA
at::Tensor grouped_expert_ffn_cuda(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                   const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                   const at::Tensor& top_k_weights, c10::string_view activation,
                                   const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                   double alpha, double limit);
#endif
// b_in [S, F] and b_out [S, d], when given: `dtype` (the weights'), hidden's device.
void check_expert_biases(const at::Tensor& hidden, int64_t S, int64_t F, int64_t d, at::ScalarType dtype,
                         const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out, const char* op);
// The FFN's arguments checked; returns the activation.
Activation check_grouped_ffn_args(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                  const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                  const at::Tensor& top_k_weights, c10::string_view activation,
                                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                  double alpha, double limit);
// The same, and H: the pre-activations x W_in[s]^T + b_in[s] of the routed rows in the alignment's order (rows
// [0, pairs) of [T k, F]; the rest zero), kept for the backward (grouped_expert_ffn_backward_cpu's h_rows)
// so that it need not recompute them.
std::tuple<at::Tensor, at::Tensor> grouped_expert_ffn_keep_h_cpu(
    const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& expert_map,
    const at::Tensor& top_k_index, const at::Tensor& top_k_weights, c10::string_view activation,
    const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out, double alpha, double limit);
// The CPU frame of the grouped expert FFN (shared with grouped_ffn_slr): align the routing, gather each
// slot's tokens into contiguous rows, call run_slot(s, r, x_rows [n, d], y_rows [n, d]) for each busy slot, in
// row blocks (r: the block's first routed row; slots in parallel or one after another: slot_parallel.h, chosen
// per `shape`, the op and its widths), then combine each token's rows with its summed weights
// (combine_token_rows_cpu).
using SlotFfn = std::function<void(int64_t slot, int64_t row, const at::Tensor& x, at::Tensor y)>;
at::Tensor grouped_ffn_cpu_frame(const at::Tensor& hidden, int64_t num_slots, const at::Tensor& expert_map,
                                 const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                 const std::string& shape, const SlotFfn& run_slot, const char* op);
// out [T, d] (rows' dtype): out[t] = the sum of rows[token_rows[t, j]] (until -1), each times weights[row] when
// weights are given (the alignment's summed weights: float64 for float64 rows, else float32), plain when not
// (the backward's dX rows). kernels/grouped_ffn.h's combine_token_rows over chunks of tokens in parallel.
at::Tensor combine_token_rows_cpu(const at::Tensor& rows, const at::Tensor& token_rows,
                                  const std::optional<at::Tensor>& weights);

// --- grouped_expert_ffn_backward (grouped_ffn_backward.cpp, cuda/grouped_ffn_backward_cuda.cpp) ---
// (grad_hidden, grad_w_in, grad_w_out, grad_top_k_weights, grad_b_in, grad_b_out) of grouped_expert_ffn for
// grad_out [T, d]; output_mask says which to compute, the others come back as empty tensors [0] (so do the
// gradients of biases not given). The weights' gradient entry (t, j) is <grad_out[t], FFN_s(hidden[t])>
// (b_out[s] included) for the slot s of expert top_k_index[t, j] (0 for -1). h_rows: the forward's H
// (grouped_expert_ffn_keep_h_cpu) when it kept them, else recomputed (always on CUDA).
using FfnGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
FfnGrads grouped_expert_ffn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w_in,
                                         const at::Tensor& w_out, const at::Tensor& expert_map,
                                         const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                         c10::string_view activation, std::array<bool, 6> output_mask,
                                         const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                         double alpha, double limit, const std::optional<at::Tensor>& h_rows);
#ifdef MCSMOE_WITH_CUDA
FfnGrads grouped_expert_ffn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& hidden,
                                          const at::Tensor& w_in, const at::Tensor& w_out,
                                          const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                          const at::Tensor& top_k_weights, c10::string_view activation,
                                          std::array<bool, 6> output_mask, const std::optional<at::Tensor>& b_in,
                                          const std::optional<at::Tensor>& b_out, double alpha, double limit,
                                          const std::optional<at::Tensor>& h_rows);
#endif
// The forward's checks plus grad_out's shape, dtype and device; returns the activation.
Activation check_grouped_ffn_backward_args(const at::Tensor& grad_out, const at::Tensor& hidden,
                                           const at::Tensor& w_in, const at::Tensor& w_out,
                                           const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                           const at::Tensor& top_k_weights, c10::string_view activation,
                                           const std::optional<at::Tensor>& b_in,
                                           const std::optional<at::Tensor>& b_out, double alpha, double limit);
// output_mask with the bias entries cleared where that bias is not given.
std::array<bool, 6> effective_mask(std::array<bool, 6> mask, const std::optional<at::Tensor>& b_in,
                                   const std::optional<at::Tensor>& b_out);
// What a backward call computes (effective_mask's entries by name) and the intermediates that takes.
struct FfnNeeds {
  bool x, w_in, w_out, weights, b_in, b_out;
  FfnNeeds(std::array<bool, 6> output_mask, const std::optional<at::Tensor>& b_in,
           const std::optional<at::Tensor>& b_out);
  bool any() const { return x || w_in || w_out || weights || b_in || b_out; }
  bool dh() const { return x || w_in || b_in; }  // dH, the gradient of H = X W_in^T + b_in
  bool p() const { return dh() || weights; }     // P = G W_out (grad_W_out alone needs none)
  bool a() const { return weights || w_out; }    // A = act(H)
};
// The slots' parameter gradients: w_in [S, F, d], w_out [S, d, ff], b_in [S, F], b_out [S, d] where asked
// for, empty tensors [0] elsewhere (uninitialised: every slot writes its own, or zero_slot). Contiguous, or with
// weights_layout in the weights' own layouts: a weight that is a transposed view of a stored bank (GPT-OSS,
// Llama-4) then hands the bank a contiguous gradient, which autograd keeps without a transposing copy.
struct SlotGrads {
  at::Tensor w_in, w_out, b_in, b_out;
  SlotGrads(const FfnNeeds& need, const at::Tensor& w_in_like, const at::Tensor& w_out_like, bool weights_layout);
  void zero_slot(int64_t s);  // the zero gradients of a slot no token reached

 private:
  FfnNeeds need_;
};
// Zero gradients where output_mask (effective) asks for them, empty tensors [0] elsewhere (nothing routed,
// d = 0). The bias gradients are zero-filled like the weights' (b_out's included: with nothing routed no
// output row holds b_out; with d = 0 it has no entries). The weights' as SlotGrads lays them out.
FfnGrads masked_ffn_grads(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                          const at::Tensor& top_k_weights, const std::optional<at::Tensor>& b_in,
                          const std::optional<at::Tensor>& b_out, std::array<bool, 6> output_mask,
                          bool weights_layout);
// out [T, k] (row_grads' dtype) = row_grads[row of (t, slot of top_k_index[t, j])], 0 where the index is -1:
// every entry of a token that maps to one slot gets that slot's row gradient. Host tensors, from moe_align.
void routing_weight_grads_cpu(const at::Tensor& top_k_index, const at::Tensor& expert_map, const at::Tensor& offsets,
                              const at::Tensor& token_rows, const at::Tensor& row_grads, at::Tensor out);

// --- sparse_lowrank_linear (slr.cpp, cuda/slr_cuda.cpp) ---
at::Tensor sparse_lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                                     const at::Tensor& S_rows, const at::Tensor& row_idx,
                                     const std::optional<at::Tensor>& bias);
#ifdef MCSMOE_WITH_CUDA
at::Tensor sparse_lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                                      const at::Tensor& S_rows, const at::Tensor& row_idx,
                                      const std::optional<at::Tensor>& bias);
#endif
// Checks shapes, dtypes and devices of x [..., in], U [out, r], V [r, in], S_rows [K, in], row_idx [K]
// int64 and bias [out]; not the values of row_idx (check_row_idx_cpu / the CUDA check do that).
void check_slr_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& S_rows,
                    const at::Tensor& row_idx, const std::optional<at::Tensor>& bias, const char* op);
// Raises unless the K host indices row_idx are distinct rows in [0, out); the message names `what`
// (and the slot of a bank when slot >= 0). `seen` is scratch, reused across calls.
void check_row_idx_cpu(const int64_t* row_idx, int64_t K, int64_t out, const char* op, const char* what,
                       int64_t slot, std::vector<unsigned char>& seen);
// y [n, out] = x [n, in] (U V + S)^T (+ bias) on the CPU, written into `out` (rows contiguous) when given;
// row_idx is a host pointer to S_rows.size(0) checked indices. Threads: whatever the GEMMs use here.
at::Tensor slr_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& S_rows,
                          const int64_t* row_idx, const std::optional<at::Tensor>& bias,
                          std::optional<at::Tensor> out);

// --- grouped_expert_ffn_slr: the grouped FFN over compressed slots (grouped_ffn_slr.cpp,
// cuda/grouped_ffn_slr_cuda.cpp) ---
at::Tensor grouped_expert_ffn_slr_cpu(const at::Tensor& hidden, at::TensorList w_in, at::TensorList w_out,
                                      const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                      const at::Tensor& top_k_weights, c10::string_view activation,
                                      const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                      double alpha, double limit);
#ifdef MCSMOE_WITH_CUDA
at::Tensor grouped_expert_ffn_slr_cuda(const at::Tensor& hidden, at::TensorList w_in, at::TensorList w_out,
                                       const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                       const at::Tensor& top_k_weights, c10::string_view activation,
                                       const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                       double alpha, double limit);
#endif
// Compressed slots of one expert matrix per slot: [U [S, out, r], V [S, r, in], S_rows [K, in],
// row_idx [K] int64, row_offsets [S+1] int64] (slot s owns S_rows/row_idx rows row_offsets[s]..[s+1]).
// Checks shapes/dtypes/devices; returns (S, out, in).
std::tuple<int64_t, int64_t, int64_t> check_slr_bank(const at::TensorList& bank, const at::Tensor& hidden,
                                                     const char* op, const char* name);
// Checks every argument of grouped_expert_ffn_slr but the row index values; returns the activation.
Activation check_grouped_ffn_slr_args(const at::Tensor& hidden, at::TensorList w_in, at::TensorList w_out,
                                      const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                      const at::Tensor& top_k_weights, c10::string_view activation,
                                      const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                      double alpha, double limit);
// The host copy of a bank's row_offsets after checking them and every slot's row indices.
std::vector<int64_t> checked_offsets(const at::TensorList& bank, int64_t S, int64_t out, const char* op,
                                     const char* name);

// --- dequantization of block-FP8 and MXFP4 weights on the CPU (dequant.cpp): functions of the extension
// module (_C.dequantize_fp8_into, _C.dequantize_mxfp4_into), not dispatcher ops; they write into and return out ---
at::Tensor dequantize_fp8_into(const at::Tensor& weight, const at::Tensor& scale, int64_t block_rows,
                               int64_t block_cols, at::Tensor out);
at::Tensor dequantize_mxfp4_into(const at::Tensor& blocks, const at::Tensor& scales, bool transpose, at::Tensor out);
// ... and block-FP8 quantization (quantize.cpp): _C.fp8_block_amax_into, _C.quantize_fp8_into
at::Tensor fp8_block_amax_into(const at::Tensor& w, int64_t block_rows, int64_t block_cols, at::Tensor out);
at::Tensor quantize_fp8_into(const at::Tensor& w, const at::Tensor& scale, int64_t block_rows, int64_t block_cols,
                             at::Tensor out);

}  // namespace mcsmoe::ops
