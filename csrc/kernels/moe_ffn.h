// Elementwise pieces of the grouped expert FFN on the GPU (torch-free; the GEMMs go through ATen/cuBLAS):
// the fused gated activation and the weighted combine of each token's slot rows.
#pragma once
#include <cstdint>

#include "kernels/activation.h"

namespace mcsmoe::moe {

enum class Dtype { f32, f16, bf16 };

#ifdef MCSMOE_WITH_CUDA
// a[r, j] = act(h[r, j]) * h[r, ff + j] for h [n, 2*ff] (row stride ldh) -> a [n, ff] contiguous; float math.
// fn = clamped_swiglu: a[r, j] = clamped_swiglu(h[r, j], h[r, ff + j], alpha, limit) (activation.h).
void gated_act_cuda(const void* h, int64_t ldh, void* a, int64_t n, int64_t ff, ActFn fn, float alpha, float limit,
                    Dtype dtype, void* stream);
// out[t] = sum_j weights[row] * y[row] over row = token_rows[t, j] >= 0 (float accumulation; 0 if none).
void combine_cuda(const void* y, const float* weights, const int64_t* token_rows, int64_t T, int64_t k, int64_t d,
                  void* out, Dtype dtype, void* stream);
#endif

}  // namespace mcsmoe::moe
