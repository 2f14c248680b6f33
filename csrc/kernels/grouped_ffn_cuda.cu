// Fused gated activation (act(gate) * up, or clamped SwiGLU) and the weighted combine for the grouped expert
// FFN (contracts in grouped_ffn.h).
#include <type_traits>

#include "kernels/cuda_dispatch.cuh"
#include "kernels/grouped_ffn.h"

namespace mcsmoe::moe {
namespace {

constexpr const char* kOp = "grouped_expert_ffn";

template <typename T>
__global__ void gated_act_kernel(const T* __restrict__ h, int64_t ldh, T* __restrict__ a, int64_t n, int64_t ff,
                                 ActFn fn, float alpha, float limit) {
  const int64_t total = n * ff;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / ff, j = i - r * ff;
    const float g = load(h + r * ldh + j), u = load(h + r * ldh + ff + j);
    store(a + i, gated_act(g, u, fn, alpha, limit));
  }
}

// One block per token, threads over the hidden dimension.
template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, const float* __restrict__ weights,
                               const int64_t* __restrict__ token_rows, int64_t k, int64_t d, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int64_t* rows = token_rows + t * k;
  for (int64_t x = threadIdx.x; x < d; x += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = rows[j];
      if (row < 0) break;
      acc += weights[row] * load(y + row * d + x);
    }
    store(out + t * d + x, acc);
  }
}

}  // namespace

void gated_act_cuda(const void* h, int64_t ldh, void* a, int64_t n, int64_t ff, ActFn fn, float alpha, float limit,
                    Dtype dtype, void* stream) {
  if (n == 0 || ff == 0) return;
  const int threads = 256;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gated_act_kernel<T><<<grid_for(n * ff, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(h), ldh, static_cast<T*>(a), n, ff, fn, alpha, limit);
  });
  cuda_check(cudaGetLastError(), kOp, "gated activation kernel");
}

void combine_cuda(const void* y, const float* weights, const int64_t* token_rows, int64_t T, int64_t k, int64_t d,
                  void* out, Dtype dtype, void* stream) {
  if (T == 0 || d == 0) return;
  const int threads = d >= 256 ? 256 : 32 * static_cast<int>((d + 31) / 32);
  by_dtype(dtype, [&](auto* tag) {
    using Ty = std::remove_pointer_t<decltype(tag)>;
    combine_kernel<Ty><<<static_cast<unsigned>(T), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const Ty*>(y), weights, token_rows, k, d, static_cast<Ty*>(out));
  });
  cuda_check(cudaGetLastError(), kOp, "combine kernel");
}

}  // namespace mcsmoe::moe
