// The GEMMs every CPU op here runs: linear_nt (x [n, K] times w [N, K] transposed, plus bias [N]) and gemm /
// gemm_into (a [M, K] times b [K, N], any strides: the backward's products).
//
// Backends, chosen per shape class by measurement (autotune.h, decision "gemm"; MCSMOE_GEMM=aten|onednn|fp32
// pins one):
//   aten    at::mm / at::addmm (MKL for float32; for bfloat16/float16 oneDNN where the CPU has native bf16
//           (AVX-512 BF16, AMX), else ATen's own blocked loop: measured on a 2-core AVX2 EPYC, a 512 x 768 by
//           768 x 3072 bf16 product takes 630 ms there against 99 ms in fp32);
//   onednn  torch's oneDNN linear (mkldnn::_linear_pointwise), for the dtypes it takes on this CPU (probed
//           once: bf16 needs AVX-512 BF16 or AMX): measured (Zen 4, fp32) 1.1-1.7x faster than at::mm on every
//           expert GEMM shape of the benchmarks, most at small row counts;
//   fp32    bfloat16/float16 only: both operands converted to float32, at::mm's float32 GEMM (MKL; not oneDNN,
//           whose shape cap below would make the rounding depend on what the process ran first), the result
//           rounded once (4x faster than aten on that AVX2 EPYC).
// All accumulate in float32 (float64 for float64); they differ only in rounding. The default without
// timing (MCSMOE_AUTOTUNE=0, torch.use_deterministic_algorithms(True)) is at::mm: oneDNN may run only the first
// shapes a process sees (memory, below), and a default that depended on what a process ran before would make a
// resumed run round otherwise than the uninterrupted one. Products below kTuneMinMacs are not timed (at::mm).
// A weight stored transposed (w [N, K] a view of a [K, N] bank, as GPT-OSS and Llama-4 store their experts) is
// its own shape class ("wT"): oneDNN reorders such a weight on every call (measured,
// GPT-OSS's 2880 x 5760 banks at 16-1024 tokens on a 2-core AVX2 EPYC: 1.2-1.5x slower than at::mm, which
// reads the transposed bank as it is).
// Memory: oneDNN keeps what it built for every distinct product shape (a primitive and its JIT kernels: ~0.55 MB
// each, measured for float32 on a 2-core AVX2 EPYC) in its primitive cache, up to 1024 of them. Routed experts see
// another row count on almost every call, so a process grew by ~750 MB (float32, 1792 x 512 weight, row counts
// 1..1000) and a streamed prune under a 100 MB budget peaked 100-150 MiB higher than with at::mm. So at most
// kOneDnnShapes distinct shapes per process (MCSMOE_ONEDNN_SHAPES sets it; 0: never) run through oneDNN, the first
// ones seen; a new shape past that runs at::mm (the same product, MKL's rounding).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/core/stack.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "ops/autotune.h"
#include "ops/ops.h"

namespace mcsmoe::ops {
namespace {

constexpr int64_t kTuneMinMacs = int64_t{1} << 18;
constexpr int64_t kOneDnnShapes = 32;

// Whether oneDNN may run this product: its shape was run through oneDNN before (its primitive is cached), or fewer
// than MCSMOE_ONEDNN_SHAPES (default kOneDnnShapes) shapes were (see the top of this file). record: it will run
// now, so a new shape takes a place.
bool onednn_admits(const at::Tensor& x, const at::Tensor& w, bool bias, bool record) {
  using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool>;
  static std::mutex mutex;
  static std::set<Shape> seen;
  static const int64_t cap = [] {
    const char* env = std::getenv("MCSMOE_ONEDNN_SHAPES");
    if (env == nullptr || env[0] == '\0') return kOneDnnShapes;
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && n >= 0, "MCSMOE_ONEDNN_SHAPES=", env,
                      " is not a count; expected a whole number >= 0 (the distinct product shapes oneDNN may run)");
    return static_cast<int64_t>(n);
  }();
  const Shape shape{x.size(0), x.size(1), x.stride(0), w.size(0), w.stride(0), w.stride(1),
                    static_cast<int>(x.scalar_type()), bias};
  std::lock_guard<std::mutex> lock(mutex);
  if (seen.count(shape)) return true;
  if (static_cast<int64_t>(seen.size()) >= cap) return false;
  if (record) seen.insert(shape);
  return true;
}

const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

at::Tensor onednn_nt(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  c10::List<std::optional<at::Scalar>> scalars;
  scalars.push_back(std::nullopt);
  c10::IValue b = bias ? c10::IValue(bias->contiguous()) : c10::IValue();
  torch::jit::Stack stack{x, w, b, std::string("none"), scalars, c10::IValue()};
  onednn_linear()->callBoxed(&stack);
  return stack[0].toTensor();
}

// Whether oneDNN's linear takes this dtype on this CPU: float32 always (when torch has it); bfloat16 and
// float16 probed once with a small product (oneDNN refuses them without native support); float64 never.
// A refusal seen later (a shape the probe's did not show) turns the dtype off for good (onednn_refused).
std::atomic<int>& onednn_known(at::ScalarType dt) {
  static std::atomic<int> known[2] = {-1, -1};
  return known[dt == at::kHalf];
}

void onednn_refused(at::ScalarType dt) { onednn_known(dt).store(0); }

bool onednn_takes(at::ScalarType dt) {
  if (!onednn_linear()) return false;
  if (dt == at::kFloat) return true;
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  std::atomic<int>& k = onednn_known(dt);
  if (k.load() < 0) {
    bool ok = true;
    try {
      const auto o = at::TensorOptions().dtype(dt);
      onednn_nt(at::ones({4, 16}, o), at::ones({8, 16}, o), std::nullopt);
    } catch (const std::exception&) {
      ok = false;
    }
    k.store(ok ? 1 : 0);
  }
  return k.load() == 1;
}

bool half_type(at::ScalarType dt) { return dt == at::kBFloat16 || dt == at::kHalf; }

at::Tensor aten_nt(const at::Tensor& x, const at::Tensor& w, std::optional<at::Tensor> out,
                   const std::optional<at::Tensor>& bias) {
  if (bias) return out ? at::addmm_out(*out, *bias, x, w.t()) : at::addmm(*bias, x, w.t());
  return out ? at::mm_out(*out, x, w.t()) : at::mm(x, w.t());
}

// w [N, K] a transposed view of a [K, N] bank: oneDNN would reorder it on every call (see the top of this file).
bool stored_transposed(const at::Tensor& w) { return w.size(1) > 1 && w.stride(1) != 1; }

std::string gemm_shape(const char* form, at::ScalarType dt, int64_t M, int64_t N, int64_t K, bool bias,
                       bool w_transposed = false) {
  return std::string(form) + " " + c10::toString(dt) + " M<=" + std::to_string(autotune::bucket(M)) +
         " N=" + std::to_string(N) + " K=" + std::to_string(K) + (bias ? " bias" : "") + (w_transposed ? " wT" : "") +
         (at::in_parallel_region() ? " in_parallel" : "");
}

}  // namespace

at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w, std::optional<at::Tensor> out,
                     const std::optional<at::Tensor>& bias) {
  const auto dt = x.scalar_type();
  if (!x.device().is_cpu() || x.numel() == 0 || w.numel() == 0) return aten_nt(x, w, out, bias);
  const int64_t macs = x.size(0) * w.size(0) * w.size(1);
  const bool onednn = onednn_takes(dt) && onednn_admits(x, w, bias.has_value(), false);
  const uint32_t available = 1u | (onednn ? 2u : 0u) | (half_type(dt) ? 4u : 0u);
  const bool w_transposed = stored_transposed(w);
  const bool measure = macs >= kTuneMinMacs;
  autotune::Choice choice(
      autotune::kGemm,
      measure ? gemm_shape("nt", dt, x.size(0), w.size(0), w.size(1), bias.has_value(), w_transposed) : "", 0,
      available, measure);
  switch (choice.index) {
    case 1: {
      at::Tensor result;
      onednn_admits(x, w, bias.has_value(), true);
      try {
        result = onednn_nt(x, w, bias);
      } catch (const std::exception&) {  // oneDNN refused this dtype after all: never again, at::mm now
        if (dt == at::kFloat) throw;
        onednn_refused(dt);
        return aten_nt(x, w, out, bias);
      }
      return out ? out->copy_(result) : result;
    }
    case 2: {
      const at::Tensor result = aten_nt(x.to(at::kFloat), w.to(at::kFloat), std::nullopt,
                                        bias ? std::optional(bias->to(at::kFloat)) : std::nullopt);
      return out ? out->copy_(result) : result.to(dt);
    }
    default:
      return aten_nt(x, w, out, bias);
  }
}

void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const auto dt = a.scalar_type();
  const int64_t macs = a.size(0) * a.size(1) * b.size(1);
  const bool choose = half_type(dt) && a.device().is_cpu() && macs > 0;
  const bool measure = choose && macs >= kTuneMinMacs;
  autotune::Choice choice(autotune::kGemm, measure ? gemm_shape("nn", dt, a.size(0), b.size(1), a.size(1), false) : "",
                          0, choose ? 0b101u : 1u, measure);
  if (choice.index == 2) {
    const at::Tensor result = at::mm(a.to(at::kFloat), b.to(at::kFloat));
    if (accumulate) {
      out.copy_(out.to(at::kFloat).add_(result));  // one rounding of the sum, as addmm_ in float32 then rounded
    } else {
      out.copy_(result);
    }
    return;
  }
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b, false);
  return out;
}

}  // namespace mcsmoe::ops
