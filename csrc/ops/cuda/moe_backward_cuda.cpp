// grouped_expert_ffn_backward on CUDA: the forward's alignment (align_cuda.h: kernels plus one copy of the
// slot offsets to the host), the routed rows of hidden and grad_out gathered by slot, then per slot s
// (n rows X, G, summed weights w):
//   H = X W_in[s]^T + b_in[s], P = G W_out[s]            (at::mm / at::addmm -> cuBLAS)
//   act_backward_cuda: row grads <P_r, A_r> + <G_r, b_out[s]>, w A, dH in place of H  (one fused
//   elementwise pass, float math)
//   grad_W_out[s] = G^T (w A), grad_W_in[s] = dH^T X, dX = dH W_in[s], grad_b_out[s] = G^T w   (cuBLAS)
//   grad_b_in[s] = sum of dH's rows (at::sum, float accumulation)
// and finally each token's dX rows summed (the forward's combine kernel with unit weights) and each top-k
// entry's weight gradient read from its slot's row. Contract as grouped_expert_ffn_backward_cpu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <stdexcept>

#include "kernels/moe_ffn.h"
#include "kernels/moe_ffn_backward.h"
#include "ops/cuda/align_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

FfnGrads grouped_expert_ffn_backward_cuda(const at::Tensor& grad_out_arg, const at::Tensor& hidden_arg,
                                          const at::Tensor& w_in_arg, const at::Tensor& w_out_arg,
                                          const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                          const at::Tensor& top_k_weights_arg, c10::string_view activation,
                                          std::array<bool, 6> mask_arg, const std::optional<at::Tensor>& b_in_arg,
                                          const std::optional<at::Tensor>& b_out_arg, double alpha, double limit) {
  const char* op = "grouped_expert_ffn_backward";
  const Activation act =
      check_grouped_ffn_backward_args(grad_out_arg, hidden_arg, w_in_arg, w_out_arg, expert_map, top_k_index,
                                      top_k_weights_arg, activation, b_in_arg, b_out_arg, alpha, limit);
  TORCH_CHECK(hidden_arg.is_cuda(), op, ": expected CUDA tensors, got ", hidden_arg.device());
  const c10::cuda::CUDAGuard guard(hidden_arg.device());
  const at::Tensor grad_out = grad_out_arg.detach(), hidden = hidden_arg.detach(), w_in = w_in_arg.detach(),
                   w_out = w_out_arg.detach(), top_k_weights = top_k_weights_arg.detach();
  const std::optional<at::Tensor> b_in = b_in_arg ? std::optional(b_in_arg->detach()) : std::nullopt;
  const std::optional<at::Tensor> b_out = b_out_arg ? std::optional(b_out_arg->detach()) : std::nullopt;
  const auto dtype = kernel_dtype(hidden.scalar_type(), op);
  const auto mask = effective_mask(mask_arg, b_in, b_out);
  const bool need_x = mask[0], need_win = mask[1], need_wout = mask[2], need_w = mask[3], need_bin = mask[4],
             need_bout = mask[5];
  const int64_t T = hidden.size(0), d = hidden.size(1), k = top_k_index.size(1), S = w_in.size(0),
                F = w_in.size(1), ff = w_out.size(2);
  AlignedCuda r = align(top_k_index, top_k_weights, expert_map, S, op);
  const int64_t* off = r.host.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0 || !(need_x || need_win || need_wout || need_w || need_bin || need_bout))
    return masked_ffn_grads(hidden, w_in, w_out, top_k_weights, b_in, b_out, mask);
  void* stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();

  const at::Tensor rows = r.sorted_tokens.narrow(0, 0, pairs);
  const at::Tensor x = hidden.index_select(0, rows);    // [pairs, d] by slot
  const at::Tensor g = grad_out.index_select(0, rows);  // [pairs, d]
  int64_t max_rows = 0;
  for (int64_t s = 0; s < S; ++s) max_rows = std::max(max_rows, off[s + 1] - off[s]);
  const auto opts = hidden.options();
  const bool need_dh = need_x || need_win || need_bin, need_p = need_dh || need_w;  // grad_W_out alone needs no P
  at::Tensor h_buf = at::empty({max_rows, F}, opts);
  at::Tensor p_buf = need_p ? at::empty({max_rows, ff}, opts) : at::Tensor();
  at::Tensor wa_buf = need_wout ? at::empty({max_rows, ff}, opts) : at::Tensor();
  at::Tensor dx = need_x ? at::empty({pairs, d}, opts) : at::Tensor();
  at::Tensor row_grads = need_w ? at::empty({pairs}, opts.dtype(at::kFloat)) : at::Tensor();
  at::Tensor g_win = need_win ? at::empty({S, F, d}, opts) : at::empty({0}, opts);
  at::Tensor g_wout = need_wout ? at::empty({S, d, ff}, opts) : at::empty({0}, opts);
  at::Tensor g_bin = need_bin ? at::empty({S, F}, opts) : at::empty({0}, opts);
  at::Tensor g_bout = need_bout ? at::empty({S, d}, opts) : at::empty({0}, opts);
  // the rows' summed weights in the GEMM dtype, for grad_b_out = G^T w
  const at::Tensor w_rows = need_bout ? r.weights.narrow(0, 0, pairs).to(hidden.scalar_type()) : at::Tensor();
  // the routing weights' gradient includes <G_r, b_out[s]>: the kernel reads G's rows and the bias
  const bool bias_in_row_grad = need_w && b_out.has_value();
  const at::Tensor b_out_c = bias_in_row_grad ? b_out->contiguous() : at::Tensor();
  try {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = off[s + 1] - off[s];
      if (n == 0) {  // a slot no token reached: zero weight gradients
        if (need_win) g_win.select(0, s).zero_();
        if (need_wout) g_wout.select(0, s).zero_();
        if (need_bin) g_bin.select(0, s).zero_();
        if (need_bout) g_bout.select(0, s).zero_();
        continue;
      }
      const at::Tensor x_s = x.narrow(0, off[s], n), g_s = g.narrow(0, off[s], n);
      const at::Tensor win_s = w_in.select(0, s), wout_s = w_out.select(0, s);
      at::Tensor h = h_buf.narrow(0, 0, n);
      if (b_in) {
        at::addmm_out(h, b_in->select(0, s), x_s, win_s.t());
      } else {
        at::mm_out(h, x_s, win_s.t());
      }
      at::Tensor p = need_p ? p_buf.narrow(0, 0, n) : at::Tensor();
      if (need_p) at::mm_out(p, g_s, wout_s);
      at::Tensor wa = need_wout ? wa_buf.narrow(0, 0, n) : at::Tensor();
      moe::act_backward_cuda(h.data_ptr(), h.stride(0), need_p ? p.data_ptr() : nullptr,
                             r.weights.data_ptr<float>() + off[s],
                             need_wout ? wa.data_ptr() : nullptr,
                             need_w ? row_grads.data_ptr<float>() + off[s] : nullptr, need_dh, n, ff, act.fn,
                             act.gated, static_cast<float>(act.alpha), static_cast<float>(act.limit),
                             bias_in_row_grad ? g_s.data_ptr() : nullptr, g_s.stride(0),
                             bias_in_row_grad ? b_out_c.select(0, s).data_ptr() : nullptr, d, dtype,
                             stream);
      if (need_wout) {
        at::Tensor g_wout_s = g_wout.select(0, s);
        at::mm_out(g_wout_s, g_s.t(), wa);
      }
      if (need_bout) {
        at::Tensor g_bout_s = g_bout.select(0, s);
        at::mv_out(g_bout_s, g_s.t(), w_rows.narrow(0, off[s], n));
      }
      if (need_bin) {
        at::Tensor g_bin_s = g_bin.select(0, s);
        at::sum_out(g_bin_s, h, {0});
      }
      if (need_win) {
        at::Tensor g_win_s = g_win.select(0, s);
        at::mm_out(g_win_s, h.t(), x_s);
      }
      if (need_x) {
        at::Tensor dx_s = dx.narrow(0, off[s], n);
        at::mm_out(dx_s, h, win_s);
      }
    }
    at::Tensor grad_hidden = at::empty({0}, opts);
    if (need_x) {
      grad_hidden = at::empty({T, d}, opts);
      const at::Tensor ones = at::ones({pairs}, opts.dtype(at::kFloat));
      moe::combine_cuda(dx.data_ptr(), ones.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(), T, k, d,
                        grad_hidden.data_ptr(), dtype, stream);
    }
    at::Tensor grad_weights = at::empty({0}, top_k_weights.options());
    if (need_w) {
      const at::Tensor idx = top_k_index.contiguous(), map = expert_map.contiguous();
      at::Tensor out = at::empty({T, k}, opts.dtype(at::kFloat));
      moe::routing_weight_grads_cuda(idx.data_ptr<int64_t>(), map.data_ptr<int64_t>(), r.offsets.data_ptr<int64_t>(),
                                     r.token_rows.data_ptr<int64_t>(), row_grads.data_ptr<float>(), T, k,
                                     out.data_ptr<float>(), stream);
      grad_weights = out.to(top_k_weights.scalar_type());
    }
    return {grad_hidden, g_win, g_wout, grad_weights, g_bin, g_bout};
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace mcsmoe::ops
