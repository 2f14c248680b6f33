// Fused gated activation (act(gate) * up, or clamped SwiGLU) and the weighted combine for the grouped expert FFN (contracts in moe_ffn.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/moe_ffn.h"

namespace mcsmoe::moe {
namespace {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

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

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("grouped_expert_ffn: ") + what + ": " + cudaGetErrorString(err));
}

template <typename F>
void by_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: f(static_cast<float*>(nullptr)); break;
    case Dtype::f16: f(static_cast<__half*>(nullptr)); break;
    case Dtype::bf16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

}  // namespace

void gated_act_cuda(const void* h, int64_t ldh, void* a, int64_t n, int64_t ff, ActFn fn, float alpha, float limit,
                    Dtype dtype, void* stream) {
  if (n == 0 || ff == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n * ff + threads - 1) / threads, 65535 * 8);
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gated_act_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(h), ldh, static_cast<T*>(a), n, ff, fn, alpha, limit);
  });
  check(cudaGetLastError(), "gated activation kernel");
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
  check(cudaGetLastError(), "combine kernel");
}

}  // namespace mcsmoe::moe
