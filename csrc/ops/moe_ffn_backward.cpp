// grouped_expert_ffn_backward on the CPU: the gradients of the grouped expert FFN (moe_ffn.cpp) with the
// same routing frame: align (counting sort by slot), gather each slot's tokens and output gradients into
// contiguous rows, then per slot s with routed rows X [n, d], summed weights w [n] and gradients G [n, d]:
//   H = X W_in[s]^T (recomputed; the forward keeps nothing), A = act(H), P = G W_out[s]   [n, ff]
//   grad of each routing weight = <G_t, y_t> = <P_t, A_t>   (y = A W_out[s]^T is never formed)
//   grad_W_out[s] = G^T (w A)      dA = w P      dH = act'(H) applied to dA
//   grad_W_in[s] = dH^T X          dX = dH W_in[s]  (rows; summed per token after all slots: deterministic)
// GEMMs through ATen (MKL/oneDNN), the activation and its derivative through ATen's vectorized ops, slots in
// parallel or one after another with threaded GEMMs (the forward's rule). Outputs left out by output_mask
// are not computed and come back as empty tensors [0].
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "ops/ops.h"
#include "ops/slot_parallel.h"

namespace mcsmoe::ops {

Activation check_grouped_ffn_backward_args(const at::Tensor& grad_out, const at::Tensor& hidden,
                                           const at::Tensor& w_in, const at::Tensor& w_out,
                                           const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                           const at::Tensor& top_k_weights, c10::string_view activation) {
  const Activation act = check_grouped_ffn_args(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights, activation);
  const char* op = "grouped_expert_ffn_backward";
  TORCH_CHECK(grad_out.sizes() == hidden.sizes(), op, ": grad_out must have hidden's shape ", hidden.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == hidden.scalar_type(), op, ": grad_out must have hidden's dtype ",
              hidden.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == hidden.device(), op, ": grad_out must be on hidden's device ", hidden.device(),
              ", got ", grad_out.device());
  return act;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_ffn_grads(
    const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& top_k_weights,
    std::array<bool, 4> mask) {
  auto grad = [](bool need, const at::Tensor& like) {
    return need ? at::zeros_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, like.options());
  };
  return {grad(mask[0], hidden), grad(mask[1], w_in), grad(mask[2], w_out), grad(mask[3], top_k_weights)};
}

namespace {

at::Tensor act_fn(const at::Tensor& x, moe::ActFn fn) {
  switch (fn) {
    case moe::ActFn::relu: return at::relu(x);
    case moe::ActFn::gelu: return at::gelu(x, "none");
    case moe::ActFn::gelu_tanh: return at::gelu(x, "tanh");
    default: return at::silu(x);
  }
}

// out = grad * act'(x), element-wise; out may be x itself.
void act_backward_out(at::Tensor out, const at::Tensor& grad, const at::Tensor& x, moe::ActFn fn) {
  switch (fn) {
    case moe::ActFn::relu: at::threshold_backward_out(out, grad, x, 0); break;
    case moe::ActFn::gelu: at::gelu_backward_out(out, grad, x, "none"); break;
    case moe::ActFn::gelu_tanh: at::gelu_backward_out(out, grad, x, "tanh"); break;
    default: at::silu_backward_out(out, grad, x); break;
  }
}

// out[t] = sum of rows[token_rows[t, j]] over j (until -1): each token's gradient from its slots' rows.
template <typename scalar_t, typename acc_t>
void sum_token_rows(const scalar_t* rows, const int64_t* token_rows, int64_t T, int64_t k, int64_t d, scalar_t* out) {
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = token_rows[t * k + j];
        if (row < 0) break;
        const scalar_t* r = rows + row * d;
        for (int64_t x = 0; x < d; ++x) acc[x] += static_cast<acc_t>(r[x]);
      }
      for (int64_t x = 0; x < d; ++x) out[t * d + x] = static_cast<scalar_t>(acc[x]);
    }
  });
}

}  // namespace

void routing_weight_grads_cpu(const at::Tensor& top_k_index, const at::Tensor& expert_map, const at::Tensor& offsets,
                              const at::Tensor& token_rows, const at::Tensor& row_grads, at::Tensor out) {
  const int64_t T = top_k_index.size(0), k = top_k_index.size(1);
  const at::Tensor idx = top_k_index.contiguous(), map = expert_map.contiguous();
  const int64_t *ip = idx.data_ptr<int64_t>(), *mp = map.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>(),
                *tr = token_rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(row_grads.scalar_type(), "grouped_expert_ffn_weight_grads", [&] {
    const scalar_t* g = row_grads.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < T * k; ++i) {
      o[i] = scalar_t(0);
      if (ip[i] < 0) continue;
      const int64_t s = mp[ip[i]], t = i / k;
      for (int64_t j = 0; j < k; ++j) {  // the token's row on slot s (its rows are in ascending slot order)
        const int64_t row = tr[t * k + j];
        if (row < 0) break;
        if (row >= off[s] && row < off[s + 1]) {
          o[i] = g[row];
          break;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_expert_ffn_backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& hidden_arg, const at::Tensor& w_in_arg,
    const at::Tensor& w_out_arg, const at::Tensor& expert_map, const at::Tensor& top_k_index,
    const at::Tensor& top_k_weights_arg, c10::string_view activation, std::array<bool, 4> mask) {
  const at::Tensor grad_out = grad_out_arg.detach(), hidden = hidden_arg.detach(), w_in = w_in_arg.detach(),
                   w_out = w_out_arg.detach(), top_k_weights = top_k_weights_arg.detach();
  const Activation act = check_grouped_ffn_backward_args(grad_out, hidden, w_in, w_out, expert_map, top_k_index,
                                                         top_k_weights, activation);
  TORCH_CHECK(hidden.device().is_cpu(), "grouped_expert_ffn_backward: expected CPU tensors, got ", hidden.device());
  const bool need_x = mask[0], need_win = mask[1], need_wout = mask[2], need_w = mask[3];
  const int64_t T = hidden.size(0), d = hidden.size(1), k = top_k_index.size(1), S = w_in.size(0),
                F = w_in.size(1), ff = w_out.size(2);
  const auto dtype = hidden.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto aligned = moe_align_cpu_impl(top_k_index, top_k_weights, expert_map, S, acc);
  const at::Tensor &sorted_tokens = aligned[0], &offsets = aligned[1], &weights = aligned[2], &token_rows = aligned[3];
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0 || !(need_x || need_win || need_wout || need_w))
    return masked_ffn_grads(hidden, w_in, w_out, top_k_weights, mask);
  // The backward's GEMMs: pairs * (3 F + 2 ff) * d multiply-adds; below kSmallCallMacs one thread does it all.
  const SingleThreadIf small(pairs * (3 * F + 2 * ff) * d < kSmallCallMacs);

  const at::Tensor rows = sorted_tokens.narrow(0, 0, pairs);
  const at::Tensor x = hidden.index_select(0, rows);    // [pairs, d] by slot
  const at::Tensor g = grad_out.index_select(0, rows);  // [pairs, d]
  const at::Tensor w_rows = weights.narrow(0, 0, pairs).to(dtype).unsqueeze(1);  // [pairs, 1]
  at::Tensor dx = need_x ? at::empty({pairs, d}, hidden.options()) : at::Tensor();
  at::Tensor gw_rows = need_w ? at::empty({pairs}, weights.options()) : at::Tensor();
  at::Tensor g_win = need_win ? at::empty({S, F, d}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor g_wout = need_wout ? at::empty({S, d, ff}, hidden.options()) : at::empty({0}, hidden.options());
  const bool need_dh = need_x || need_win, need_a = need_w || need_wout;

  // One block of n rows of slot s starting at row r; `first` blocks write the weight gradients, later
  // blocks add to them.
  auto run_block = [&](int64_t s, int64_t r, int64_t n, bool first) {
    const at::Tensor x_b = x.narrow(0, r, n), g_b = g.narrow(0, r, n), w_b = w_rows.narrow(0, r, n);
    const at::Tensor win_s = w_in.select(0, s), wout_s = w_out.select(0, s);
    at::Tensor h = linear_nt(x_b, win_s);  // [n, F]
    // [n, ff]: G W_out, the gradient reaching A before the weights (grad_W_out alone does not need it)
    at::Tensor p = need_w || need_dh ? at::mm(g_b, wout_s) : at::Tensor();
    at::Tensor gate = act.gated ? h.narrow(1, 0, ff) : h, up = act.gated ? h.narrow(1, ff, ff) : at::Tensor();
    at::Tensor ag = need_a || act.gated ? act_fn(gate, act.fn) : at::Tensor();  // act(gate) or act(h)
    if (need_a) {
      at::Tensor a = act.gated ? ag * up : ag;
      if (need_w) {
        at::Tensor gw_b = gw_rows.narrow(0, r, n);
        at::sum_out(gw_b, p * a, {1}, false, acc);
      }
      if (need_wout) {
        at::Tensor g_wout_s = g_wout.select(0, s);
        a.mul_(w_b);  // w A, in place: the derivative below reads H (and act(gate)), not A
        if (first) {
          at::mm_out(g_wout_s, g_b.t(), a);
        } else {
          g_wout_s.addmm_(g_b.t(), a);
        }
      }
    }
    if (!need_dh) return;
    p.mul_(w_b);  // dA
    if (act.gated) {
      at::Tensor da_up = p * up;       // the gradient reaching act(gate)
      at::mul_out(up, p, ag);          // d up = dA act(gate), in place of up
      act_backward_out(gate, da_up, gate, act.fn);  // d gate, in place of gate
    } else {
      act_backward_out(h, p, h, act.fn);  // dH in place of H
    }
    if (need_win) {
      at::Tensor g_win_s = g_win.select(0, s);
      if (first) {
        at::mm_out(g_win_s, h.t(), x_b);
      } else {
        g_win_s.addmm_(h.t(), x_b);
      }
    }
    if (need_x) {
      at::Tensor dx_b = dx.narrow(0, r, n);
      at::mm_out(dx_b, h, win_s);
    }
  };
  // Row blocks as in the forward: at most kRowBlock rows bound the [rows, F] intermediates.
  constexpr int64_t kRowBlock = 1024;
  auto run_slot = [&](int64_t s) {
    const int64_t slot_rows = off[s + 1] - off[s];
    const int64_t blocks = (slot_rows + kRowBlock - 1) / kRowBlock;
    const int64_t block = blocks > 0 ? (slot_rows + blocks - 1) / blocks : 0;
    for (int64_t r = off[s]; r < off[s + 1]; r += block) run_block(s, r, std::min(block, off[s + 1] - r), r == off[s]);
  };

  std::vector<int64_t> slot_rows(S);
  for (int64_t s = 0; s < S; ++s) slot_rows[s] = off[s + 1] - off[s];
  for (int64_t s = 0; s < S; ++s) {  // slots no token reached get zero weight gradients
    if (slot_rows[s] > 0) continue;
    if (need_win) g_win.select(0, s).zero_();
    if (need_wout) g_wout.select(0, s).zero_();
  }
  for_each_slot(slot_rows, run_slot);

  at::Tensor grad_hidden = at::empty({0}, hidden.options());
  if (need_x) {
    grad_hidden = at::empty({T, d}, hidden.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grouped_expert_ffn_backward_hidden", [&] {
      if (acc == at::kDouble) {
        sum_token_rows<scalar_t, double>(dx.data_ptr<scalar_t>(), token_rows.data_ptr<int64_t>(), T, k, d,
                                         grad_hidden.data_ptr<scalar_t>());
      } else {
        sum_token_rows<scalar_t, float>(dx.data_ptr<scalar_t>(), token_rows.data_ptr<int64_t>(), T, k, d,
                                        grad_hidden.data_ptr<scalar_t>());
      }
    });
  }
  at::Tensor grad_weights = at::empty({0}, top_k_weights.options());
  if (need_w) {
    at::Tensor out = at::empty({T, k}, weights.options());
    routing_weight_grads_cpu(top_k_index, expert_map, offsets, token_rows, gw_rows, out);
    grad_weights = out.to(top_k_weights.scalar_type());
  }
  return {grad_hidden, g_win, g_wout, grad_weights};
}

}  // namespace mcsmoe::ops
