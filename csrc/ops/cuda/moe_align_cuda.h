// Routing alignment on the GPU, shared by the grouped expert FFN ops on CUDA (grouped_ffn_cuda.cpp,
// grouped_ffn_backward_cuda.cpp, grouped_ffn_slr_cuda.cpp; defined in moe_align_cuda.cpp with the moe_align op).
#pragma once
#include <ATen/ATen.h>

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

}  // namespace mcsmoe::ops
