// The element-wise expert activations of kernels/activation.h (run by the CUDA gated-activation kernels)
// against double-precision definitions of the same functions (torch's relu, gelu, gelu(tanh), silu,
// which the CPU path runs through ATen), over a sweep of inputs and at published values; their
// derivatives (act_grad, gated_act_backward: the CUDA backward kernel) against analytic double-precision
// derivatives and central differences of the reference.
#include <cmath>
#include <cstdio>

#include "kernels/activation.h"

using mcsmoe::moe::act;
using mcsmoe::moe::act_grad;
using mcsmoe::moe::ActFn;
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

}  // namespace

int main() {
  const ActFn fns[] = {ActFn::relu, ActFn::gelu, ActFn::gelu_tanh, ActFn::silu};
  const char* names[] = {"relu", "gelu", "gelu_tanh", "silu"};
  for (int f = 0; f < 4; ++f)
    for (double x = -12.0; x <= 12.0; x += 0.037)
      check_close(act(static_cast<float>(x), fns[f]), reference(static_cast<float>(x), fns[f]), names[f], x);
  // published values (torch): gelu(1) = 0.8413447, gelu_tanh(1) = 0.8411920, silu(1) = 0.7310586
  check_close(act(1.f, ActFn::gelu), 0.8413447, "gelu", 1);
  check_close(act(1.f, ActFn::gelu_tanh), 0.8411920, "gelu_tanh", 1);
  check_close(act(1.f, ActFn::silu), 0.7310586, "silu", 1);
  check_close(act(-3.f, ActFn::relu), 0.0, "relu", -3);
  // derivatives: analytic (double) over the sweep, central differences of the reference away from relu's kink
  for (int f = 0; f < 4; ++f) {
    for (double x = -12.0; x <= 12.0; x += 0.037) {
      const double xf = static_cast<float>(x);
      check_close(act_grad(static_cast<float>(x), fns[f]), reference_grad(xf, fns[f]), names[f], x);
      if (fns[f] == ActFn::relu && std::fabs(xf) < 1e-3) continue;
      const double h = 1e-5;
      const double fd = (reference(xf + h, fns[f]) - reference(xf - h, fns[f])) / (2 * h);
      check_close(act_grad(static_cast<float>(x), fns[f]), fd, names[f], x, 1e-5);
    }
  }
  // published values: gelu'(1) = 1.0833155, silu'(1) = 0.9276705, relu'(0) = 0 (torch)
  check_close(act_grad(1.f, ActFn::gelu), 1.0833155, "gelu'", 1);
  check_close(act_grad(1.f, ActFn::silu), 0.9276705, "silu'", 1);
  check_close(act_grad(0.f, ActFn::relu), 0.0, "relu'", 0);
  // gated backward: a = act(g) u, dg = dA u act'(g), du = dA act(g)
  for (int f = 0; f < 4; ++f) {
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
  std::printf("test_activation: %d checks passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
