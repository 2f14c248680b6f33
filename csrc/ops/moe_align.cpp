// moe_align on the CPU, and the argument checks every MoE op shares (CPU and CUDA).
#include "kernels/moe_align.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

void check_moe_routing(const at::Tensor& top_k_index, const at::Tensor& top_k_weights, const at::Tensor& expert_map,
                       int64_t num_slots, const char* op) {
  TORCH_CHECK(top_k_index.dim() == 2 && top_k_index.scalar_type() == at::kLong, op,
              ": top_k_index must be an int64 tensor [T, k], got ", top_k_index.scalar_type(), " of shape ",
              top_k_index.sizes());
  TORCH_CHECK(top_k_weights.sizes() == top_k_index.sizes(), op, ": top_k_weights must have top_k_index's shape ",
              top_k_index.sizes(), ", got ", top_k_weights.sizes());
  TORCH_CHECK(at::isFloatingType(top_k_weights.scalar_type()), op, ": top_k_weights must be floating point, got ",
              top_k_weights.scalar_type());
  TORCH_CHECK(expert_map.dim() == 1 && expert_map.scalar_type() == at::kLong, op,
              ": expert_map must be an int64 tensor [E], got ", expert_map.scalar_type(), " of shape ",
              expert_map.sizes());
  TORCH_CHECK(num_slots >= 1, op, ": need at least one expert slot, got ", num_slots);
  TORCH_CHECK(top_k_weights.device() == top_k_index.device() && expert_map.device() == top_k_index.device(), op,
              ": top_k_index, top_k_weights and expert_map must be on one device, got ", top_k_index.device(), ", ",
              top_k_weights.device(), " and ", expert_map.device());
}

void check_align_status(const moe::AlignStatus& st, int64_t k, int64_t E, int64_t S, const char* op) {
  TORCH_CHECK(st.code != 1, op, ": top_k_index[", st.where / k, ", ", st.where % k, "] = ", st.value,
              " is not an expert id in [-1, ", E, ") (-1 means no expert)");
  TORCH_CHECK(st.code != 2, op, ": expert_map[", st.where, "] = ", st.value, " is not a slot in [0, ", S, ")");
}

std::vector<at::Tensor> moe_align_cpu_impl(const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                                           const at::Tensor& expert_map, int64_t num_slots, at::ScalarType acc,
                                           const char* op) {
  TORCH_CHECK(top_k_index.device().is_cpu(), op, ": expected CPU tensors, got ", top_k_index.device());
  const int64_t T = top_k_index.size(0), k = top_k_index.size(1), E = expert_map.size(0), S = num_slots;
  at::Tensor idx = top_k_index.contiguous(), map = expert_map.contiguous();
  at::Tensor w = top_k_weights.scalar_type() == at::kDouble ? top_k_weights.contiguous()
                                                             : top_k_weights.to(at::kFloat).contiguous();
  auto long_opts = idx.options();
  at::Tensor sorted_tokens = at::empty({T * k}, long_opts), offsets = at::empty({S + 1}, long_opts);
  at::Tensor sorted_weights = at::empty({T * k}, w.options().dtype(acc));
  at::Tensor token_rows = at::empty({T, k}, long_opts);
  moe::AlignStatus st;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "moe_align_cpu_in", [&] {
    using IW = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "moe_align_cpu_acc", [&] {
      st = moe::align_cpu<IW, scalar_t>(idx.data_ptr<int64_t>(), w.data_ptr<IW>(), map.data_ptr<int64_t>(), T, k, E, S,
                                        sorted_tokens.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                        sorted_weights.data_ptr<scalar_t>(), token_rows.data_ptr<int64_t>());
    });
  });
  check_align_status(st, k, E, S, op);
  return {sorted_tokens, offsets, sorted_weights, token_rows};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& top_k_index,
                                                                         const at::Tensor& top_k_weights,
                                                                         const at::Tensor& expert_map,
                                                                         int64_t num_slots) {
  check_moe_routing(top_k_index, top_k_weights, expert_map, num_slots, "moe_align");
  auto acc = top_k_weights.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto r = moe_align_cpu_impl(top_k_index, top_k_weights, expert_map, num_slots, acc, "moe_align");
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace mcsmoe::ops
