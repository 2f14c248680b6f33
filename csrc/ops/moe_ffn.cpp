// grouped_expert_ffn on the CPU (and the frame the compressed variant shares): align (counting sort by slot), gather each slot's tokens into one
// contiguous block, per slot two GEMMs on contiguous slices (at::mm -> MKL/oneDNN) around the
// activation, then each token sums its slots' rows times the summed routing weights.
//
// Threads: either the slots run in parallel (one GEMM per thread, single-threaded) or the slots run
// one after another and each GEMM uses every thread; see use_slot_parallelism. MCSMOE_SLOT_PARALLEL=0/1 forces one or the other (for measurements).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "ops/ops.h"
#include "ops/slot_parallel.h"

namespace mcsmoe::ops {

Activation parse_activation(c10::string_view name, const char* op, double alpha, double limit) {
  using moe::ActFn;
  static const std::pair<const char*, Activation> known[] = {
      {"relu", {ActFn::relu, false}},        {"gelu", {ActFn::gelu, false}},  {"gelu_tanh", {ActFn::gelu_tanh, false}},
      {"silu", {ActFn::silu, false}},        {"reglu", {ActFn::relu, true}},  {"geglu", {ActFn::gelu, true}},
      {"geglu_tanh", {ActFn::gelu_tanh, true}}, {"swiglu", {ActFn::silu, true}},
      {"clamped_swiglu", {ActFn::clamped_swiglu, true}}};
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
                    "'; expected relu, gelu, gelu_tanh, silu, reglu, geglu, geglu_tanh, swiglu or clamped_swiglu");
}

void check_expert_biases(const at::Tensor& hidden, int64_t S, int64_t F, int64_t d, at::ScalarType dtype,
                         const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out, const char* op) {
  const std::pair<const char*, const std::optional<at::Tensor>*> biases[] = {{"b_in", &b_in}, {"b_out", &b_out}};
  for (const auto& [name, bias] : biases) {
    if (!bias->has_value()) continue;
    const at::Tensor& b = **bias;
    const bool is_in = name[2] == 'i';
    const int64_t cols = is_in ? F : d;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == S && b.size(1) == cols, op, ": ", name, " must be ",
                is_in ? "[S, F]" : "[S, d]", " = [", S, ", ", cols, "] (one row per slot), got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, op, ": ", name, " must have the weights' dtype ", dtype, ", got ",
                b.scalar_type());
    TORCH_CHECK(b.device() == hidden.device(), op, ": ", name, " must be on hidden's device ", hidden.device(),
                ", got ", b.device());
  }
}

Activation check_grouped_ffn_args(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                  const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                  const at::Tensor& top_k_weights, c10::string_view activation,
                                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                  double alpha, double limit) {
  const char* op = "grouped_expert_ffn";
  const Activation act = parse_activation(activation, op, alpha, limit);
  const bool gated = act.gated;
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [T, d], got shape ", hidden.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), op, ": hidden must be floating point, got ",
              hidden.scalar_type());
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3, op, ": w_in must be [S, F, d] and w_out [S, d, ff], got shapes ",
              w_in.sizes(), " and ", w_out.sizes());
  TORCH_CHECK(w_in.scalar_type() == hidden.scalar_type() && w_out.scalar_type() == hidden.scalar_type(), op,
              ": hidden, w_in and w_out must have one dtype, got ", hidden.scalar_type(), ", ", w_in.scalar_type(),
              " and ", w_out.scalar_type());
  TORCH_CHECK(w_in.device() == hidden.device() && w_out.device() == hidden.device() &&
                  top_k_index.device() == hidden.device(),
              op, ": all tensors must be on one device, got hidden on ", hidden.device(), ", w_in on ", w_in.device(),
              ", w_out on ", w_out.device(), ", top_k_index on ", top_k_index.device());
  const int64_t S = w_in.size(0), F = w_in.size(1), d = hidden.size(1), ff = w_out.size(2);
  TORCH_CHECK(w_out.size(0) == S, op, ": w_in and w_out must have the same number of slots, got ", S, " and ",
              w_out.size(0));
  TORCH_CHECK(w_in.size(2) == d && w_out.size(1) == d, op, ": hidden size ", d, " must match w_in [S, F, d] ",
              w_in.sizes(), " and w_out [S, d, ff] ", w_out.sizes());
  TORCH_CHECK(F == (gated ? 2 * ff : ff), op, ": w_in has F = ", F, " rows but ", std::string(activation),
              " with w_out's ff = ", ff, " needs F = ", gated ? 2 * ff : ff, gated ? " (gate rows, then up rows)" : "");
  check_moe_routing(top_k_index, top_k_weights, expert_map, S, op);
  TORCH_CHECK(top_k_index.size(0) == hidden.size(0), op, ": top_k_index has ", top_k_index.size(0),
              " tokens but hidden has ", hidden.size(0));
  check_expert_biases(hidden, w_in.size(0), w_in.size(1), w_out.size(1), w_in.scalar_type(), b_in, b_out, op);
  return act;
}

static at::Tensor act_(at::Tensor x, moe::ActFn fn) {  // in place
  switch (fn) {
    case moe::ActFn::relu: return at::relu_(x);
    case moe::ActFn::gelu: return at::gelu_(x, "none");
    case moe::ActFn::gelu_tanh: return at::gelu_(x, "tanh");
    default: return at::silu_(x);
  }
}

template <typename scalar_t>
static void clamped_swiglu_rows(scalar_t* h, int64_t ldh, int64_t n, int64_t ff, double alpha, double limit) {
  using opmath_t = at::opmath_type<scalar_t>;  // float for float16/bfloat16, as torch computes them
  const auto a = static_cast<opmath_t>(alpha), l = static_cast<opmath_t>(limit);
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(ff, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gate = h + r * ldh;
      const scalar_t* up = gate + ff;
      for (int64_t j = 0; j < ff; ++j)
        gate[j] = static_cast<scalar_t>(moe::clamped_swiglu<opmath_t>(gate[j], up[j], a, l));
    }
  });
}

at::Tensor clamped_swiglu_cpu_(const at::Tensor& h, double alpha, double limit) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 2 && h.size(1) % 2 == 0 && (h.size(1) == 0 || h.stride(1) == 1),
              "clamped_swiglu_cpu_: expected a CPU [n, 2 ff] tensor with contiguous rows, got ", h.sizes());
  const int64_t n = h.size(0), ff = h.size(1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "clamped_swiglu", [&] {
    clamped_swiglu_rows<scalar_t>(h.data_ptr<scalar_t>(), h.stride(0), n, ff, alpha, limit);
  });
  return h.narrow(1, 0, ff);
}

at::Tensor expert_activation(const at::Tensor& h, Activation act) {
  if (act.clamped()) return clamped_swiglu_cpu_(h, act.alpha, act.limit);
  if (!act.gated) return act_(h, act.fn);
  const int64_t ff = h.size(1) / 2;
  at::Tensor gate = h.narrow(1, 0, ff);  // in place: the GEMM reads it with row stride 2*ff
  return act_(gate, act.fn).mul_(h.narrow(1, ff, ff));
}

template <typename scalar_t, typename acc_t>
static void combine_rows(const scalar_t* y, const acc_t* weights, const int64_t* token_rows, int64_t T, int64_t k,
                         int64_t d, scalar_t* out) {
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = token_rows[t * k + j];
        if (row < 0) break;
        const acc_t w = weights[row];
        const scalar_t* yr = y + row * d;
        for (int64_t x = 0; x < d; ++x) acc[x] += static_cast<acc_t>(yr[x]) * w;
      }
      for (int64_t x = 0; x < d; ++x) out[t * d + x] = static_cast<scalar_t>(acc[x]);
    }
  });
}

SingleThreadIf::SingleThreadIf(bool on) {
#ifdef _OPENMP
  if (on && omp_get_max_threads() > 1) {
    saved_ = omp_get_max_threads();
    omp_set_num_threads(1);
  }
#endif
}

SingleThreadIf::~SingleThreadIf() {
#ifdef _OPENMP
  if (saved_ > 0) omp_set_num_threads(saved_);
#endif
}

at::Tensor grouped_ffn_cpu_frame(const at::Tensor& hidden, int64_t S, const at::Tensor& expert_map,
                                 const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                 const SlotFfn& ffn) {
  TORCH_CHECK(hidden.device().is_cpu(), "grouped_expert_ffn: expected CPU tensors, got ", hidden.device());
  const int64_t T = hidden.size(0), d = hidden.size(1), k = top_k_index.size(1);
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto aligned = moe_align_cpu_impl(top_k_index, top_k_weights, expert_map, S, acc);
  const at::Tensor &sorted_tokens = aligned[0], &offsets = aligned[1], &weights = aligned[2], &rows = aligned[3];
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0) return at::zeros_like(hidden, at::MemoryFormat::Contiguous);

  const at::Tensor x = hidden.index_select(0, sorted_tokens.narrow(0, 0, pairs));  // [pairs, d] by slot
  at::Tensor y = at::empty({pairs, d}, hidden.options());
  // Rows in even blocks of at most kRowBlock bound the [rows, F] intermediate (29 MB for Mixtral's
  // F = 7168). Measured here, Mixtral-shaped, 1608 rows: blocks of 1024 or more run at full speed,
  // 512-row blocks cost 5-8% on the first GEMM, and a small remainder block costs more again.
  constexpr int64_t kRowBlock = 1024;
  auto run_slot = [&](int64_t s) {
    const int64_t slot_rows = off[s + 1] - off[s];
    const int64_t blocks = (slot_rows + kRowBlock - 1) / kRowBlock;
    const int64_t block = blocks > 0 ? (slot_rows + blocks - 1) / blocks : 0;
    for (int64_t r = off[s]; r < off[s + 1]; r += block) {
      const int64_t n = std::min(block, off[s + 1] - r);
      ffn(s, x.narrow(0, r, n), y.narrow(0, r, n));
    }
  };

  std::vector<int64_t> slot_rows(S);
  for (int64_t s = 0; s < S; ++s) slot_rows[s] = off[s + 1] - off[s];
  for_each_slot(slot_rows, run_slot);

  at::Tensor out = at::empty({T, d}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "grouped_expert_ffn_combine", [&] {
    if (acc == at::kDouble) {
      combine_rows<scalar_t, double>(y.data_ptr<scalar_t>(), weights.data_ptr<double>(), rows.data_ptr<int64_t>(), T,
                                     k, d, out.data_ptr<scalar_t>());
    } else {
      combine_rows<scalar_t, float>(y.data_ptr<scalar_t>(), weights.data_ptr<float>(), rows.data_ptr<int64_t>(), T, k,
                                    d, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

at::Tensor grouped_expert_ffn_cpu(const at::Tensor& hidden_arg, const at::Tensor& w_in_arg,
                                  const at::Tensor& w_out_arg, const at::Tensor& expert_map,
                                  const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                  c10::string_view activation, const std::optional<at::Tensor>& b_in_arg,
                                  const std::optional<at::Tensor>& b_out_arg, double alpha, double limit) {
  // Detached: the inner GEMMs neither record nor refuse autograd (the op's backward is its own op,
  // grouped_expert_ffn_backward, registered as its autograd in ops.py).
  const at::Tensor hidden = hidden_arg.detach(), w_in = w_in_arg.detach(), w_out = w_out_arg.detach();
  const Activation act = check_grouped_ffn_args(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                                activation, b_in_arg, b_out_arg, alpha, limit);
  // The biases ride in the slot's GEMMs (addmm / oneDNN's bias): no extra pass over the rows.
  const std::optional<at::Tensor> b_in = b_in_arg ? std::optional(b_in_arg->detach()) : std::nullopt;
  const std::optional<at::Tensor> b_out = b_out_arg ? std::optional(b_out_arg->detach()) : std::nullopt;
  auto row = [](const std::optional<at::Tensor>& b, int64_t s) {
    return b ? std::optional<at::Tensor>(b->select(0, s)) : std::nullopt;
  };
  const SingleThreadIf small(top_k_index.numel() * (w_in.size(1) + w_out.size(2)) * hidden.size(1) < kSmallCallMacs);
  return grouped_ffn_cpu_frame(hidden, w_in.size(0), expert_map, top_k_index, top_k_weights,
                               [&](int64_t s, const at::Tensor& x, at::Tensor y) {
                                 at::Tensor h = linear_nt(x, w_in.select(0, s), std::nullopt, row(b_in, s));
                                 linear_nt(expert_activation(h, act), w_out.select(0, s), y, row(b_out, s));
                               });
}

}  // namespace mcsmoe::ops
