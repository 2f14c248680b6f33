// grouped_expert_ffn_backward on the CPU: the gradients of the grouped expert FFN (moe_ffn.cpp) with the
// same routing frame: align (counting sort by slot), gather each slot's tokens and output gradients into
// contiguous rows, then per slot s with routed rows X [n, d], summed weights w [n] and gradients G [n, d]:
//   H = X W_in[s]^T + b_in[s] (recomputed; the forward keeps nothing), A = act(H), P = G W_out[s]   [n, ff]
//   grad of each routing weight = <G_t, y_t> = <P_t, A_t> + <G_t, b_out[s]>   (y is never formed)
//   grad_W_out[s] = G^T (w A)      grad_b_out[s] = G^T w      dA = w P      dH = act'(H) applied to dA
//   grad_W_in[s] = dH^T X          grad_b_in[s] = sum of dH's rows
//   dX = dH W_in[s]  (rows; summed per token after all slots: deterministic)
// GEMMs through ATen (MKL/oneDNN), the activation and its derivative through ATen's vectorized ops (GPT-OSS's
// clamped SwiGLU: one fused loop over the rows, activation.h's formulas), slots in parallel or one after
// another with threaded GEMMs (the forward's rule). Outputs left out by output_mask are not computed and
// come back as empty tensors [0].
#include <ATen/OpMathType.h>
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
                                           const at::Tensor& top_k_weights, c10::string_view activation,
                                           const std::optional<at::Tensor>& b_in,
                                           const std::optional<at::Tensor>& b_out, double alpha, double limit) {
  const Activation act = check_grouped_ffn_args(hidden, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                                activation, b_in, b_out, alpha, limit);
  const char* op = "grouped_expert_ffn_backward";
  TORCH_CHECK(grad_out.sizes() == hidden.sizes(), op, ": grad_out must have hidden's shape ", hidden.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == hidden.scalar_type(), op, ": grad_out must have hidden's dtype ",
              hidden.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == hidden.device(), op, ": grad_out must be on hidden's device ", hidden.device(),
              ", got ", grad_out.device());
  return act;
}

std::array<bool, 6> effective_mask(std::array<bool, 6> mask, const std::optional<at::Tensor>& b_in,
                                   const std::optional<at::Tensor>& b_out) {
  mask[4] = mask[4] && b_in.has_value();
  mask[5] = mask[5] && b_out.has_value();
  return mask;
}

FfnGrads masked_ffn_grads(const at::Tensor& hidden, const at::Tensor& w_in, const at::Tensor& w_out,
                          const at::Tensor& top_k_weights, const std::optional<at::Tensor>& b_in,
                          const std::optional<at::Tensor>& b_out, std::array<bool, 6> mask) {
  auto grad = [](bool need, const at::Tensor& like) {
    return need ? at::zeros_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, like.options());
  };
  mask = effective_mask(mask, b_in, b_out);
  return {grad(mask[0], hidden), grad(mask[1], w_in),  grad(mask[2], w_out), grad(mask[3], top_k_weights),
          grad(mask[4], b_in ? *b_in : w_in), grad(mask[5], b_out ? *b_out : w_out)};
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

// clamped_swiglu's backward over n rows of h [n, 2 ff] (rows contiguous, stride ldh; gate then up columns):
// with dA[r, j] = w[r] p[r, j], writes a[r, j] = clamped_swiglu(h) into a (when not null; [n, ff] contiguous)
// and, when write_dh, dH (d gate, d up) in place of h. p may be null when write_dh is false.
template <typename scalar_t>
void clamped_swiglu_backward_rows(scalar_t* h, int64_t ldh, const scalar_t* p, const scalar_t* w, scalar_t* a,
                                  bool write_dh, int64_t n, int64_t ff, double alpha, double limit) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto al = static_cast<opmath_t>(alpha), l = static_cast<opmath_t>(limit);
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(ff, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gate = h + r * ldh;
      scalar_t* up = gate + ff;
      const opmath_t wr = static_cast<opmath_t>(w[r]);
      for (int64_t j = 0; j < ff; ++j) {
        const opmath_t dA = p != nullptr ? wr * static_cast<opmath_t>(p[r * ff + j]) : opmath_t(0);
        const auto g = moe::clamped_swiglu_backward<opmath_t>(gate[j], up[j], dA, al, l);
        if (a != nullptr) a[r * ff + j] = static_cast<scalar_t>(g.a);
        if (write_dh) {
          gate[j] = static_cast<scalar_t>(g.dg);
          up[j] = static_cast<scalar_t>(g.du);
        }
      }
    }
  });
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

FfnGrads grouped_expert_ffn_backward_cpu(const at::Tensor& grad_out_arg, const at::Tensor& hidden_arg,
                                         const at::Tensor& w_in_arg, const at::Tensor& w_out_arg,
                                         const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                         const at::Tensor& top_k_weights_arg, c10::string_view activation,
                                         std::array<bool, 6> mask_arg, const std::optional<at::Tensor>& b_in_arg,
                                         const std::optional<at::Tensor>& b_out_arg, double alpha, double limit) {
  const at::Tensor grad_out = grad_out_arg.detach(), hidden = hidden_arg.detach(), w_in = w_in_arg.detach(),
                   w_out = w_out_arg.detach(), top_k_weights = top_k_weights_arg.detach();
  const Activation act = check_grouped_ffn_backward_args(grad_out, hidden, w_in, w_out, expert_map, top_k_index,
                                                         top_k_weights, activation, b_in_arg, b_out_arg, alpha, limit);
  TORCH_CHECK(hidden.device().is_cpu(), "grouped_expert_ffn_backward: expected CPU tensors, got ", hidden.device());
  const std::optional<at::Tensor> b_in = b_in_arg ? std::optional(b_in_arg->detach()) : std::nullopt;
  const std::optional<at::Tensor> b_out = b_out_arg ? std::optional(b_out_arg->detach()) : std::nullopt;
  const auto mask = effective_mask(mask_arg, b_in, b_out);
  const bool need_x = mask[0], need_win = mask[1], need_wout = mask[2], need_w = mask[3], need_bin = mask[4],
             need_bout = mask[5];
  const int64_t T = hidden.size(0), d = hidden.size(1), k = top_k_index.size(1), S = w_in.size(0),
                F = w_in.size(1), ff = w_out.size(2);
  const auto dtype = hidden.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto aligned = moe_align_cpu_impl(top_k_index, top_k_weights, expert_map, S, acc);
  const at::Tensor &sorted_tokens = aligned[0], &offsets = aligned[1], &weights = aligned[2], &token_rows = aligned[3];
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0 || !(need_x || need_win || need_wout || need_w || need_bin || need_bout))
    return masked_ffn_grads(hidden, w_in, w_out, top_k_weights, b_in, b_out, mask);
  // The backward's GEMMs: pairs * (3 F + 2 ff) * d multiply-adds; below kSmallCallMacs one thread does it all.
  const SingleThreadIf small(pairs * (3 * F + 2 * ff) * d < kSmallCallMacs);

  const at::Tensor rows = sorted_tokens.narrow(0, 0, pairs);
  const at::Tensor x = hidden.index_select(0, rows);    // [pairs, d] by slot
  const at::Tensor g = grad_out.index_select(0, rows);  // [pairs, d]
  const at::Tensor w_rows = weights.narrow(0, 0, pairs).to(dtype).unsqueeze(1);  // [pairs, 1]
  const auto opts = hidden.options();
  at::Tensor dx = need_x ? at::empty({pairs, d}, opts) : at::Tensor();
  at::Tensor gw_rows = need_w ? at::empty({pairs}, weights.options()) : at::Tensor();
  at::Tensor g_win = need_win ? at::empty({S, F, d}, opts) : at::empty({0}, opts);
  at::Tensor g_wout = need_wout ? at::empty({S, d, ff}, opts) : at::empty({0}, opts);
  at::Tensor g_bin = need_bin ? at::empty({S, F}, opts) : at::empty({0}, opts);
  at::Tensor g_bout = need_bout ? at::empty({S, d}, opts) : at::empty({0}, opts);
  const bool need_dh = need_x || need_win || need_bin, need_a = need_w || need_wout;

  // One block of n rows of slot s starting at row r; `first` blocks write the slot's parameter gradients,
  // later blocks add to them.
  auto run_block = [&](int64_t s, int64_t r, int64_t n, bool first) {
    const at::Tensor x_b = x.narrow(0, r, n), g_b = g.narrow(0, r, n), w_b = w_rows.narrow(0, r, n);
    const at::Tensor win_s = w_in.select(0, s), wout_s = w_out.select(0, s);
    const std::optional<at::Tensor> bin_s = b_in ? std::optional(b_in->select(0, s)) : std::nullopt;
    at::Tensor h = linear_nt(x_b, win_s, std::nullopt, bin_s);  // [n, F]
    // [n, ff]: G W_out, the gradient reaching A before the weights (grad_W_out alone does not need it)
    at::Tensor p = need_w || need_dh ? at::mm(g_b, wout_s) : at::Tensor();
    at::Tensor gate = act.gated ? h.narrow(1, 0, ff) : h, up = act.gated ? h.narrow(1, ff, ff) : at::Tensor();
    at::Tensor a, ag;  // A; act(gate) (or act(h)) for the other activations
    if (act.clamped()) {  // one pass: A (when needed) and dH in place of H (dA = w P)
      a = need_a ? at::empty({n, ff}, opts) : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "clamped_swiglu_backward", [&] {
        const at::Tensor w_c = w_b.contiguous();
        clamped_swiglu_backward_rows<scalar_t>(h.data_ptr<scalar_t>(), h.stride(0),
                                               p.defined() ? p.data_ptr<scalar_t>() : nullptr,
                                               w_c.data_ptr<scalar_t>(), need_a ? a.data_ptr<scalar_t>() : nullptr,
                                               need_dh, n, ff, act.alpha, act.limit);
      });
    } else {
      ag = need_a || act.gated ? act_fn(gate, act.fn) : at::Tensor();
      if (need_a) a = act.gated ? ag * up : ag;
    }
    if (need_w) {
      at::Tensor gw_b = gw_rows.narrow(0, r, n);
      at::sum_out(gw_b, p * a, {1}, false, acc);
      if (b_out) gw_b.add_(at::mv(g_b, b_out->select(0, s)));  // <G_t, b_out[s]>: b_out is part of y
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
    if (need_bout) {  // G^T w
      at::Tensor g_bout_s = g_bout.select(0, s);
      const at::Tensor w_vec = w_b.squeeze(1);
      if (first) {
        at::mv_out(g_bout_s, g_b.t(), w_vec);
      } else {
        g_bout_s.addmv_(g_b.t(), w_vec);
      }
    }
    if (!need_dh) return;
    if (!act.clamped()) {
      p.mul_(w_b);  // dA
      if (act.gated) {
        at::Tensor da_up = p * up;       // the gradient reaching act(gate)
        at::mul_out(up, p, ag);          // d up = dA act(gate), in place of up
        act_backward_out(gate, da_up, gate, act.fn);  // d gate, in place of gate
      } else {
        act_backward_out(h, p, h, act.fn);  // dH in place of H
      }
    }
    if (need_bin) {
      at::Tensor g_bin_s = g_bin.select(0, s);
      if (first) {
        at::sum_out(g_bin_s, h, {0});
      } else {
        g_bin_s.add_(h.sum(0));
      }
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
  for (int64_t s = 0; s < S; ++s) {  // slots no token reached get zero parameter gradients
    if (slot_rows[s] > 0) continue;
    if (need_win) g_win.select(0, s).zero_();
    if (need_wout) g_wout.select(0, s).zero_();
    if (need_bin) g_bin.select(0, s).zero_();
    if (need_bout) g_bout.select(0, s).zero_();
  }
  for_each_slot(slot_rows, run_slot);

  at::Tensor grad_hidden = at::empty({0}, opts);
  if (need_x) {
    grad_hidden = at::empty({T, d}, opts);
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
  return {grad_hidden, g_win, g_wout, grad_weights, g_bin, g_bout};
}

}  // namespace mcsmoe::ops
