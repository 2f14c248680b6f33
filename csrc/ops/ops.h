// ATen-facing op implementations, one function per (op, device). Registered in bindings.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "kernels/moe_align.h"

namespace mcsmoe::ops {

at::Tensor linear_assignment_cpu(const at::Tensor& cost, bool maximize);
#ifdef MCSMOE_WITH_CUDA
at::Tensor linear_assignment_cuda(const at::Tensor& cost, bool maximize);
#endif

// Shared argument checks; return the cost as a contiguous [B, n, m] tensor. check_finite adds the
// NaN/inf check as a tensor op (the CPU path checks inside its per-problem loop instead).
at::Tensor check_assignment_cost(const at::Tensor& cost, bool check_finite);

// --- grouped expert FFN over merged slots (moe_align.cpp, moe_ffn.cpp, cuda/moe.cpp) ---
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& top_k_index,
                                                                         const at::Tensor& top_k_weights,
                                                                         const at::Tensor& expert_map,
                                                                         int64_t num_slots);
at::Tensor grouped_expert_ffn_cpu(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                  const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                  const at::Tensor& top_k_weights, c10::string_view activation);
#ifdef MCSMOE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& top_k_index,
                                                                          const at::Tensor& top_k_weights,
                                                                          const at::Tensor& expert_map,
                                                                          int64_t num_slots);
at::Tensor grouped_expert_ffn_cuda(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                   const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                   const at::Tensor& top_k_weights, c10::string_view activation);
#endif
// Shared checks: routing tensors; the FFN's arguments (returns true for swiglu); kernel status.
void check_moe_routing(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                       int64_t num_slots, const char* op);
bool check_grouped_ffn_args(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                            const at::Tensor& expert_map, const at::Tensor& top_k_index,
                            const at::Tensor& top_k_weights, c10::string_view activation);
void check_align_status(const moe::AlignStatus& st, int64_t k, int64_t E, int64_t S, const char* op);
// CPU alignment with weights summed in `acc` (kFloat or kDouble): sorted_tokens, offsets, weights, token_rows.
std::vector<at::Tensor> moe_align_cpu_impl(const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                           const at::Tensor& expert_map, int64_t num_slots, at::ScalarType acc);
// relu in place, or silu(gate) * up in place into the gate half (a strided [n, ff] view of h).
at::Tensor expert_activation(const at::Tensor& h, bool swiglu);

}  // namespace mcsmoe::ops
