// Routing alignment on the GPU, shared by the dense and the compressed grouped expert FFNs
// (moe_cuda.cpp, slr_cuda.cpp; defined in moe_cuda.cpp). Only c10/cuda headers: ATen/cuda does not
// compile with this toolkit (no cublas_v2.h).
#pragma once
#include <ATen/ATen.h>

#include "kernels/moe_ffn.h"

namespace mcsmoe::ops {

struct AlignedCuda {
  at::Tensor sorted_tokens, offsets, weights, token_rows;
  at::Tensor dev;   // device int64 [S + 1 + 3 + extra]: offsets, status (code, where, value), caller's words
  at::Tensor host;  // dev copied to the CPU (one device-to-host copy, which waits for the stream)
};

// Launches the alignment kernels on the current stream; no copy, no check. `extra` int64 words after
// the status are left for the caller to fill, so that its own small results travel in the same copy.
AlignedCuda launch_align(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                         int64_t S, const char* op, int64_t extra = 0);
// Raises on bad expert ids or map entries, from the status in r.host.
void check_align(const AlignedCuda& r, int64_t k, int64_t E, int64_t S, const char* op);
// launch_align, the copy to the host, check_align.
AlignedCuda align(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                  int64_t S, const char* op);

// The kernels' dtype tag: float32, float16 or bfloat16 (anything else raises, naming op).
moe::Dtype kernel_dtype(at::ScalarType t, const char* op);

}  // namespace mcsmoe::ops
