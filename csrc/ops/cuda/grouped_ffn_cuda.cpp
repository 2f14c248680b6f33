// grouped_expert_ffn on CUDA: the routing alignment (moe_align_cuda.h: kernels plus one copy of the slot
// offsets, the per-slot GEMM sizes), per-slot at::mm / at::addmm with the expert biases (cuBLAS) on
// contiguous slices, the fused gated activation (SwiGLU and the like, GPT-OSS's clamped SwiGLU) and the
// weighted combine kernels (kernels/grouped_ffn_cuda.cu).
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "kernels/grouped_ffn.h"
#include "ops/cuda/kernel_call.h"
#include "ops/cuda/moe_align_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {
namespace {

// y_s [n, d] = act(x_s W_in[s]^T + b_in[s]) W_out[s]^T + b_out[s] for one slot's n rows; h_buf [>= n, F] and,
// gated, a_buf [>= n, ff] are scratch.
void slot_ffn(const at::Tensor& x_s, const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& b_in,
              const at::Tensor& b_out, int64_t s, const Activation& act, const at::Tensor& h_buf,
              const at::Tensor& a_buf, at::Tensor y_s, Dtype dtype, void* stream) {
  const int64_t n = x_s.size(0), ff = w_out.size(2);
  at::Tensor h = h_buf.narrow(0, 0, n);
  // the biases ride in the GEMMs (addmm's bias, broadcast over the rows): no extra pass
  if (b_in.defined()) {
    at::addmm_out(h, b_in.select(0, s), x_s, w_in.select(0, s).t());
  } else {
    at::mm_out(h, x_s, w_in.select(0, s).t());
  }
  at::Tensor a = h;
  if (act.gated) {
    a = a_buf.narrow(0, 0, n);
    call_kernel([&] {
      moe::gated_act_cuda(h.data_ptr(), h.stride(0), a.data_ptr(), n, ff, act.fn, static_cast<float>(act.alpha),
                          static_cast<float>(act.limit), dtype, stream);
    });
  } else {
    expert_activation(h, act);  // ATen's in-place op on the device
  }
  if (b_out.defined()) {
    at::addmm_out(y_s, b_out.select(0, s), a, w_out.select(0, s).t());
  } else {
    at::mm_out(y_s, a, w_out.select(0, s).t());
  }
}

}  // namespace

at::Tensor grouped_expert_ffn_cuda(const at::Tensor& hidden_arg, const at::Tensor& w_in_arg,
                                   const at::Tensor& w_out_arg, const at::Tensor& expert_map,
                                   const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                   c10::string_view activation, const std::optional<at::Tensor>& b_in_arg,
                                   const std::optional<at::Tensor>& b_out_arg, double alpha, double limit) {
  const char* op = "grouped_expert_ffn";
  const Activation act = check_grouped_ffn_args(hidden_arg, w_in_arg, w_out_arg, expert_map, top_k_index,
                                                top_k_weights, activation, b_in_arg, b_out_arg, alpha, limit);
  TORCH_CHECK(hidden_arg.is_cuda(), op, ": expected CUDA tensors, got ", hidden_arg.device());
  refuse_interleaved(act, "grouped_expert_ffn on CUDA");
  const c10::cuda::CUDAGuard guard(hidden_arg.device());
  const at::Tensor hidden = hidden_arg.detach(), w_in = w_in_arg.detach(), w_out = w_out_arg.detach();
  const at::Tensor b_in = b_in_arg ? b_in_arg->detach() : at::Tensor(),
                   b_out = b_out_arg ? b_out_arg->detach() : at::Tensor();
  const auto dtype = kernel_dtype(hidden.scalar_type(), op);
  const int64_t T = hidden.size(0), d = hidden.size(1), S = w_in.size(0), k = top_k_index.size(1),
                ff = w_out.size(2);
  AlignedCuda r = align(top_k_index, top_k_weights, expert_map, S, op);
  const int64_t* off = r.host.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0) return at::zeros({T, d}, hidden.options());
  void* stream = current_stream(hidden.device());

  const at::Tensor x = hidden.index_select(0, r.sorted_tokens.narrow(0, 0, pairs));  // [pairs, d] by slot
  at::Tensor y = at::empty({pairs, d}, hidden.options());
  int64_t max_rows = 0;
  for (int64_t s = 0; s < S; ++s) max_rows = std::max(max_rows, off[s + 1] - off[s]);
  const at::Tensor h_buf = at::empty({max_rows, w_in.size(1)}, hidden.options());
  const at::Tensor a_buf = act.gated ? at::empty({max_rows, ff}, hidden.options()) : at::Tensor();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = off[s + 1] - off[s];
    if (n > 0)
      slot_ffn(x.narrow(0, off[s], n), w_in, w_out, b_in, b_out, s, act, h_buf, a_buf, y.narrow(0, off[s], n), dtype,
               stream);
  }
  at::Tensor out = at::empty({T, d}, hidden.options());
  call_kernel([&] {
    moe::combine_cuda(y.data_ptr(), r.weights.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(), T, k, d,
                      out.data_ptr(), dtype, stream);
  });
  return out;
}

}  // namespace mcsmoe::ops
