// The element-wise expert activations (mcsmoe_fast/activations.py), torch-free and host/device: the CUDA
// gated-activation kernels run act(gate) * up and its backward with these; the CPU path uses ATen's
// vectorized ops for the same functions (the C++ tests compare the two definitions).
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

// d act / dx, as torch's backward computes it (relu: 0 at x = 0, like threshold_backward).
ACT_HD float act_grad(float x, ActFn fn) {
  switch (fn) {
    case ActFn::relu:
      return x > 0.f ? 1.f : 0.f;
    case ActFn::gelu:  // Phi(x) + x phi(x)
      return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
    case ActFn::gelu_tanh: {
      const float x2 = x * x;
      const float t = tanhf(0.79788456080286536f * (x + 0.044715f * x2 * x));
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * 0.79788456080286536f * (1.f + 3.f * 0.044715f * x2);
    }
    default: {  // silu: s (1 + x (1 - s)) with s = sigmoid(x)
      const float s = 1.f / (1.f + expf(-x));
      return s * (1.f + x * (1.f - s));
    }
  }
}

// One element of the expert activation's backward. Ungated a = act(h): given dA (the gradient reaching a),
// writes a and dh = dA act'(h). Gated a = act(g) u: writes a, dg = dA u act'(g) and du = dA act(g).
struct GatedGrad {
  float a, dg, du;
};
ACT_HD GatedGrad gated_act_backward(float g, float u, float dA, ActFn fn) {
  const float ag = act(g, fn);
  return {ag * u, dA * u * act_grad(g, fn), dA * ag};
}

}  // namespace mcsmoe::moe
