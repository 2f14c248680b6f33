// Elementwise pieces of the grouped expert FFN's backward on the GPU (torch-free; the GEMMs go through
// ATen/cuBLAS): the activation backward with the routing weights' row gradients, and the routing weights'
// gradient per top-k entry. The per-element math is gated_act_backward / act_grad (activation.h).
#pragma once
#include <cstdint>

#include "kernels/activation.h"
#include "kernels/dtype.h"

namespace mcsmoe::moe {

#ifdef MCSMOE_WITH_CUDA
// For n rows of one slot: h [n, F] (row stride ldh; F = 2*ff gated: gate columns then up columns, else F = ff)
// holds H = X W_in^T, p [n, ff] contiguous holds P = G W_out (may be null when neither row_grad nor write_dh
// is asked for), w [n] the rows' summed routing weights.
// With A = act(H) (or act(gate) * up, or clamped_swiglu(gate, up) with alpha and limit), float math:
//   row_grad != nullptr: row_grad[r] = sum_j P[r, j] A[r, j]        (float)
//                        + sum_c G[r, c] b_out[c] over c < d when b_out != nullptr (g [n, d], row stride ldg:
//                        the slot's grad_out rows; the output bias's share of <G_r, y_r>)
//   wa != nullptr:       wa [n, ff] contiguous = w[r] A[r, j]
//   write_dh:            h = dH, the gradient of H for dA = w[r] P[r, j] (in place of H)
void act_backward_cuda(void* h, int64_t ldh, const void* p, const float* w, void* wa, float* row_grad, bool write_dh,
                       int64_t n, int64_t ff, ActFn fn, bool gated, float alpha, float limit, const void* g,
                       int64_t ldg, const void* b_out, int64_t d, Dtype dtype, void* stream);
// out [T*k] = row_grads[row] for the row of token t on slot expert_map[top_k_index[t, j]] (found in
// token_rows [T, k] through the slot offsets [S + 1]), 0 where top_k_index is -1 (or no row matches).
void routing_weight_grads_cuda(const int64_t* top_k_index, const int64_t* expert_map, const int64_t* offsets,
                               const int64_t* token_rows, const float* row_grads, int64_t T, int64_t k, float* out,
                               void* stream);
#endif

}  // namespace mcsmoe::moe
