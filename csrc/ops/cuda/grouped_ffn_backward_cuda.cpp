// grouped_expert_ffn_backward on CUDA: the forward's alignment (moe_align_cuda.h: kernels plus one copy of the
// slot offsets to the host), the routed rows of hidden and grad_out gathered by slot, then per slot s
// (n rows X, G, summed weights w; slot_backward):
//   H = X W_in[s]^T + b_in[s], P = G W_out[s]            (at::mm / at::addmm -> cuBLAS)
//   act_backward_cuda: row grads <P_r, A_r> + <G_r, b_out[s]>, w A, dH in place of H  (one fused
//   elementwise pass, float math)
//   grad_W_out[s] = G^T (w A), grad_W_in[s] = dH^T X, dX = dH W_in[s], grad_b_out[s] = G^T w   (cuBLAS)
//   grad_b_in[s] = sum of dH's rows (at::sum, float accumulation)
// and finally each token's dX rows summed (the forward's combine kernel with unit weights) and each top-k
// entry's weight gradient read from its slot's row (finish). Contract as grouped_expert_ffn_backward_cpu.
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "kernels/grouped_ffn.h"
#include "kernels/grouped_ffn_backward.h"
#include "ops/cuda/kernel_call.h"
#include "ops/cuda/moe_align_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {
namespace {

// One call's backward on the device: its inputs, the routed rows by slot, scratch for the largest slot and
// the gradients it fills.
struct CudaPass {
  Activation act;
  FfnNeeds need;
  at::Tensor w_in, w_out;
  std::optional<at::Tensor> b_in;
  at::Tensor b_out_c;        // b_out, contiguous, when the routing weights' gradient reads it (else undefined)
  at::Tensor x, g, w_rows;   // hidden and grad_out rows [pairs, d] by slot; summed weights in the GEMM dtype
  at::Tensor h_buf, p_buf, wa_buf;  // [max_rows, F], [max_rows, ff] (when P is needed), [max_rows, ff]
  at::Tensor dx, row_grads;  // dX [pairs, d], the routing weights' row gradients [pairs] (float32)
  SlotGrads grads;
  Dtype dtype;
  void* stream;
};

// The gradients from the n rows of slot s starting at row `begin`; `weights` are the alignment's summed
// routing weights (float32, [pairs]).
void slot_backward(CudaPass& pass, const at::Tensor& weights, int64_t s, int64_t begin, int64_t n) {
  const FfnNeeds& need = pass.need;
  const at::Tensor x_s = pass.x.narrow(0, begin, n), g_s = pass.g.narrow(0, begin, n);
  const at::Tensor win_s = pass.w_in.select(0, s), wout_s = pass.w_out.select(0, s);
  at::Tensor h = pass.h_buf.narrow(0, 0, n);
  if (pass.b_in) {
    at::addmm_out(h, pass.b_in->select(0, s), x_s, win_s.t());
  } else {
    at::mm_out(h, x_s, win_s.t());
  }
  at::Tensor p = need.p() ? pass.p_buf.narrow(0, 0, n) : at::Tensor();
  if (need.p()) at::mm_out(p, g_s, wout_s);
  at::Tensor wa = need.w_out ? pass.wa_buf.narrow(0, 0, n) : at::Tensor();
  const bool bias_in_row_grad = pass.b_out_c.defined();
  call_kernel([&] {
    moe::act_backward_cuda(h.data_ptr(), h.stride(0), need.p() ? p.data_ptr() : nullptr,
                           weights.data_ptr<float>() + begin, need.w_out ? wa.data_ptr() : nullptr,
                           need.weights ? pass.row_grads.data_ptr<float>() + begin : nullptr, need.dh(), n,
                           pass.w_out.size(2), pass.act.fn, pass.act.gated, static_cast<float>(pass.act.alpha),
                           static_cast<float>(pass.act.limit), bias_in_row_grad ? g_s.data_ptr() : nullptr,
                           g_s.stride(0), bias_in_row_grad ? pass.b_out_c.select(0, s).data_ptr() : nullptr,
                           pass.x.size(1), pass.dtype, pass.stream);
  });
  SlotGrads& gr = pass.grads;
  if (need.w_out) {
    at::Tensor g_wout_s = gr.w_out.select(0, s);
    at::mm_out(g_wout_s, g_s.t(), wa);
  }
  if (need.b_out) {
    at::Tensor g_bout_s = gr.b_out.select(0, s);
    at::mv_out(g_bout_s, g_s.t(), pass.w_rows.narrow(0, begin, n));
  }
  if (need.b_in) {
    at::Tensor g_bin_s = gr.b_in.select(0, s);
    at::sum_out(g_bin_s, h, {0});
  }
  if (need.w_in) {
    at::Tensor g_win_s = gr.w_in.select(0, s);
    at::mm_out(g_win_s, h.t(), x_s);
  }
  if (need.x) {
    at::Tensor dx_s = pass.dx.narrow(0, begin, n);
    at::mm_out(dx_s, h, win_s);
  }
}

// After every slot: grad_hidden (each token's dX rows summed: the forward's combine with unit weights) and
// the routing weights' gradient per top-k entry.
FfnGrads finish(const CudaPass& pass, const AlignedCuda& r, const at::Tensor& top_k_index,
                const at::Tensor& expert_map, const at::Tensor& top_k_weights) {
  const int64_t T = top_k_index.size(0), k = top_k_index.size(1), d = pass.x.size(1), pairs = pass.x.size(0);
  const auto opts = pass.x.options();
  at::Tensor grad_hidden = at::empty({0}, opts);
  if (pass.need.x) {
    grad_hidden = at::empty({T, d}, opts);
    const at::Tensor ones = at::ones({pairs}, opts.dtype(at::kFloat));
    call_kernel([&] {
      moe::combine_cuda(pass.dx.data_ptr(), ones.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(), T, k, d,
                        grad_hidden.data_ptr(), pass.dtype, pass.stream);
    });
  }
  at::Tensor grad_weights = at::empty({0}, top_k_weights.options());
  if (pass.need.weights) {
    const at::Tensor idx = top_k_index.contiguous(), map = expert_map.contiguous();
    at::Tensor out = at::empty({T, k}, opts.dtype(at::kFloat));
    call_kernel([&] {
      moe::routing_weight_grads_cuda(idx.data_ptr<int64_t>(), map.data_ptr<int64_t>(), r.offsets.data_ptr<int64_t>(),
                                     r.token_rows.data_ptr<int64_t>(), pass.row_grads.data_ptr<float>(), T, k,
                                     out.data_ptr<float>(), pass.stream);
    });
    grad_weights = out.to(top_k_weights.scalar_type());
  }
  return {grad_hidden, pass.grads.w_in, pass.grads.w_out, grad_weights, pass.grads.b_in, pass.grads.b_out};
}

}  // namespace

FfnGrads grouped_expert_ffn_backward_cuda(const at::Tensor& grad_out_arg, const at::Tensor& hidden_arg,
                                          const at::Tensor& w_in_arg, const at::Tensor& w_out_arg,
                                          const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                          const at::Tensor& top_k_weights_arg, c10::string_view activation,
                                          std::array<bool, 6> mask_arg, const std::optional<at::Tensor>& b_in_arg,
                                          const std::optional<at::Tensor>& b_out_arg, double alpha, double limit,
                                          const std::optional<at::Tensor>& /*h_rows: recomputed here*/) {
  const char* op = "grouped_expert_ffn_backward";
  const Activation act =
      check_grouped_ffn_backward_args(grad_out_arg, hidden_arg, w_in_arg, w_out_arg, expert_map, top_k_index,
                                      top_k_weights_arg, activation, b_in_arg, b_out_arg, alpha, limit);
  TORCH_CHECK(hidden_arg.is_cuda(), op, ": expected CUDA tensors, got ", hidden_arg.device());
  refuse_interleaved(act, "grouped_expert_ffn_backward on CUDA");
  const c10::cuda::CUDAGuard guard(hidden_arg.device());
  const at::Tensor grad_out = grad_out_arg.detach(), hidden = hidden_arg.detach(), w_in = w_in_arg.detach(),
                   w_out = w_out_arg.detach(), top_k_weights = top_k_weights_arg.detach();
  const std::optional<at::Tensor> b_in = b_in_arg ? std::optional(b_in_arg->detach()) : std::nullopt;
  const std::optional<at::Tensor> b_out = b_out_arg ? std::optional(b_out_arg->detach()) : std::nullopt;
  const auto dtype = kernel_dtype(hidden.scalar_type(), op);
  const FfnNeeds need(mask_arg, b_in, b_out);
  const int64_t d = hidden.size(1), S = w_in.size(0), F = w_in.size(1), ff = w_out.size(2);
  AlignedCuda r = align(top_k_index, top_k_weights, expert_map, S, op);
  const int64_t* off = r.host.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0 || !need.any())
    return masked_ffn_grads(hidden, w_in, w_out, top_k_weights, b_in, b_out, mask_arg, /*weights_layout=*/false);

  const at::Tensor rows = r.sorted_tokens.narrow(0, 0, pairs);
  int64_t max_rows = 0;
  for (int64_t s = 0; s < S; ++s) max_rows = std::max(max_rows, off[s + 1] - off[s]);
  const auto opts = hidden.options();
  // the routing weights' gradient includes <G_r, b_out[s]>: the kernel reads G's rows and the bias
  const bool bias_in_row_grad = need.weights && b_out.has_value();
  CudaPass pass{act, need, w_in, w_out, b_in, bias_in_row_grad ? b_out->contiguous() : at::Tensor(),
                hidden.index_select(0, rows), grad_out.index_select(0, rows),  // [pairs, d] by slot
                // the rows' summed weights in the GEMM dtype, for grad_b_out = G^T w
                need.b_out ? r.weights.narrow(0, 0, pairs).to(hidden.scalar_type()) : at::Tensor(),
                at::empty({max_rows, F}, opts), need.p() ? at::empty({max_rows, ff}, opts) : at::Tensor(),
                need.w_out ? at::empty({max_rows, ff}, opts) : at::Tensor(),
                need.x ? at::empty({pairs, d}, opts) : at::Tensor(),
                need.weights ? at::empty({pairs}, opts.dtype(at::kFloat)) : at::Tensor(),
                SlotGrads(need, w_in, w_out, /*weights_layout=*/false), dtype, current_stream(hidden.device())};
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = off[s + 1] - off[s];
    if (n == 0) {
      pass.grads.zero_slot(s);  // a slot no token reached: zero weight gradients
    } else {
      slot_backward(pass, r.weights, s, off[s], n);
    }
  }
  return finish(pass, r, top_k_index, expert_map, top_k_weights);
}

}  // namespace mcsmoe::ops
