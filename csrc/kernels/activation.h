// The element-wise expert activations (mcsmoe_fast/activations.py), torch-free and host/device: the CUDA
// gated-activation kernels run act(gate) * up and its backward with these; the CPU path uses ATen's
// vectorized ops for the same functions (the C++ tests compare the two definitions). GPT-OSS's clamped
// SwiGLU, whose gate and up halves interact, has its own pair of functions (templates: the CPU op runs
// them in float64 too).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define ACT_HD __host__ __device__ __forceinline__
#else
#define ACT_HD inline
#endif

namespace mcsmoe::moe {

// clamped_swiglu is gated only and has no act(x) of one input: act() and act_grad() do not take it;
// gated_act / gated_act_backward below do.
// relu2: squared ReLU, relu(x)^2 (transformers' "relu2": Nemotron-H's experts).
enum class ActFn : int { relu = 0, gelu = 1, gelu_tanh = 2, silu = 3, clamped_swiglu = 4, relu2 = 5 };

ACT_HD float act(float x, ActFn fn) {
  switch (fn) {
    case ActFn::relu:
      return x > 0.f ? x : 0.f;
    case ActFn::relu2:
      return x > 0.f ? x * x : 0.f;
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

// d act / dx, as torch's backward computes it (relu, relu2: 0 at x = 0, like threshold_backward).
ACT_HD float act_grad(float x, ActFn fn) {
  switch (fn) {
    case ActFn::relu:
      return x > 0.f ? 1.f : 0.f;
    case ActFn::relu2:  // 2 relu(x), autograd's through relu then square
      return x > 0.f ? 2.f * x : 0.f;
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

// GPT-OSS's clamped SwiGLU on one (gate, up) pair, as transformers writes it:
//   g = min(gate, limit), u = clamp(up, -limit, limit), a = (u + 1) * (g * sigmoid(alpha * g))
// Its backward is torch autograd's on that formula: clamp passes the gradient where min <= x <= max
// (limits included) and nothing outside; NaN inputs stay NaN forward (the comparisons are false).
template <typename T>
struct ClampedGrad {
  T a, dg, du;
};

template <typename T>
ACT_HD T clamp_hi(T x, T hi) { return x > hi ? hi : x; }
template <typename T>
ACT_HD T clamp_lohi(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
ACT_HD float exp_of(float x) { return expf(x); }
ACT_HD double exp_of(double x) { return exp(x); }

template <typename T>
ACT_HD T clamped_swiglu(T gate, T up, T alpha, T limit) {
  const T g = clamp_hi(gate, limit), u = clamp_lohi(up, -limit, limit);
  const T s = T(1) / (T(1) + exp_of(-(g * alpha)));
  return (u + T(1)) * (g * s);
}

// dA: the gradient reaching a. dg, du: the gradients of gate and up.
template <typename T>
ACT_HD ClampedGrad<T> clamped_swiglu_backward(T gate, T up, T dA, T alpha, T limit) {
  const T g = clamp_hi(gate, limit), u = clamp_lohi(up, -limit, limit);
  const T s = T(1) / (T(1) + exp_of(-(g * alpha)));
  const T glu = g * s, u1 = u + T(1);
  const T dglu = dA * u1;
  // d(g s)/dg = s + g alpha s (1 - s)
  const T dg = gate <= limit ? dglu * s * (T(1) + alpha * g * (T(1) - s)) : T(0);
  const T du = (up >= -limit && up <= limit) ? dA * glu : T(0);
  return {u1 * glu, dg, du};
}

// One element of a gated activation: act(g) * u, or clamped_swiglu(g, u) (alpha, limit: its parameters,
// ignored by the others).
ACT_HD float gated_act(float g, float u, ActFn fn, float alpha, float limit) {
  if (fn == ActFn::clamped_swiglu) return clamped_swiglu(g, u, alpha, limit);
  return act(g, fn) * u;
}

ACT_HD GatedGrad gated_act_backward(float g, float u, float dA, ActFn fn, float alpha = 1.702f, float limit = 7.f) {
  if (fn == ActFn::clamped_swiglu) {
    const ClampedGrad<float> r = clamped_swiglu_backward(g, u, dA, alpha, limit);
    return {r.a, r.dg, r.du};
  }
  const float ag = act(g, fn);
  return {ag * u, dA * u * act_grad(g, fn), dA * ag};
}

}  // namespace mcsmoe::moe
