// grouped_expert_ffn_backward on the CPU: the gradients of the grouped expert FFN (grouped_ffn.cpp) with the
// same routing frame: align (counting sort by slot), gather each slot's tokens and output gradients into
// contiguous rows, then per slot s with routed rows X [n, d], summed weights w [n] and gradients G [n, d]:
//   H = X W_in[s]^T + b_in[s] (the forward's, h_rows, when grouped_expert_ffn_keep_h kept them; else recomputed),
//   A = act(H), P = G W_out[s]   [n, ff]
//   grad of each routing weight = <G_t, y_t> = <P_t, A_t> + <G_t, b_out[s]>   (y is never formed)
//   grad_W_out[s] = G^T (w A)      grad_b_out[s] = G^T w      dA = w P      dH = act'(H) applied to dA
//   grad_W_in[s] = dH^T X          grad_b_in[s] = sum of dH's rows
//   dX = dH W_in[s]  (rows; summed per token after all slots: deterministic)
// GEMMs through ATen (MKL/oneDNN), the activation and its derivative through ATen's vectorized ops (GPT-OSS's
// clamped SwiGLU: one fused loop over the rows, activation.h's formulas), slots in parallel or one after
// another with threaded GEMMs (the forward's rule). Outputs left out by output_mask are not computed and
// come back as empty tensors [0]. The work on one block of a slot's rows is five named steps (recompute,
// weight_row_grads, output_grads, activation_grad, input_grads: block_backward); the dX rows are summed per
// token by the forward's combine (combine_token_rows_cpu, unit weights).
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
                          const std::optional<at::Tensor>& b_out, std::array<bool, 6> mask, bool weights_layout) {
  auto grad = [](bool need, const at::Tensor& like, bool keep_layout = false) {
    const auto format = keep_layout ? at::MemoryFormat::Preserve : at::MemoryFormat::Contiguous;
    return need ? at::zeros_like(like, format) : at::empty({0}, like.options());
  };
  mask = effective_mask(mask, b_in, b_out);
  return {grad(mask[0], hidden), grad(mask[1], w_in, weights_layout), grad(mask[2], w_out, weights_layout),
          grad(mask[3], top_k_weights),
          grad(mask[4], b_in ? *b_in : w_in), grad(mask[5], b_out ? *b_out : w_out)};
}

FfnNeeds::FfnNeeds(std::array<bool, 6> mask, const std::optional<at::Tensor>& b_in_arg,
                   const std::optional<at::Tensor>& b_out_arg) {
  mask = effective_mask(mask, b_in_arg, b_out_arg);
  x = mask[0], w_in = mask[1], w_out = mask[2], weights = mask[3], b_in = mask[4], b_out = mask[5];
}

SlotGrads::SlotGrads(const FfnNeeds& need, const at::Tensor& w_in_like, const at::Tensor& w_out_like,
                     bool weights_layout)
    : need_(need) {
  const int64_t S = w_in_like.size(0), F = w_in_like.size(1), d = w_in_like.size(2);
  const auto opts = w_in_like.options();
  auto like = [&](bool needed, const at::Tensor& w) {
    if (!needed) return at::empty({0}, opts);
    return weights_layout ? at::empty_like(w, at::MemoryFormat::Preserve) : at::empty(w.sizes(), opts);
  };
  w_in = like(need.w_in, w_in_like);
  w_out = like(need.w_out, w_out_like);
  b_in = need.b_in ? at::empty({S, F}, opts) : at::empty({0}, opts);
  b_out = need.b_out ? at::empty({S, d}, opts) : at::empty({0}, opts);
}

void SlotGrads::zero_slot(int64_t s) {
  if (need_.w_in) w_in.select(0, s).zero_();
  if (need_.w_out) w_out.select(0, s).zero_();
  if (need_.b_in) b_in.select(0, s).zero_();
  if (need_.b_out) b_out.select(0, s).zero_();
}

namespace {

at::Tensor act_fn(const at::Tensor& x, moe::ActFn fn) {
  switch (fn) {
    case moe::ActFn::relu: return at::relu(x);
    case moe::ActFn::relu2: return at::relu(x).square_();
    case moe::ActFn::gelu: return at::gelu(x, "none");
    case moe::ActFn::gelu_tanh: return at::gelu(x, "tanh");
    default: return at::silu(x);
  }
}

// out = grad * act'(x), element-wise; out may be x itself.
void act_backward_out(at::Tensor out, const at::Tensor& grad, const at::Tensor& x, moe::ActFn fn) {
  switch (fn) {
    case moe::ActFn::relu: at::threshold_backward_out(out, grad, x, 0); break;
    case moe::ActFn::relu2: at::mul_out(out, grad, at::relu(x).mul_(2)); break;  // 2 relu(x), 0 at x <= 0
    case moe::ActFn::gelu: at::gelu_backward_out(out, grad, x, "none"); break;
    case moe::ActFn::gelu_tanh: at::gelu_backward_out(out, grad, x, "tanh"); break;
    default: at::silu_backward_out(out, grad, x); break;
  }
}

// clamped_swiglu's backward over n rows of h [n, 2 ff] (rows contiguous, stride ldh; gate j at column j * step,
// up j at j * step + up_at: (1, ff) gate then up columns, (2, 1) interleaved): with dA[r, j] = w[r] p[r, j],
// writes a[r, j] = clamped_swiglu(h) into a (when not null; [n, ff] contiguous) and, when write_dh, dH (d gate,
// d up) in place of h, in h's own column order. p may be null when write_dh is false.
template <typename scalar_t>
void clamped_swiglu_backward_rows(scalar_t* h, int64_t ldh, const scalar_t* p, const scalar_t* w, scalar_t* a,
                                  bool write_dh, int64_t n, int64_t ff, int64_t step, int64_t up_at, double alpha,
                                  double limit) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto al = static_cast<opmath_t>(alpha), l = static_cast<opmath_t>(limit);
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(ff, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = h + r * ldh;
      const opmath_t wr = static_cast<opmath_t>(w[r]);
      for (int64_t j = 0; j < ff; ++j) {
        scalar_t* gate = row + j * step;
        scalar_t* up = gate + up_at;
        const opmath_t dA = p != nullptr ? wr * static_cast<opmath_t>(p[r * ff + j]) : opmath_t(0);
        const auto g = moe::clamped_swiglu_backward<opmath_t>(*gate, *up, dA, al, l);
        if (a != nullptr) a[r * ff + j] = static_cast<scalar_t>(g.a);
        if (write_dh) {
          *gate = static_cast<scalar_t>(g.dg);
          *up = static_cast<scalar_t>(g.du);
        }
      }
    }
  });
}

std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t ? std::optional(t->detach()) : std::nullopt;
}

// out = a b for a slot's first block of rows, out += a b for its later blocks; likewise a v and the row sum.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool first) {
  gemm_into(out, a, b, !first);
}

void mv_into(at::Tensor out, const at::Tensor& a, const at::Tensor& v, bool first) {
  if (first) {
    at::mv_out(out, a, v);
  } else {
    out.addmv_(a, v);
  }
}

void row_sum_into(at::Tensor out, const at::Tensor& h, bool first) {
  if (first) {
    at::sum_out(out, h, {0});
  } else {
    out.add_(h.sum(0));
  }
}

// One call's backward: its inputs, the routed rows by slot and the gradients it fills (each slot writes
// only its own entries, so slots may run in parallel).
struct Pass {
  Activation act;
  FfnNeeds need;
  at::Tensor w_in, w_out;
  std::optional<at::Tensor> b_in, b_out;
  at::ScalarType acc;       // the routing weights' dtype: float64 for float64, else float32
  at::Tensor x, g, w_rows;  // routed rows by slot: hidden [pairs, d], grad_out [pairs, d], summed weights [pairs, 1]
  at::Tensor dx, gw_rows;   // per routed row: dX [pairs, d] and the routing weight's gradient [pairs] (acc)
  SlotGrads grads;
  std::optional<at::Tensor> h_rows;  // the forward's H, when it kept them
};

// n rows of slot s from row r (`first`: the slot's first block), and the forward recomputed on them.
struct Block {
  int64_t s, r, n;
  bool first;
  at::Tensor x, g, w;          // X [n, d], G [n, d], summed weights [n, 1]
  at::Tensor h, p;             // H [n, F] (dH in place, later), P = G W_out[s] [n, ff]
  at::Tensor gate, up, a, ag;  // views of h (gate = h ungated); A; act(gate) (act(h) ungated)
};

// The clamped SwiGLU in one pass over the rows: A (when needed) and dH in place of H for dA = w P.
void clamped_swiglu_block(const Pass& pass, Block& b) {
  const int64_t ff = pass.w_out.size(2);
  const bool need_a = pass.need.a(), need_dh = pass.need.dh();
  b.a = need_a ? at::empty({b.n, ff}, b.h.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.h.scalar_type(), "clamped_swiglu_backward", [&] {
    const at::Tensor w_c = b.w.contiguous();
    const GateUpLayout layout = gate_up_layout(pass.act.interleaved, ff);
    clamped_swiglu_backward_rows<scalar_t>(b.h.data_ptr<scalar_t>(), b.h.stride(0),
                                           b.p.defined() ? b.p.data_ptr<scalar_t>() : nullptr,
                                           w_c.data_ptr<scalar_t>(), need_a ? b.a.data_ptr<scalar_t>() : nullptr,
                                           need_dh, b.n, ff, layout.step, layout.up_at, pass.act.alpha, pass.act.limit);
  });
}

// Step 1. H = X W_in[s]^T + b_in[s] (a copy of the forward's when it kept them: the later steps write over it)
// and P = G W_out[s] (grad_W_out alone needs no P), then A and act(gate) as the later steps need them.
void recompute(const Pass& pass, Block& b) {
  const int64_t ff = pass.w_out.size(2);
  const std::optional<at::Tensor> bin_s = pass.b_in ? std::optional(pass.b_in->select(0, b.s)) : std::nullopt;
  b.h = pass.h_rows ? pass.h_rows->narrow(0, b.r, b.n).clone(at::MemoryFormat::Contiguous)
                    : linear_nt(b.x, pass.w_in.select(0, b.s), std::nullopt, bin_s);  // [n, F]
  if (pass.need.p()) b.p = gemm(b.g, pass.w_out.select(0, b.s));
  b.gate = pass.act.gated ? b.h.narrow(1, 0, ff) : b.h;
  if (pass.act.gated) b.up = b.h.narrow(1, ff, ff);
  if (pass.act.clamped()) {
    clamped_swiglu_block(pass, b);
  } else {
    if (pass.need.a() || pass.act.gated) b.ag = act_fn(b.gate, pass.act.fn);
    if (pass.need.a()) b.a = pass.act.gated ? b.ag * b.up : b.ag;
  }
}

// Step 2. Each routed row's weight gradient <G_t, y_t> = <P_t, A_t> + <G_t, b_out[s]> (b_out is part of y).
void weight_row_grads(Pass& pass, const Block& b) {
  at::Tensor gw_b = pass.gw_rows.narrow(0, b.r, b.n);
  at::sum_out(gw_b, b.p * b.a, {1}, false, pass.acc);
  if (pass.b_out) gw_b.add_(at::mv(b.g, pass.b_out->select(0, b.s)));
}

// Step 3. grad_W_out[s] = G^T (w A) and grad_b_out[s] = G^T w. A is scaled in place: the steps after this
// read H (and act(gate)), not A.
void output_grads(Pass& pass, Block& b) {
  if (pass.need.w_out) {
    b.a.mul_(b.w);
    mm_into(pass.grads.w_out.select(0, b.s), b.g.t(), b.a, b.first);
  }
  if (pass.need.b_out) mv_into(pass.grads.b_out.select(0, b.s), b.g.t(), b.w.squeeze(1), b.first);
}

// Step 4. dH in place of H for dA = w P (the clamped SwiGLU wrote it in step 1).
void activation_grad(const Pass& pass, Block& b) {
  if (pass.act.clamped()) return;
  b.p.mul_(b.w);  // dA
  if (pass.act.gated) {
    at::Tensor da_up = b.p * b.up;                         // the gradient reaching act(gate)
    at::mul_out(b.up, b.p, b.ag);                          // d up = dA act(gate), in place of up
    act_backward_out(b.gate, da_up, b.gate, pass.act.fn);  // d gate, in place of gate
  } else {
    act_backward_out(b.h, b.p, b.h, pass.act.fn);  // dH in place of H
  }
}

// Step 5. grad_b_in[s] = sum of dH's rows, grad_W_in[s] = dH^T X, and dX = dH W_in[s] (rows, summed per
// token after all slots: deterministic).
void input_grads(Pass& pass, const Block& b) {
  if (pass.need.b_in) row_sum_into(pass.grads.b_in.select(0, b.s), b.h, b.first);
  if (pass.need.w_in) mm_into(pass.grads.w_in.select(0, b.s), b.h.t(), b.x, b.first);
  if (pass.need.x) {
    at::Tensor dx_b = pass.dx.narrow(0, b.r, b.n);
    gemm_into(dx_b, b.h, pass.w_in.select(0, b.s), false);
  }
}

void block_backward(Pass& pass, int64_t s, int64_t r, int64_t n, bool first) {
  Block b{s, r, n, first, pass.x.narrow(0, r, n), pass.g.narrow(0, r, n), pass.w_rows.narrow(0, r, n)};
  recompute(pass, b);
  if (pass.need.weights) weight_row_grads(pass, b);
  output_grads(pass, b);
  if (!pass.need.dh()) return;
  activation_grad(pass, b);
  input_grads(pass, b);
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
                                         const std::optional<at::Tensor>& b_out_arg, double alpha, double limit,
                                         const std::optional<at::Tensor>& h_rows) {
  const at::Tensor grad_out = grad_out_arg.detach(), hidden = hidden_arg.detach(), w_in = w_in_arg.detach(),
                   w_out = w_out_arg.detach(), top_k_weights = top_k_weights_arg.detach();
  const Activation act = check_grouped_ffn_backward_args(grad_out, hidden, w_in, w_out, expert_map, top_k_index,
                                                         top_k_weights, activation, b_in_arg, b_out_arg, alpha, limit);
  TORCH_CHECK(hidden.device().is_cpu(), "grouped_expert_ffn_backward: expected CPU tensors, got ", hidden.device());
  const std::optional<at::Tensor> b_in = detached(b_in_arg), b_out = detached(b_out_arg);
  const FfnNeeds need(mask_arg, b_in, b_out);
  const int64_t T = hidden.size(0), d = hidden.size(1), k = top_k_index.size(1), S = w_in.size(0),
                F = w_in.size(1), ff = w_out.size(2);
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(!h_rows || (h_rows->dim() == 2 && h_rows->size(0) == T * k && h_rows->size(1) == F &&
                          h_rows->scalar_type() == dtype && h_rows->device().is_cpu()),
              "grouped_expert_ffn_backward: h_rows must be grouped_expert_ffn_keep_h's [T k, F] = [", T * k, ", ", F,
              "] ", dtype, " CPU tensor, got ", h_rows ? h_rows->sizes() : at::IntArrayRef{}, " ",
              h_rows ? h_rows->scalar_type() : dtype);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto aligned = moe_align_cpu_impl(top_k_index, top_k_weights, expert_map, S, acc, "grouped_expert_ffn_backward");
  const at::Tensor &sorted_tokens = aligned[0], &offsets = aligned[1], &weights = aligned[2], &token_rows = aligned[3];
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0 || !need.any())
    return masked_ffn_grads(hidden, w_in, w_out, top_k_weights, b_in, b_out, mask_arg, /*weights_layout=*/true);
  // The backward's GEMMs: pairs * (3 F + 2 ff) * d multiply-adds; below kSmallCallMacs one thread does it all.
  const SingleThreadIf small(pairs * (3 * F + 2 * ff) * d < kSmallCallMacs);

  const at::Tensor rows = sorted_tokens.narrow(0, 0, pairs);
  const auto opts = hidden.options();
  Pass pass{act, need, w_in, w_out, b_in, b_out, acc,
            hidden.index_select(0, rows), grad_out.index_select(0, rows),  // [pairs, d] by slot
            weights.narrow(0, 0, pairs).to(dtype).unsqueeze(1),             // [pairs, 1]
            need.x ? at::empty({pairs, d}, opts) : at::Tensor(),
            need.weights ? at::empty({pairs}, weights.options()) : at::Tensor(),
            SlotGrads(need, w_in, w_out, /*weights_layout=*/true), detached(h_rows)};
  const std::vector<int64_t> slot_rows = rows_per_slot(off, S);
  for (int64_t s = 0; s < S; ++s)  // slots no token reached get zero parameter gradients
    if (slot_rows[s] == 0) pass.grads.zero_slot(s);
  const std::string shape = std::string("grouped_expert_ffn_backward ") + c10::toString(dtype) + " d=" +
                            std::to_string(d) + " F=" + std::to_string(F);
  for_each_slot(slot_rows, shape, [&](int64_t s) {
    for_each_row_block(off[s], off[s + 1],
                       [&](int64_t r, int64_t n) { block_backward(pass, s, r, n, /*first=*/r == off[s]); });
  });

  at::Tensor grad_hidden = need.x ? combine_token_rows_cpu(pass.dx, token_rows, std::nullopt) : at::empty({0}, opts);
  at::Tensor grad_weights = at::empty({0}, top_k_weights.options());
  if (need.weights) {
    at::Tensor out = at::empty({T, k}, weights.options());
    routing_weight_grads_cpu(top_k_index, expert_map, offsets, token_rows, pass.gw_rows, out);
    grad_weights = out.to(top_k_weights.scalar_type());
  }
  return {grad_hidden, pass.grads.w_in, pass.grads.w_out, grad_weights, pass.grads.b_in, pass.grads.b_out};
}

}  // namespace mcsmoe::ops
