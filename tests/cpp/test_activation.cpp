// The element-wise expert activations of kernels/activation.h (run by the CUDA gated-activation kernel)
// against double-precision definitions of the same functions (torch's relu, gelu, gelu(tanh), silu,
// which the CPU path runs through ATen), over a sweep of inputs and at published values.
#include <cmath>
#include <cstdio>

#include "kernels/activation.h"

using mcsmoe::moe::act;
using mcsmoe::moe::ActFn;

namespace {

int g_passed = 0, g_failed = 0;

void check_close(double got, double want, const char* what, double x) {
  if (std::fabs(got - want) <= 2e-6 * (1.0 + std::fabs(want))) {
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
  std::printf("test_activation: %d checks passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
