// The element-wise expert activations of kernels/activation.h (run by the CUDA gated-activation kernels)
// against double-precision definitions of the same functions (torch's relu, gelu, gelu(tanh), silu,
// which the CPU path runs through ATen), over a sweep of inputs and at published values; their
// derivatives (act_grad, gated_act_backward: the CUDA backward kernel) against analytic double-precision
// derivatives and central differences of the reference. GPT-OSS's clamped SwiGLU (clamped_swiglu,
// clamped_swiglu_backward in float and double, and through gated_act / gated_act_backward) against its
// formula written out in double, central differences away from the clamp's corners, torch's clamp rule at
// them (the gradient passes at x == limit, stops beyond), and NaN inputs.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "kernels/activation.h"

using mcsmoe::moe::act;
using mcsmoe::moe::act_grad;
using mcsmoe::moe::ActFn;
using mcsmoe::moe::clamped_swiglu;
using mcsmoe::moe::clamped_swiglu_backward;
using mcsmoe::moe::gated_act;
using mcsmoe::moe::gated_act_backward;

namespace {

int g_passed = 0, g_failed = 0;

void check_close(double got, double want, const char* what, double x, double tol = 2e-6) {
  if (std::fabs(got - want) <= tol * (1.0 + std::fabs(want))) {
    ++g_passed;
  } else {
    if (++g_failed <= 20)
      std::fprintf(stderr, "FAIL: %s(%g) = %.9g, expected %.9g\n", what, x, got, want);
  }
}

double reference(double x, ActFn fn) {
  switch (fn) {
    case ActFn::relu: return x > 0 ? x : 0;
    case ActFn::relu2: return x > 0 ? x * x : 0;
    case ActFn::gelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case ActFn::gelu_tanh: return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    default: return x / (1 + std::exp(-x));
  }
}

// Analytic derivatives in double (relu: 0 at 0, as torch's threshold_backward).
double reference_grad(double x, ActFn fn) {
  const double pi = M_PI;
  switch (fn) {
    case ActFn::relu: return x > 0 ? 1 : 0;
    case ActFn::relu2: return x > 0 ? 2 * x : 0;
    case ActFn::gelu: return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * pi);
    case ActFn::gelu_tanh: {
      const double c = std::sqrt(2.0 / pi), t = std::tanh(c * (x + 0.044715 * x * x * x));
      return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x);
    }
    default: {
      const double s = 1 / (1 + std::exp(-x));
      return s * (1 + x * (1 - s));
    }
  }
}

// GPT-OSS's clamped SwiGLU as transformers writes it, in double.
double clamped_reference(double gate, double up, double alpha, double limit) {
  const double g = std::min(gate, limit), u = std::max(-limit, std::min(up, limit));
  return (u + 1) * (g / (1 + std::exp(-alpha * g)));
}

void check_true(bool ok, const char* what, double x) {
  if (ok) {
    ++g_passed;
  } else if (++g_failed <= 20) {
    std::fprintf(stderr, "FAIL: %s at %g\n", what, x);
  }
}

void check_clamped_swiglu() {
  const double params[][2] = {{1.702, 7.0}, {1.702, 0.8}, {0.5, 2.0}, {3.0, 0.0}, {-1.0, 1.5}};  // alpha, limit
  for (const auto& pr : params) {
    const double alpha = pr[0], limit = pr[1];
    const float af = static_cast<float>(alpha), lf = static_cast<float>(limit);
    for (double gate = -3 * limit - 2.1; gate <= 3 * limit + 2.1; gate += 0.173) {
      for (double up = -2 * limit - 1.3; up <= 2 * limit + 1.3; up += 0.211) {
        const float gf = static_cast<float>(gate), uf = static_cast<float>(up);
        const double gd = gf, ud = uf, want = clamped_reference(gd, ud, static_cast<double>(af), static_cast<double>(lf));
        // forward: float (the CUDA kernels), double (the CPU op in float64), and through gated_act
        check_close(clamped_swiglu<float>(gf, uf, af, lf), want, "clamped_swiglu<float>", gate, 2e-6);
        check_close(clamped_swiglu<double>(gate, up, alpha, limit), clamped_reference(gate, up, alpha, limit),
                    "clamped_swiglu<double>", gate, 1e-14);
        check_close(gated_act(gf, uf, ActFn::clamped_swiglu, af, lf), want, "gated_act(clamped_swiglu)", gate, 2e-6);
        // backward: central differences of the double formula, away from the corners at +-limit
        const double dA = 0.7 - 0.3 * up;
        const auto r = clamped_swiglu_backward<double>(gate, up, dA, alpha, limit);
        check_close(r.a, clamped_reference(gate, up, alpha, limit), "clamped_swiglu_backward<double>.a", gate, 1e-14);
        const double h = 1e-6;
        if (std::fabs(gate - limit) > 10 * h) {
          const double fd = dA * (clamped_reference(gate + h, up, alpha, limit) - clamped_reference(gate - h, up, alpha, limit)) / (2 * h);
          check_close(r.dg, fd, "clamped_swiglu_backward<double>.dg", gate, 1e-7);
        }
        if (std::fabs(std::fabs(up) - limit) > 10 * h) {
          const double fd = dA * (clamped_reference(gate, up + h, alpha, limit) - clamped_reference(gate, up - h, alpha, limit)) / (2 * h);
          check_close(r.du, fd, "clamped_swiglu_backward<double>.du", up, 1e-7);
        }
        // float, and the CUDA kernel's entry point, against the double backward on the same rounded inputs
        const float dAf = static_cast<float>(dA);
        const auto rd = clamped_swiglu_backward<double>(gd, ud, dAf, af, lf);
        const auto rf = clamped_swiglu_backward<float>(gf, uf, dAf, af, lf);
        const auto rk = gated_act_backward(gf, uf, dAf, ActFn::clamped_swiglu, af, lf);
        check_close(rf.a, rd.a, "clamped_swiglu_backward<float>.a", gate, 2e-6);
        check_close(rf.dg, rd.dg, "clamped_swiglu_backward<float>.dg", gate, 2e-6);
        check_close(rf.du, rd.du, "clamped_swiglu_backward<float>.du", up, 2e-6);
        check_true(rk.a == rf.a && rk.dg == rf.dg && rk.du == rf.du, "gated_act_backward(clamped_swiglu)", gate);
      }
    }
    // torch's clamp rule at the corners: the gradient passes at x == limit (and -limit), stops beyond
    const double g_in = limit, g_out = std::nextafter(limit, 1e9);
    const double dg_left = (clamped_reference(limit, 0.3, alpha, limit) - clamped_reference(limit - 1e-6, 0.3, alpha, limit)) / 1e-6;
    check_close(clamped_swiglu_backward<double>(g_in, 0.3, 1.0, alpha, limit).dg, dg_left, "dg at gate == limit", g_in, 1e-5);
    check_true(clamped_swiglu_backward<double>(g_out, 0.3, 1.0, alpha, limit).dg == 0, "dg above the limit", g_out);
    const double glu = limit / (1 + std::exp(-alpha * limit));  // gate == limit: d up = dA * glu
    check_close(clamped_swiglu_backward<double>(limit, limit, 1.0, alpha, limit).du, glu, "du at up == limit", limit, 1e-14);
    check_close(clamped_swiglu_backward<double>(limit, -limit, 1.0, alpha, limit).du, glu, "du at up == -limit", -limit, 1e-14);
    check_true(clamped_swiglu_backward<double>(limit, std::nextafter(limit, 1e9), 1.0, alpha, limit).du == 0,
               "du above the limit", limit);
    check_true(clamped_swiglu_backward<double>(limit, std::nextafter(-limit, -1e9), 1.0, alpha, limit).du == 0,
               "du below -limit", -limit);
    if (limit > 0)  // (limit 0: glu(0) = 0, so d up is 0 anyway)
      check_true(clamped_swiglu_backward<float>(lf, lf, 1.f, af, lf).du != 0 &&
                     clamped_swiglu_backward<float>(lf, 0.f, 1.f, af, lf).dg != 0,
                 "float gradients pass at the limit", limit);
  }
  // GPT-OSS's values: clamped_swiglu(1, 2) = 3 sigmoid(1.702) = 2.538..., gate 9 > 7 clamps to 7, up -9 to -7
  check_close(clamped_swiglu<double>(1.0, 2.0, 1.702, 7.0), 3.0 / (1 + std::exp(-1.702)), "clamped_swiglu(1, 2)", 1, 1e-15);
  check_close(clamped_swiglu<double>(9.0, -9.0, 1.702, 7.0), -6.0 * 7.0 / (1 + std::exp(-1.702 * 7)), "clamped_swiglu(9, -9)", 9, 1e-15);
  // NaN inputs stay NaN (torch's clamp propagates NaN)
  const float nan = std::nanf("");
  check_true(std::isnan(clamped_swiglu<float>(nan, 0.5f, 1.702f, 7.f)), "NaN gate", 0);
  check_true(std::isnan(clamped_swiglu<float>(0.5f, nan, 1.702f, 7.f)), "NaN up", 0);
}

}  // namespace

int main() {
  const ActFn fns[] = {ActFn::relu, ActFn::gelu, ActFn::gelu_tanh, ActFn::silu, ActFn::relu2};
  const char* names[] = {"relu", "gelu", "gelu_tanh", "silu", "relu2"};
  constexpr int kFns = 5;
  for (int f = 0; f < kFns; ++f)
    for (double x = -12.0; x <= 12.0; x += 0.037)
      check_close(act(static_cast<float>(x), fns[f]), reference(static_cast<float>(x), fns[f]), names[f], x);
  // published values (torch): gelu(1) = 0.8413447, gelu_tanh(1) = 0.8411920, silu(1) = 0.7310586
  check_close(act(1.f, ActFn::gelu), 0.8413447, "gelu", 1);
  check_close(act(1.f, ActFn::gelu_tanh), 0.8411920, "gelu_tanh", 1);
  check_close(act(1.f, ActFn::silu), 0.7310586, "silu", 1);
  check_close(act(-3.f, ActFn::relu), 0.0, "relu", -3);
  // derivatives: analytic (double) over the sweep, central differences of the reference away from relu's kink
  for (int f = 0; f < kFns; ++f) {
    for (double x = -12.0; x <= 12.0; x += 0.037) {
      const double xf = static_cast<float>(x);
      check_close(act_grad(static_cast<float>(x), fns[f]), reference_grad(xf, fns[f]), names[f], x);
      if ((fns[f] == ActFn::relu || fns[f] == ActFn::relu2) && std::fabs(xf) < 1e-3) continue;
      const double h = 1e-5;
      const double fd = (reference(xf + h, fns[f]) - reference(xf - h, fns[f])) / (2 * h);
      check_close(act_grad(static_cast<float>(x), fns[f]), fd, names[f], x, 1e-5);
    }
  }
  // published values: gelu'(1) = 1.0833155, silu'(1) = 0.9276705, relu'(0) = 0 (torch)
  check_close(act_grad(1.f, ActFn::gelu), 1.0833155, "gelu'", 1);
  check_close(act_grad(1.f, ActFn::silu), 0.9276705, "silu'", 1);
  check_close(act_grad(0.f, ActFn::relu), 0.0, "relu'", 0);
  check_close(act(3.f, ActFn::relu2), 9.0, "relu2", 3);
  check_close(act(-3.f, ActFn::relu2), 0.0, "relu2", -3);
  check_close(act_grad(3.f, ActFn::relu2), 6.0, "relu2'", 3);
  check_close(act_grad(0.f, ActFn::relu2), 0.0, "relu2'", 0);
  // gated backward: a = act(g) u, dg = dA u act'(g), du = dA act(g)
  for (int f = 0; f < kFns; ++f) {
    for (double g = -6.0; g <= 6.0; g += 0.31) {
      for (double u = -2.0; u <= 2.0; u += 0.7) {
        const double dA = 0.3 - 0.5 * u;
        const auto r = gated_act_backward(static_cast<float>(g), static_cast<float>(u), static_cast<float>(dA), fns[f]);
        const double gf = static_cast<float>(g), uf = static_cast<float>(u), dAf = static_cast<float>(dA);
        check_close(r.a, reference(gf, fns[f]) * uf, names[f], g);
        check_close(r.dg, dAf * uf * reference_grad(gf, fns[f]), names[f], g);
        check_close(r.du, dAf * reference(gf, fns[f]), names[f], g);
      }
    }
  }
  check_clamped_swiglu();
  std::printf("test_activation: %d checks passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
