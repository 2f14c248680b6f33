// What every CUDA kernel file shares (included by each csrc/kernels/*.cu, never by host code): float loads
// and stores of the kernels' element types, dispatch from the Dtype tag to the element type, the grid of a
// grid-stride loop and the launchers' error check. torch compiles .cu files with __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__: the conversions below are the explicit intrinsics.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/dtype.h"

namespace mcsmoe {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// f(static_cast<T*>(nullptr)) with T the element type of dtype (float, __half or __nv_bfloat16): a launcher
// writes one generic lambda and reads T back with std::remove_pointer_t<decltype(tag)>.
template <typename F>
void by_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: f(static_cast<float*>(nullptr)); break;
    case Dtype::f16: f(static_cast<__half*>(nullptr)); break;
    case Dtype::bf16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

// Blocks of `threads` for a grid-stride loop over n elements: enough to cover them, at most 65535 * 8,
// at least one.
inline unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 8)));
}

// Throws std::runtime_error("<op>: <what>: <CUDA's message>") unless err is cudaSuccess. The launchers are
// torch-free; the ops (csrc/ops/cuda) turn the exception into a torch error.
inline void cuda_check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorString(err));
}

}  // namespace mcsmoe
