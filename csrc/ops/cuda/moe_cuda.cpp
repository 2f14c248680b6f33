// moe_align and grouped_expert_ffn on CUDA: alignment kernels (kernels/moe_align_cuda.cu), one
// device-to-host copy of the slot offsets (the per-slot GEMM sizes; this also reports bad expert ids),
// per-slot at::mm / at::addmm with the expert biases (cuBLAS) on contiguous slices, the fused gated
// activation (SwiGLU and the like, GPT-OSS's clamped SwiGLU) and the weighted combine kernels.
// The alignment steps are declared in align_cuda.h: the compressed FFN (slr_cuda.cpp) shares them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <stdexcept>

#include "kernels/moe_align.h"
#include "kernels/moe_ffn.h"
#include "ops/cuda/align_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

AlignedCuda launch_align(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                         int64_t S, const char* op, int64_t extra) {
  const int64_t T = top_k_index.size(0), k = top_k_index.size(1), E = expert_map.size(0);
  TORCH_CHECK(T * k < (int64_t{1} << 31), op, ": T * k must be below 2^31 on CUDA, got ", T * k);
  at::Tensor idx = top_k_index.contiguous(), map = expert_map.contiguous();
  at::Tensor w = top_k_weights.to(at::kFloat).contiguous();
  auto long_opts = idx.options();
  AlignedCuda r;
  r.dev = at::empty({S + 1 + 3 + extra}, long_opts);  // offsets, status, caller's words: one copy back
  r.offsets = r.dev.narrow(0, 0, S + 1);
  r.sorted_tokens = at::empty({T * k}, long_opts);
  r.weights = at::empty({T * k}, w.options());
  r.token_rows = at::empty({T, k}, long_opts);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(moe::align_cuda_workspace_bytes(T, k, S))}, idx.options().dtype(at::kByte));
  void* stream = c10::cuda::getCurrentCUDAStream(idx.device().index()).stream();
  try {
    moe::align_cuda<float>(idx.data_ptr<int64_t>(), w.data_ptr<float>(), map.data_ptr<int64_t>(), T, k, E, S,
                           r.sorted_tokens.data_ptr<int64_t>(), r.offsets.data_ptr<int64_t>(),
                           r.weights.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(),
                           r.dev.data_ptr<int64_t>() + S + 1, workspace.data_ptr(), stream);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  return r;
}

void check_align(const AlignedCuda& r, int64_t k, int64_t E, int64_t S, const char* op) {
  const int64_t* st = r.host.data_ptr<int64_t>() + S + 1;
  moe::AlignStatus status;
  status.code = static_cast<int>(st[0]);
  status.where = st[1];
  status.value = st[2];
  check_align_status(status, k, E, S, op);
}

AlignedCuda align(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                  int64_t S, const char* op) {
  AlignedCuda r = launch_align(top_k_index, top_k_weights, expert_map, S, op);
  r.host = r.dev.to(at::kCPU);  // synchronises with the stream
  check_align(r, top_k_index.size(1), expert_map.size(0), S, op);
  return r;
}

moe::Dtype kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return moe::Dtype::f32;
    case at::kHalf: return moe::Dtype::f16;
    case at::kBFloat16: return moe::Dtype::bf16;
    default: TORCH_CHECK(false, op, ": CUDA supports float32, float16 and bfloat16, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& top_k_index,
                                                                          const at::Tensor& top_k_weights,
                                                                          const at::Tensor& expert_map,
                                                                          int64_t num_slots) {
  check_moe_routing(top_k_index, top_k_weights, expert_map, num_slots, "moe_align");
  TORCH_CHECK(top_k_index.is_cuda(), "moe_align: expected CUDA tensors, got ", top_k_index.device());
  const c10::cuda::CUDAGuard guard(top_k_index.device());
  AlignedCuda r = align(top_k_index, top_k_weights, expert_map, num_slots, "moe_align");
  at::Tensor weights = top_k_weights.scalar_type() == at::kDouble ? r.weights.to(at::kDouble) : r.weights;
  return {r.sorted_tokens, r.offsets.clone(), weights, r.token_rows};
}

at::Tensor grouped_expert_ffn_cuda(const at::Tensor& hidden_arg, const at::Tensor& w_in_arg,
                                   const at::Tensor& w_out_arg, const at::Tensor& expert_map,
                                   const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                   c10::string_view activation, const std::optional<at::Tensor>& b_in_arg,
                                   const std::optional<at::Tensor>& b_out_arg, double alpha, double limit) {
  const Activation act = check_grouped_ffn_args(hidden_arg, w_in_arg, w_out_arg, expert_map, top_k_index,
                                                top_k_weights, activation, b_in_arg, b_out_arg, alpha, limit);
  const bool gated = act.gated;
  TORCH_CHECK(hidden_arg.is_cuda(), "grouped_expert_ffn: expected CUDA tensors, got ", hidden_arg.device());
  const c10::cuda::CUDAGuard guard(hidden_arg.device());
  const at::Tensor hidden = hidden_arg.detach(), w_in = w_in_arg.detach(), w_out = w_out_arg.detach();
  const at::Tensor b_in = b_in_arg ? b_in_arg->detach() : at::Tensor(), b_out = b_out_arg ? b_out_arg->detach() : at::Tensor();
  const auto dtype = kernel_dtype(hidden.scalar_type(), "grouped_expert_ffn");
  const int64_t T = hidden.size(0), d = hidden.size(1), S = w_in.size(0), k = top_k_index.size(1),
                ff = w_out.size(2);
  AlignedCuda r = align(top_k_index, top_k_weights, expert_map, S, "grouped_expert_ffn");
  const int64_t* off = r.host.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0) return at::zeros({T, d}, hidden.options());
  void* stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();

  const at::Tensor x = hidden.index_select(0, r.sorted_tokens.narrow(0, 0, pairs));  // [pairs, d] by slot
  at::Tensor y = at::empty({pairs, d}, hidden.options());
  int64_t max_rows = 0;
  for (int64_t s = 0; s < S; ++s) max_rows = std::max(max_rows, off[s + 1] - off[s]);
  at::Tensor h_buf = at::empty({max_rows, w_in.size(1)}, hidden.options());
  at::Tensor a_buf = gated ? at::empty({max_rows, ff}, hidden.options()) : at::Tensor();
  try {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = off[s + 1] - off[s];
      if (n == 0) continue;
      at::Tensor h = h_buf.narrow(0, 0, n);
      // the biases ride in the GEMMs (addmm's bias, broadcast over the rows): no extra pass
      if (b_in.defined()) {
        at::addmm_out(h, b_in.select(0, s), x.narrow(0, off[s], n), w_in.select(0, s).t());
      } else {
        at::mm_out(h, x.narrow(0, off[s], n), w_in.select(0, s).t());
      }
      at::Tensor a = h;
      if (gated) {
        a = a_buf.narrow(0, 0, n);
        moe::gated_act_cuda(h.data_ptr(), h.stride(0), a.data_ptr(), n, ff, act.fn, static_cast<float>(act.alpha),
                            static_cast<float>(act.limit), dtype, stream);
      } else {
        expert_activation(h, act);  // ATen's in-place op on the device
      }
      at::Tensor y_s = y.narrow(0, off[s], n);
      if (b_out.defined()) {
        at::addmm_out(y_s, b_out.select(0, s), a, w_out.select(0, s).t());
      } else {
        at::mm_out(y_s, a, w_out.select(0, s).t());
      }
    }
    at::Tensor out = at::empty({T, d}, hidden.options());
    moe::combine_cuda(y.data_ptr(), r.weights.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(), T, k, d,
                      out.data_ptr(), dtype, stream);
    return out;
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace mcsmoe::ops
