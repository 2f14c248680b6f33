// moe_align on CUDA, and the alignment steps the grouped expert FFN ops on CUDA share (moe_align_cuda.h):
// the alignment kernels (kernels/moe_align_cuda.cu) and one device-to-host copy of the slot offsets (the
// per-slot GEMM sizes), which also reports bad expert ids.
#include <c10/cuda/CUDAGuard.h>

#include "kernels/moe_align.h"
#include "ops/cuda/kernel_call.h"
#include "ops/cuda/moe_align_cuda.h"
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
  call_kernel([&] {
    moe::align_cuda<float>(idx.data_ptr<int64_t>(), w.data_ptr<float>(), map.data_ptr<int64_t>(), T, k, E, S,
                           r.sorted_tokens.data_ptr<int64_t>(), r.offsets.data_ptr<int64_t>(),
                           r.weights.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(),
                           r.dev.data_ptr<int64_t>() + S + 1, workspace.data_ptr(), current_stream(idx.device()));
  });
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

}  // namespace mcsmoe::ops
