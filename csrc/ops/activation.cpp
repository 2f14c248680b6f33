// The expert activations on the CPU (and, for the ungated ones, on any device through ATen): the name an op
// takes parsed into an Activation, and the activation applied in place (mcsmoe_fast/activations.py; the
// CUDA ops run kernels/activation.h's element-wise forms instead). Shared by every grouped FFN op.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "ops/ops.h"

namespace mcsmoe::ops {

Activation parse_activation(c10::string_view name, const char* op, double alpha, double limit) {
  using moe::ActFn;
  static const std::pair<const char*, Activation> known[] = {
      {"relu", {ActFn::relu, false}},        {"gelu", {ActFn::gelu, false}},  {"gelu_tanh", {ActFn::gelu_tanh, false}},
      {"silu", {ActFn::silu, false}},        {"reglu", {ActFn::relu, true}},  {"geglu", {ActFn::gelu, true}},
      {"geglu_tanh", {ActFn::gelu_tanh, true}}, {"swiglu", {ActFn::silu, true}},
      {"clamped_swiglu", {ActFn::clamped_swiglu, true}}, {"relu2", {ActFn::relu2, false}},
      {"clamped_swiglu_interleaved", {ActFn::clamped_swiglu, true, 1.702, 7.0, true}}};
  for (auto [n, a] : known) {
    if (name != n) continue;
    if (a.clamped()) {
      // clamp(up, -limit, limit) needs -limit <= limit; NaN fails both checks
      TORCH_CHECK_VALUE(limit >= 0 && std::isfinite(limit), op, ": clamped_swiglu needs a finite limit >= 0, got ",
                        limit);
      TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": clamped_swiglu needs a finite alpha, got ", alpha);
    }
    a.alpha = alpha;
    a.limit = limit;
    return a;
  }
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", std::string(name),
                    "'; expected relu, relu2, gelu, gelu_tanh, silu, reglu, geglu, geglu_tanh, swiglu, clamped_swiglu or "
                    "clamped_swiglu_interleaved");
}

void refuse_interleaved(const Activation& act, const char* op) {
  TORCH_CHECK_VALUE(!act.interleaved, op, ": clamped_swiglu_interleaved (GPT-OSS's stored gate/up order) runs in "
                    "grouped_expert_ffn on the CPU only (forward and backward); use clamped_swiglu with gate rows, "
                    "then up rows");
}

static at::Tensor act_(at::Tensor x, moe::ActFn fn) {  // in place
  switch (fn) {
    case moe::ActFn::relu: return at::relu_(x);
    case moe::ActFn::relu2: return at::relu_(x).square_();  // rounded after each step, as transformers' relu2
    case moe::ActFn::gelu: return at::gelu_(x, "none");
    case moe::ActFn::gelu_tanh: return at::gelu_(x, "tanh");
    default: return at::silu_(x);
  }
}

// Row r's gate j at h[r, j * step] and up j at h[r, j * step + up_at] (gate_up_layout). The result goes to h[r, j],
// read before written (j <= j * step).
template <typename scalar_t>
static void clamped_swiglu_rows(scalar_t* h, int64_t ldh, int64_t n, int64_t ff, int64_t step, int64_t up_at,
                                double alpha, double limit) {
  using opmath_t = at::opmath_type<scalar_t>;  // float for float16/bfloat16, as torch computes them
  const auto a = static_cast<opmath_t>(alpha), l = static_cast<opmath_t>(limit);
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(ff, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = h + r * ldh;
      for (int64_t j = 0; j < ff; ++j)
        row[j] = static_cast<scalar_t>(moe::clamped_swiglu<opmath_t>(row[j * step], row[j * step + up_at], a, l));
    }
  });
}

at::Tensor clamped_swiglu_cpu_(const at::Tensor& h, double alpha, double limit, bool interleaved) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 2 && h.size(1) % 2 == 0 && (h.size(1) == 0 || h.stride(1) == 1),
              "clamped_swiglu_cpu_: expected a CPU [n, 2 ff] tensor with contiguous rows, got ", h.sizes());
  const int64_t n = h.size(0), ff = h.size(1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "clamped_swiglu", [&] {
    const GateUpLayout layout = gate_up_layout(interleaved, ff);
    clamped_swiglu_rows<scalar_t>(h.data_ptr<scalar_t>(), h.stride(0), n, ff, layout.step, layout.up_at, alpha, limit);
  });
  return h.narrow(1, 0, ff);
}

at::Tensor expert_activation(const at::Tensor& h, Activation act) {
  if (act.clamped()) return clamped_swiglu_cpu_(h, act.alpha, act.limit, act.interleaved);
  if (!act.gated) return act_(h, act.fn);
  const int64_t ff = h.size(1) / 2;
  at::Tensor gate = h.narrow(1, 0, ff);  // in place: the GEMM reads it with row stride 2*ff
  return act_(gate, act.fn).mul_(h.narrow(1, ff, ff));
}

}  // namespace mcsmoe::ops
