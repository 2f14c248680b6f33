// The element-wise expert activations (mcsmoe_fast/activations.py), torch-free and host/device: the CUDA
// gated-activation kernel runs act(gate) * up with these; the CPU path uses ATen's vectorized ops for the
// same functions (the C++ tests compare the two definitions).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define ACT_HD __host__ __device__ __forceinline__
#else
#define ACT_HD inline
#endif

namespace mcsmoe::moe {

enum class ActFn : int { relu = 0, gelu = 1, gelu_tanh = 2, silu = 3 };

ACT_HD float act(float x, ActFn fn) {
  switch (fn) {
    case ActFn::relu:
      return x > 0.f ? x : 0.f;
    case ActFn::gelu:  // exact (erf) GELU, torch's default
      return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case ActFn::gelu_tanh: {  // torch's approximate="tanh", transformers' gelu_new
      const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(u));
    }
    default:  // silu
      return x / (1.f + expf(-x));
  }
}

}  // namespace mcsmoe::moe
