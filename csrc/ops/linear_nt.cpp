// x [n, K] times w [N, K] transposed (plus bias [N]): the GEMM every CPU op here runs.
//
// float32 goes to torch's oneDNN linear (mkldnn::_linear_pointwise) when this torch build has it:
// measured here (Zen 4, fp32) 1.1-1.7x faster than at::mm, which runs MKL, on every expert GEMM shape
// of the benchmarks, most at small row counts; it returns a fresh tensor (copied into `out` when one is
// given). Other dtypes, builds without oneDNN and empty operands (which oneDNN rejects: zero-width
// experts) use at::mm / at::addmm, and so do small products (below kOneDnnMinMacs multiply-adds), where
// oneDNN's ~10-20 us call overhead dominates: measured here, a 1 x 768 by 768 x 32 product takes 19 us
// through oneDNN and 4 us through at::mm (the low-rank factors of compressed experts at decode).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <string>

#include "ops/ops.h"

namespace mcsmoe::ops {

at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w, std::optional<at::Tensor> out,
                     const std::optional<at::Tensor>& bias) {
  static const std::optional<c10::OperatorHandle> onednn =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  constexpr int64_t kOneDnnMinMacs = int64_t{1} << 21;
  if (onednn && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.numel() > 0 && w.numel() > 0 &&
      x.size(0) * w.size(0) * w.size(1) >= kOneDnnMinMacs) {
    c10::List<std::optional<at::Scalar>> scalars;
    scalars.push_back(std::nullopt);
    c10::IValue b = bias ? c10::IValue(bias->contiguous()) : c10::IValue();
    torch::jit::Stack stack{x, w, b, std::string("none"), scalars, c10::IValue()};
    onednn->callBoxed(&stack);
    at::Tensor result = stack[0].toTensor();
    return out ? out->copy_(result) : result;
  }
  if (bias) return out ? at::addmm_out(*out, *bias, x, w.t()) : at::addmm(*bias, x, w.t());
  return out ? at::mm_out(*out, x, w.t()) : at::mm(x, w.t());
}

}  // namespace mcsmoe::ops
