// GPU routing alignment (contract in moe_align.h), deterministic, no sort:
//   1. pair_slots: one thread per token deduplicates its k slots (summing weights), ranks its distinct
//      slots (for token_rows) and counts pairs per slot with integer atomics.
//   2. slot_offsets: one thread, prefix sum over S (S is the number of merged experts: small).
//   3. place: one block per slot walks all pairs in token order and compacts its own with a block
//      prefix sum (warp ballots), so tokens stay ascending within a slot; an extra block pads the tail.
#include "kernels/cuda_dispatch.cuh"
#include "kernels/moe_align.h"

namespace mcsmoe::moe {
namespace {

constexpr const char* kOp = "moe_align";
constexpr int kPlaceThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// A bad entry is reported as a key in status[0] and the smallest key wins (atomicMin), so the report is the one
// align_cpu gives whichever thread finds it first: expert_map entries first (key e), then top_k_index positions in
// flat order (key kIdKey + position). finish_status_kernel turns the key into the status words (code, where, value).
constexpr unsigned long long kNoError = ~0ull;
constexpr unsigned long long kIdKey = 1ull << 62;

__device__ void report(int64_t* status, unsigned long long key) {
  atomicMin(reinterpret_cast<unsigned long long*>(status), key);
}

__global__ void finish_status_kernel(const int64_t* __restrict__ top_k_index, const int64_t* __restrict__ expert_map,
                                     int64_t* status) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const auto key = static_cast<unsigned long long>(status[0]);
  if (key == kNoError) {
    status[0] = 0;  // status[1] and status[2] stay 0
  } else if (key < kIdKey) {
    status[0] = 2;
    status[1] = static_cast<int64_t>(key);
    status[2] = expert_map[key];
  } else {
    const auto where = static_cast<int64_t>(key - kIdKey);
    status[0] = 1;
    status[1] = where;
    status[2] = top_k_index[where];
  }
}

template <typename IW>
__global__ void pair_slots_kernel(const int64_t* __restrict__ top_k_index, const IW* __restrict__ top_k_weights,
                                  const int64_t* __restrict__ expert_map, int64_t T, int k, int64_t E, int64_t S,
                                  int* __restrict__ pair_slot, int* __restrict__ pair_rank,
                                  float* __restrict__ pair_weight, int* __restrict__ counts,
                                  int64_t* __restrict__ token_rows, int64_t* status) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const int64_t base = t * k;
  int distinct = 0;
  for (int j = 0; j < k; ++j) {
    const int64_t e = top_k_index[base + j];
    int slot = -1;
    if (e < -1 || e >= E) {
      report(status, kIdKey + static_cast<unsigned long long>(base + j));
    } else if (e >= 0) {
      const int64_t s = expert_map[e];
      if (s < 0 || s >= S) report(status, static_cast<unsigned long long>(e)); else slot = static_cast<int>(s);
    }
    pair_slot[base + j] = -1;
    pair_weight[base + j] = 0.f;
    if (slot < 0) continue;
    int first = -1;
    for (int jj = 0; jj < j && first < 0; ++jj) if (pair_slot[base + jj] == slot) first = jj;
    if (first >= 0) {
      pair_weight[base + first] += to_float(top_k_weights[base + j]);
    } else {
      pair_slot[base + j] = slot;
      pair_weight[base + j] = to_float(top_k_weights[base + j]);
      atomicAdd(counts + slot, 1);
      ++distinct;
    }
  }
  for (int j = 0; j < k; ++j) {  // rank of each distinct slot among the token's slots (ascending)
    const int s = pair_slot[base + j];
    if (s < 0) continue;
    int rank = 0;
    for (int jj = 0; jj < k; ++jj) rank += (pair_slot[base + jj] >= 0 && pair_slot[base + jj] < s);
    pair_rank[base + j] = rank;
  }
  for (int j = distinct; j < k; ++j) token_rows[base + j] = -1;
}

// Every expert_map entry, as align_cpu checks them (also those no token routes to, and when T = 0); a bad map
// entry's key is below every top_k_index key, so it is reported first, as on the CPU.
__global__ void check_map_kernel(const int64_t* __restrict__ expert_map, int64_t E, int64_t S, int64_t* status) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = expert_map[e];
    if (s < 0 || s >= S) report(status, static_cast<unsigned long long>(e));
  }
}

__global__ void slot_offsets_kernel(const int* __restrict__ counts, int64_t S, int64_t* __restrict__ offsets) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t acc = 0;
  offsets[0] = 0;
  for (int64_t s = 0; s < S; ++s) offsets[s + 1] = (acc += counts[s]);
}

__global__ void place_kernel(const int* __restrict__ pair_slot, const int* __restrict__ pair_rank,
                             const float* __restrict__ pair_weight, const int64_t* __restrict__ offsets, int64_t n,
                             int k, int64_t S, int64_t* __restrict__ sorted_tokens, float* __restrict__ sorted_weights,
                             int64_t* __restrict__ token_rows) {
  const int64_t slot = blockIdx.x;
  if (slot == S) {  // padding block
    for (int64_t row = offsets[S] + threadIdx.x; row < n; row += blockDim.x) {
      sorted_tokens[row] = -1;
      sorted_weights[row] = 0.f;
    }
    return;
  }
  __shared__ int warp_totals[kPlaceThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t next_row = offsets[slot];
  for (int64_t chunk = 0; chunk < n; chunk += blockDim.x) {
    const int64_t i = chunk + threadIdx.x;
    const bool mine = i < n && pair_slot[i] == slot;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u));
    int total = 0;
    for (int w = 0; w < kPlaceThreads / 32; ++w) {
      if (w < warp) before += warp_totals[w];
      total += warp_totals[w];
    }
    if (mine) {
      const int64_t row = next_row + before, t = i / k;
      sorted_tokens[row] = t;
      sorted_weights[row] = pair_weight[i];
      token_rows[t * k + pair_rank[i]] = row;
    }
    next_row += total;
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }
}

template <typename T>
T* carve(char*& p, int64_t count) {
  T* out = reinterpret_cast<T*>(p);
  p += ((count * sizeof(T) + 255) / 256) * 256;
  return out;
}

}  // namespace

size_t align_cuda_workspace_bytes(int64_t T, int64_t k, int64_t S) {
  auto round = [](int64_t bytes) { return ((bytes + 255) / 256) * 256; };
  const int64_t n = T * k;
  return round(n * 4) * 2 + round(n * 4) + round(S * 4);
}

template <typename IW>
void align_cuda(const int64_t* top_k_index, const IW* top_k_weights, const int64_t* expert_map, int64_t T, int64_t k,
                int64_t E, int64_t S, int64_t* sorted_tokens, int64_t* offsets, float* sorted_weights,
                int64_t* token_rows, int64_t* status_out, void* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t n = T * k;
  char* p = static_cast<char*>(workspace);
  int* pair_slot = carve<int>(p, n);
  int* pair_rank = carve<int>(p, n);
  float* pair_weight = carve<float>(p, n);
  int* counts = carve<int>(p, S);
  cuda_check(cudaMemsetAsync(counts, 0, S * sizeof(int), stream), kOp, "memset");
  cuda_check(cudaMemsetAsync(status_out, 0xFF, sizeof(int64_t), stream), kOp, "memset");  // kNoError
  cuda_check(cudaMemsetAsync(status_out + 1, 0, 2 * sizeof(int64_t), stream), kOp, "memset");
  if (E > 0) {
    check_map_kernel<<<grid_for(E, 256), 256, 0, stream>>>(expert_map, E, S, status_out);
    cuda_check(cudaGetLastError(), kOp, "expert_map check kernel");
  }
  if (T > 0) {
    const int threads = 256;
    pair_slots_kernel<IW><<<static_cast<unsigned>((T + threads - 1) / threads), threads, 0, stream>>>(
        top_k_index, top_k_weights, expert_map, T, static_cast<int>(k), E, S, pair_slot, pair_rank, pair_weight,
        counts, token_rows, status_out);
    cuda_check(cudaGetLastError(), kOp, "pair_slots kernel");
  }
  finish_status_kernel<<<1, 1, 0, stream>>>(top_k_index, expert_map, status_out);
  cuda_check(cudaGetLastError(), kOp, "status kernel");
  slot_offsets_kernel<<<1, 1, 0, stream>>>(counts, S, offsets);
  cuda_check(cudaGetLastError(), kOp, "slot_offsets kernel");
  place_kernel<<<static_cast<unsigned>(S + 1), kPlaceThreads, 0, stream>>>(
      pair_slot, pair_rank, pair_weight, offsets, n, static_cast<int>(k), S, sorted_tokens, sorted_weights, token_rows);
  cuda_check(cudaGetLastError(), kOp, "place kernel");
}

#define MCSMOE_ALIGN_CUDA(IW)                                                                                     \
  template void align_cuda<IW>(const int64_t*, const IW*, const int64_t*, int64_t, int64_t, int64_t, int64_t,     \
                               int64_t*, int64_t*, float*, int64_t*, int64_t*, void*, void*);
MCSMOE_ALIGN_CUDA(float)
MCSMOE_ALIGN_CUDA(double)
MCSMOE_ALIGN_CUDA(__half)
MCSMOE_ALIGN_CUDA(__nv_bfloat16)
#undef MCSMOE_ALIGN_CUDA

}  // namespace mcsmoe::moe
