// grouped_expert_ffn on the CPU, and the frame the compressed variant (grouped_ffn_slr.cpp) shares: align
// (counting sort by slot), gather each slot's tokens into one contiguous block, per slot two GEMMs on
// contiguous slices (linear_nt -> oneDNN/MKL) around the activation, then each token sums its slots' rows
// times the summed routing weights (kernels/grouped_ffn.h's combine, which the backward shares).
//
// Threads: the slots one after another with threaded GEMMs, whole slots in parallel, or every thread the
// same number of rows (a slot's rows may be cut between threads); single-threaded GEMMs in the last two. See
// schedule_slots (slot_parallel.h); MCSMOE_SLOT_PARALLEL=sequential/parallel/balanced pins one.
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/grouped_ffn.h"
#include "ops/ops.h"
#include "ops/slot_parallel.h"

namespace mcsmoe::ops {

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
              " with w_out's ff = ", ff, " needs F = ", gated ? 2 * ff : ff,
              gated ? (act.interleaved ? " (gate and up rows interleaved)" : " (gate rows, then up rows)") : "");
  check_moe_routing(top_k_index, top_k_weights, expert_map, S, op);
  TORCH_CHECK(top_k_index.size(0) == hidden.size(0), op, ": top_k_index has ", top_k_index.size(0),
              " tokens but hidden has ", hidden.size(0));
  check_expert_biases(hidden, w_in.size(0), w_in.size(1), w_out.size(1), w_in.scalar_type(), b_in, b_out, op);
  return act;
}

at::Tensor combine_token_rows_cpu(const at::Tensor& rows, const at::Tensor& token_rows,
                                  const std::optional<at::Tensor>& weights) {
  const int64_t T = token_rows.size(0), k = token_rows.size(1), d = rows.size(1);
  at::Tensor out = at::empty({T, d}, rows.options());
  const int64_t* tr = token_rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "grouped_expert_ffn_combine", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* y = rows.data_ptr<scalar_t>();
    const acc_t* w = weights ? weights->data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
      moe::combine_token_rows<scalar_t, acc_t>(y, w, tr, begin, end, k, d, o);
    });
  });
  return out;
}

at::Tensor grouped_ffn_cpu_frame(const at::Tensor& hidden, int64_t S, const at::Tensor& expert_map,
                                 const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                 const std::string& shape, const SlotFfn& ffn, const char* op) {
  TORCH_CHECK(hidden.device().is_cpu(), op, ": expected CPU tensors, got ", hidden.device());
  const int64_t d = hidden.size(1);
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto aligned = moe_align_cpu_impl(top_k_index, top_k_weights, expert_map, S, acc, op);
  const at::Tensor &sorted_tokens = aligned[0], &offsets = aligned[1], &weights = aligned[2], &rows = aligned[3];
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0) return at::zeros_like(hidden, at::MemoryFormat::Contiguous);

  const at::Tensor x = hidden.index_select(0, sorted_tokens.narrow(0, 0, pairs));  // [pairs, d] by slot
  at::Tensor y = at::empty({pairs, d}, hidden.options());
  schedule_slots(rows_per_slot(off, S), shape, /*splittable=*/true, [&](int64_t s, int64_t begin, int64_t end) {
    for_each_row_block(off[s] + begin, off[s] + end,
                       [&](int64_t r, int64_t n) { ffn(s, r, x.narrow(0, r, n), y.narrow(0, r, n)); });
  });
  return combine_token_rows_cpu(y, rows, weights);
}

namespace {

// The forward; with keep_h also H (see grouped_expert_ffn_keep_h_cpu): each block's GEMM writes its rows of H, the
// activation (in place) then runs on a copy.
std::tuple<at::Tensor, at::Tensor> grouped_ffn(const at::Tensor& hidden_arg, const at::Tensor& w_in_arg,
                                               const at::Tensor& w_out_arg, const at::Tensor& expert_map,
                                               const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                               c10::string_view activation, const std::optional<at::Tensor>& b_in_arg,
                                               const std::optional<at::Tensor>& b_out_arg, double alpha, double limit,
                                               bool keep_h) {
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
  const std::string shape = std::string("grouped_expert_ffn ") + c10::toString(hidden.scalar_type()) +
                            " d=" + std::to_string(hidden.size(1)) + " F=" + std::to_string(w_in.size(1));
  const at::Tensor h_rows = keep_h ? at::zeros({top_k_index.numel(), w_in.size(1)}, hidden.options()) : at::Tensor();
  at::Tensor out = grouped_ffn_cpu_frame(
      hidden, w_in.size(0), expert_map, top_k_index, top_k_weights, shape,
      [&](int64_t s, int64_t r, const at::Tensor& x, at::Tensor y) {
        const auto h_out = keep_h ? std::optional(h_rows.narrow(0, r, x.size(0))) : std::nullopt;
        at::Tensor h = linear_nt(x, w_in.select(0, s), h_out, row(b_in, s));
        linear_nt(expert_activation(keep_h ? h.clone() : h, act), w_out.select(0, s), y, row(b_out, s));
      },
      "grouped_expert_ffn");
  return {out, h_rows};
}

}  // namespace

at::Tensor grouped_expert_ffn_cpu(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                                  const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                  const at::Tensor& top_k_weights, c10::string_view activation,
                                  const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                  double alpha, double limit) {
  return std::get<0>(grouped_ffn(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in,
                                 b_out, alpha, limit, /*keep_h=*/false));
}

std::tuple<at::Tensor, at::Tensor> grouped_expert_ffn_keep_h_cpu(
    const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& expert_map,
    const at::Tensor& top_k_index, const at::Tensor& top_k_weights, c10::string_view activation,
    const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out, double alpha, double limit) {
  return grouped_ffn(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation, b_in, b_out, alpha,
                     limit, /*keep_h=*/true);
}

}  // namespace mcsmoe::ops
