// grouped_expert_ffn_slr on the CPU: the grouped expert FFN over compressed slots. Same frame as the
// dense op (grouped_ffn.cpp: align, gather, slots in parallel or in turn, combine); each slot runs
// sparse_lowrank_linear twice around the activation, so no slot's dense weights are ever formed.
#include <ATen/ATen.h>

#include <string>

#include "ops/ops.h"

namespace mcsmoe::ops {

std::tuple<int64_t, int64_t, int64_t> check_slr_bank(const at::TensorList& bank, const at::Tensor& hidden,
                                                     const char* op, const char* name) {
  TORCH_CHECK(bank.size() == 5, op, ": ", name, " must be [U, V, S_rows, row_idx, row_offsets], got ", bank.size(),
              " tensors");
  const at::Tensor &U = bank[0], &V = bank[1], &S_rows = bank[2], &row_idx = bank[3], &offsets = bank[4];
  TORCH_CHECK(U.dim() == 3 && V.dim() == 3, op, ": ", name, " U must be [S, out, r] and V [S, r, in], got ",
              U.sizes(), " and ", V.sizes());
  const int64_t S = U.size(0), out = U.size(1), in = V.size(2);
  TORCH_CHECK(V.size(0) == S && V.size(1) == U.size(2), op, ": ", name, " U ", U.sizes(), " and V ", V.sizes(),
              " disagree on slots or rank");
  TORCH_CHECK(S_rows.dim() == 2 && S_rows.size(1) == in, op, ": ", name, " S_rows must be [K, ", in, "], got ",
              S_rows.sizes());
  TORCH_CHECK(row_idx.dim() == 1 && row_idx.scalar_type() == at::kLong && row_idx.size(0) == S_rows.size(0), op,
              ": ", name, " row_idx must be int64 [", S_rows.size(0), "], got ", row_idx.scalar_type(), " ",
              row_idx.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.size(0) == S + 1, op, ": ", name,
              " row_offsets must be int64 [S + 1] = [", S + 1, "], got ", offsets.scalar_type(), " ", offsets.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(U.scalar_type() == dt && V.scalar_type() == dt && S_rows.scalar_type() == dt, op, ": ", name,
              " U, V and S_rows must have hidden's dtype ", dt, ", got ", U.scalar_type(), ", ", V.scalar_type(),
              " and ", S_rows.scalar_type());
  for (const auto& t : bank)
    TORCH_CHECK(t.device() == hidden.device(), op, ": ", name, " tensors must be on hidden's device ",
                hidden.device(), ", got one on ", t.device());
  return {S, out, in};
}

// The slot ranges of a bank's kept rows, checked (ascending offsets, distinct rows per slot).
std::vector<int64_t> checked_offsets(const at::TensorList& bank, int64_t S, int64_t out, const char* op,
                                     const char* name) {
  const at::Tensor offsets = bank[4].cpu().contiguous(), row_idx = bank[3].cpu().contiguous();
  std::vector<int64_t> off(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + S + 1);
  TORCH_CHECK(off[0] == 0 && off[S] == row_idx.size(0), op, ": ", name, " row_offsets must start at 0 and end at ",
              row_idx.size(0), ", got ", off[0], " and ", off[S]);
  for (int64_t s = 0; s < S; ++s)  // every offset first: then each slot's rows lie inside row_idx
    TORCH_CHECK(off[s] <= off[s + 1], op, ": ", name, " row_offsets must not decrease, got ", off[s], " then ",
                off[s + 1]);
  std::vector<unsigned char> seen;  // scratch reused by every slot's check
  for (int64_t s = 0; s < S; ++s) {
    check_row_idx_cpu(row_idx.data_ptr<int64_t>() + off[s], off[s + 1] - off[s], out, op, name, s, seen);
  }
  return off;
}

Activation check_grouped_ffn_slr_args(const at::Tensor& hidden, at::TensorList w_in, at::TensorList w_out,
                                      const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                      const at::Tensor& top_k_weights, c10::string_view activation,
                                      const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                      double alpha, double limit) {
  const char* op = "grouped_expert_ffn_slr";
  const Activation act = parse_activation(activation, op, alpha, limit);
  refuse_interleaved(act, op);
  const bool gated = act.gated;
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [T, d], got shape ", hidden.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), op, ": hidden must be floating point, got ",
              hidden.scalar_type());
  const auto [S, F, d_in] = check_slr_bank(w_in, hidden, op, "w_in");
  const auto [S_out, d_out, ff] = check_slr_bank(w_out, hidden, op, "w_out");
  const int64_t d = hidden.size(1);
  TORCH_CHECK(S_out == S, op, ": w_in has ", S, " slots but w_out has ", S_out);
  TORCH_CHECK(d_in == d && d_out == d, op, ": hidden size ", d, " must match w_in's in = ", d_in, " and w_out's out = ",
              d_out);
  TORCH_CHECK(F == (gated ? 2 * ff : ff), op, ": w_in has ", F, " output rows but ", std::string(activation),
              " with w_out's ff = ", ff, " needs ", gated ? 2 * ff : ff);
  check_expert_biases(hidden, S, F, d, hidden.scalar_type(), b_in, b_out, op);
  check_moe_routing(top_k_index, top_k_weights, expert_map, S, op);
  TORCH_CHECK(top_k_index.size(0) == hidden.size(0), op, ": top_k_index has ", top_k_index.size(0),
              " tokens but hidden has ", hidden.size(0));
  TORCH_CHECK(top_k_index.device() == hidden.device(), op, ": top_k_index must be on hidden's device ",
              hidden.device(), ", got ", top_k_index.device());
  return act;
}

// The activation as a contiguous [n, ff]: both of w_out's GEMMs (V and the kept rows) read it, and
// oneDNN copies a strided input (the gate half of h, row stride 2 * ff) on each call. Gated: act(gate)
// in place, then gate * up into a fresh contiguous tensor (measured here, Mixtral-shaped compressed
// slots, one thread: the layer 1-2% faster than with the strided view).
static at::Tensor slot_activation(const at::Tensor& h, Activation act) {
  if (act.clamped()) return expert_activation(h, act).contiguous();  // into the gate half, then copied out
  if (!act.gated) return expert_activation(h, act);
  const int64_t ff = h.size(1) / 2;
  const at::Tensor gate = expert_activation(h.narrow(1, 0, ff), Activation{act.fn, false});
  return at::mul(gate, h.narrow(1, ff, ff));
}

at::Tensor grouped_expert_ffn_slr_cpu(const at::Tensor& hidden_arg, at::TensorList w_in, at::TensorList w_out,
                                      const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                      const at::Tensor& top_k_weights, c10::string_view activation,
                                      const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                      double alpha, double limit) {
  const char* op = "grouped_expert_ffn_slr";
  const Activation act = check_grouped_ffn_slr_args(hidden_arg, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                            activation, b_in, b_out, alpha, limit);
  // The biases ride in the low-rank GEMMs (addmm), as in the dense op.
  const std::optional<at::Tensor> bias_in = b_in ? std::optional(b_in->detach().contiguous()) : std::nullopt;
  const std::optional<at::Tensor> bias_out = b_out ? std::optional(b_out->detach().contiguous()) : std::nullopt;
  auto row = [](const std::optional<at::Tensor>& b, int64_t s) {
    return b ? std::optional<at::Tensor>(b->select(0, s)) : std::nullopt;
  };
  const at::Tensor hidden = hidden_arg.detach();
  const int64_t S = w_in[0].size(0);
  const auto off_in = checked_offsets(w_in, S, w_in[0].size(1), op, "w_in");
  const auto off_out = checked_offsets(w_out, S, w_out[0].size(1), op, "w_out");
  std::vector<at::Tensor> bi, bo;  // detached (an inference op) and contiguous
  for (const auto& t : w_in) bi.push_back(t.detach().contiguous());
  for (const auto& t : w_out) bo.push_back(t.detach().contiguous());
  const std::string shape = std::string("grouped_expert_ffn_slr ") + c10::toString(hidden.scalar_type()) +
                            " d=" + std::to_string(hidden.size(1)) + " F=" + std::to_string(w_in[0].size(1)) +
                            " r=" + std::to_string(w_in[0].size(2));
  return grouped_ffn_cpu_frame(
      hidden, S, expert_map, top_k_index, top_k_weights, shape, [&](int64_t s, int64_t, const at::Tensor& x, at::Tensor y) {
        const int64_t kin = off_in[s + 1] - off_in[s], kout = off_out[s + 1] - off_out[s];
        at::Tensor h = slr_linear_cpu(x, bi[0][s], bi[1][s], bi[2].narrow(0, off_in[s], kin),
                                      bi[3].data_ptr<int64_t>() + off_in[s], row(bias_in, s), std::nullopt);
        at::Tensor a = slot_activation(h, act);
        slr_linear_cpu(a, bo[0][s], bo[1][s], bo[2].narrow(0, off_out[s], kout),
                       bo[3].data_ptr<int64_t>() + off_out[s], row(bias_out, s), y);
      },
      op);
}

}  // namespace mcsmoe::ops
