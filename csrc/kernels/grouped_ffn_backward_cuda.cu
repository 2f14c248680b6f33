// The grouped expert FFN's backward elementwise kernels (contracts in grouped_ffn_backward.h): one block per row
// for the activation backward (its row sum is the routing weight's gradient), one thread per top-k entry
// for the routing weights' gradient.
#include <type_traits>

#include "kernels/cuda_dispatch.cuh"
#include "kernels/grouped_ffn_backward.h"

namespace mcsmoe::moe {
namespace {

constexpr const char* kOp = "grouped_expert_ffn_backward";
constexpr int kThreads = 256;

// Block-wide sum (kThreads threads); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// One block per row r; threads over the ff columns. Each thread reads its gate/up (or h) entries before it
// writes their gradients in place, and no other thread touches them.
template <typename T>
__global__ void act_backward_kernel(T* __restrict__ h, int64_t ldh, const T* __restrict__ p,
                                    const float* __restrict__ w, T* __restrict__ wa, float* __restrict__ row_grad,
                                    bool write_dh, int64_t ff, ActFn fn, bool gated, float alpha, float limit,
                                    const T* __restrict__ g, int64_t ldg, const T* __restrict__ b_out, int64_t d) {
  const int64_t r = blockIdx.x;
  T* hr = h + r * ldh;
  const float wr = w[r];
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < ff; j += kThreads) {
    const float pj = p != nullptr ? load(p + r * ff + j) : 0.f;
    float a;
    if (gated) {
      const GatedGrad gg = gated_act_backward(load(hr + j), load(hr + ff + j), wr * pj, fn, alpha, limit);
      a = gg.a;
      if (write_dh) {
        store(hr + j, gg.dg);
        store(hr + ff + j, gg.du);
      }
    } else {
      const float x = load(hr + j);
      a = act(x, fn);
      if (write_dh) store(hr + j, wr * pj * act_grad(x, fn));
    }
    dot += pj * a;
    if (wa != nullptr) store(wa + r * ff + j, wr * a);
  }
  if (row_grad != nullptr) {
    if (b_out != nullptr)  // <G_r, b_out>: the output bias's part of the row's output
      for (int64_t c = threadIdx.x; c < d; c += kThreads) dot += load(g + r * ldg + c) * load(b_out + c);
    dot = block_sum(dot);
    if (threadIdx.x == 0) row_grad[r] = dot;
  }
}

__global__ void routing_weight_grads_kernel(const int64_t* __restrict__ top_k_index,
                                            const int64_t* __restrict__ expert_map,
                                            const int64_t* __restrict__ offsets,
                                            const int64_t* __restrict__ token_rows,
                                            const float* __restrict__ row_grads, int64_t T, int64_t k,
                                            float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < T * k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    const int64_t e = top_k_index[i];
    if (e >= 0) {
      const int64_t s = expert_map[e], t = i / k, lo = offsets[s], hi = offsets[s + 1];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = token_rows[t * k + j];
        if (row < 0) break;
        if (row >= lo && row < hi) {
          v = row_grads[row];
          break;
        }
      }
    }
    out[i] = v;
  }
}

}  // namespace

void act_backward_cuda(void* h, int64_t ldh, const void* p, const float* w, void* wa, float* row_grad, bool write_dh,
                       int64_t n, int64_t ff, ActFn fn, bool gated, float alpha, float limit, const void* g,
                       int64_t ldg, const void* b_out, int64_t d, Dtype dtype, void* stream) {
  if (n == 0) return;
  if (n > 0x7fffffff) throw std::runtime_error(std::string(kOp) + ": more than 2^31 - 1 rows in one slot");
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    act_backward_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(h), ldh, static_cast<const T*>(p), w, static_cast<T*>(wa), row_grad, write_dh, ff, fn, gated,
        alpha, limit, static_cast<const T*>(g), ldg, static_cast<const T*>(b_out), d);
  });
  cuda_check(cudaGetLastError(), kOp, "activation backward kernel");
}

void routing_weight_grads_cuda(const int64_t* top_k_index, const int64_t* expert_map, const int64_t* offsets,
                               const int64_t* token_rows, const float* row_grads, int64_t T, int64_t k, float* out,
                               void* stream) {
  if (T * k == 0) return;
  const int threads = 256;
  routing_weight_grads_kernel<<<grid_for(T * k, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      top_k_index, expert_map, offsets, token_rows, row_grads, T, k, out);
  cuda_check(cudaGetLastError(), kOp, "routing weight gradient kernel");
}

}  // namespace mcsmoe::moe
