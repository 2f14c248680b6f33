// Routing alignment for the grouped expert FFN: from each token's top-k original experts to a list of
// (token, merged slot) pairs sorted by slot. Torch-free: raw pointers and sizes.
//
// Inputs : top_k_index [T, k] (expert ids, -1 = no expert: a token dropped by expert capacity),
//          top_k_weights [T, k], expert_map [E] (slot of each original expert, in [0, S)).
// Outputs: sorted_tokens [T*k]  token of each pair, pairs grouped by slot (ascending), tokens
//                               ascending within a slot; entries past offsets[S] are -1.
//          offsets [S + 1]      pairs of slot s are rows offsets[s] .. offsets[s+1].
//          sorted_weights [T*k] the token's routing weights on that slot, summed (a token whose top-k
//                               experts share a slot runs that slot once); 0 past offsets[S].
//          token_rows [T, k]    rows of token t's pairs in ascending slot order, then -1.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mcsmoe::moe {

// Status of an alignment: 0 = ok; otherwise which input was out of range and where.
struct AlignStatus {
  int code = 0;        // 0 ok, 1 expert id out of [-1, E), 2 expert_map entry out of [0, S)
  int64_t where = 0;   // flat index of the offending entry
  int64_t value = 0;   // the offending value
};

// W is the accumulation type of the weights (float or double); IW the input weight type.
template <typename IW, typename W>
AlignStatus align_cpu(const int64_t* top_k_index, const IW* top_k_weights, const int64_t* expert_map,
                      int64_t T, int64_t k, int64_t E, int64_t S, int64_t* sorted_tokens, int64_t* offsets,
                      W* sorted_weights, int64_t* token_rows);

#ifdef MCSMOE_WITH_CUDA
// Same contract on the GPU (all pointers device memory, float weights out). workspace holds
// align_cuda_workspace_bytes(T, k, S) bytes. status_out (device, 3 int64: code, where, value) is
// written with the first error found (code 0 when none); ids out of range are skipped, never read.
size_t align_cuda_workspace_bytes(int64_t T, int64_t k, int64_t S);
template <typename IW>
void align_cuda(const int64_t* top_k_index, const IW* top_k_weights, const int64_t* expert_map, int64_t T,
                int64_t k, int64_t E, int64_t S, int64_t* sorted_tokens, int64_t* offsets, float* sorted_weights,
                int64_t* token_rows, int64_t* status_out, void* workspace, void* stream);
#endif

}  // namespace mcsmoe::moe
