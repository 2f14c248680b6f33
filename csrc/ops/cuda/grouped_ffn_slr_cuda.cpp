// grouped_expert_ffn_slr on CUDA: the grouped expert FFN over compressed slots. Per slot, sparse-plus-low-rank
// products (GEMMs through ATen/cuBLAS, the kept rows added by kernels/slr_cuda.cu) around the activation
// (kernels/grouped_ffn_cuda.cu's fused gated kernel), then the forward's combine kernel. Both banks' row
// indices are checked on the device before any kernel uses them, and their offsets and statuses travel back
// in the routing alignment's one device-to-host copy (moe_align_cuda.h), so the op waits on the device once,
// as the dense op does.
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/grouped_ffn.h"
#include "kernels/slr.h"
#include "ops/cuda/kernel_call.h"
#include "ops/cuda/moe_align_cuda.h"
#include "ops/cuda/slr_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {
namespace {

constexpr const char* kOp = "grouped_expert_ffn_slr";

// The two banks, [U, V, S_rows, row_idx, row_offsets] each (detached: an inference op; contiguous), and the
// host copies of their checked row offsets.
struct Banks {
  std::vector<at::Tensor> in, out;
  std::vector<int64_t> off_in, off_out;
};

// A contiguous [n, m] matrix at the start of a flat scratch buffer.
at::Tensor scratch(const at::Tensor& buf, int64_t n, int64_t m) { return buf.narrow(0, 0, n * m).view({n, m}); }

// y [n, out] (rows contiguous) = x (U V + S)^T, written in place; row_idx: device pointer to S_rows.size(0)
// checked rows. z_buf and zs_buf are flat scratch of at least n * r and n * K elements.
void slr_linear_into(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& S_rows,
                     const int64_t* row_idx, const std::optional<at::Tensor>& bias, at::Tensor y,
                     const at::Tensor& z_buf, const at::Tensor& zs_buf, Dtype dtype, void* stream) {
  const int64_t n = x.size(0), r = U.size(1), K = S_rows.size(0);
  at::Tensor z = scratch(z_buf, n, r);
  at::mm_out(z, x, V.t());
  if (bias)
    at::addmm_out(y, *bias, z, U.t());
  else
    at::mm_out(y, z, U.t());  // r = 0: ATen writes zeros
  if (K == 0 || n == 0) return;
  at::Tensor zs = scratch(zs_buf, n, K);
  at::mm_out(zs, x, S_rows.t());
  call_kernel(
      [&] { slr::add_kept_rows_cuda(y.data_ptr(), y.stride(0), zs.data_ptr(), K, row_idx, n, K, dtype, stream); });
}

// The host copy of a bank's offsets, checked as checked_offsets (grouped_ffn_slr.cpp) does on the CPU, and the
// bank's row status (lowest offending position in the whole row_idx) raised with its slot and entry.
std::vector<int64_t> host_offsets(const int64_t* offsets, const int64_t* status, int64_t S, int64_t K, int64_t out,
                                  const char* name) {
  std::vector<int64_t> off(offsets, offsets + S + 1);
  TORCH_CHECK(off[0] == 0 && off[S] == K, kOp, ": ", name, " row_offsets must start at 0 and end at ", K, ", got ",
              off[0], " and ", off[S]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(off[s] <= off[s + 1], kOp, ": ", name, " row_offsets must not decrease, got ", off[s], " then ",
                off[s + 1]);
  if (K > 0 && status[0] != 0) {  // K > 0: S >= 1 and the device check ran
    const int64_t j = status[1];
    const int64_t s = std::upper_bound(off.begin(), off.end(), j) - off.begin() - 1;
    raise_row_status(status, j - off[s], out, kOp,
                     std::string(name) + " row_idx of slot " + std::to_string(s) + ", entry ");
  }
  return off;
}

// The routing alignment, with both banks' offsets and row checks carried in its one copy to the host, then
// checked in the CPU op's order: the banks' rows, then the routing. Fills banks.off_in and banks.off_out.
AlignedCuda align_checking_banks(const at::Tensor& hidden, const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                 const at::Tensor& top_k_weights, Banks& banks, void* stream) {
  const std::vector<at::Tensor> &bi = banks.in, &bo = banks.out;
  const int64_t S = bi[0].size(0), d = hidden.size(1), F = bi[0].size(1), K_in = bi[3].size(0),
                K_out = bo[3].size(0);
  // After the alignment's offsets and status, the copy carries: w_in's offsets [S+1], w_out's [S+1],
  // w_in's row status [3], w_out's [3].
  const int64_t base = S + 1 + 3;
  AlignedCuda r = launch_align(top_k_index, top_k_weights, expert_map, S, kOp, 2 * (S + 1) + 6);
  at::Tensor extra = r.dev.narrow(0, base, 2 * (S + 1) + 6);
  extra.narrow(0, 0, S + 1).copy_(bi[4]);
  extra.narrow(0, S + 1, S + 1).copy_(bo[4]);
  int64_t* status = extra.data_ptr<int64_t>() + 2 * (S + 1);
  if (S > 0) {  // S = 0: no slot to check (the host check below requires K = 0 then)
    at::Tensor seen = at::empty({S * std::max(F, d)}, hidden.options().dtype(at::kInt));  // reused: stream order
    call_kernel([&] {
      slr::check_row_idx_slots_cuda(bi[3].data_ptr<int64_t>(), K_in, bi[4].data_ptr<int64_t>(), S, F,
                                    seen.data_ptr<int32_t>(), status, stream);
      slr::check_row_idx_slots_cuda(bo[3].data_ptr<int64_t>(), K_out, bo[4].data_ptr<int64_t>(), S, d,
                                    seen.data_ptr<int32_t>(), status + 3, stream);
    });
  }
  r.host = r.dev.to(at::kCPU);  // the one wait on the device
  const int64_t* h = r.host.data_ptr<int64_t>() + base;
  banks.off_in = host_offsets(h, h + 2 * (S + 1), S, K_in, F, "w_in");
  banks.off_out = host_offsets(h + S + 1, h + 2 * (S + 1) + 3, S, K_out, d, "w_out");
  check_align(r, top_k_index.size(1), expert_map.size(0), S, kOp);
  return r;
}

// y [pairs, d] = each slot's compressed FFN on its rows of x [pairs, d] (off: the alignment's slot offsets).
void run_slots(const at::Tensor& x, const int64_t* off, const Banks& banks, const Activation& act,
               const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out, at::Tensor y,
               Dtype dtype, void* stream) {
  const std::vector<at::Tensor> &bi = banks.in, &bo = banks.out;
  const std::vector<int64_t> &off_in = banks.off_in, &off_out = banks.off_out;
  // a bank is [U [S, out, r], V [S, r, in], ...]: w_out's ff is its V's input width, not its rank
  const int64_t S = bi[0].size(0), F = bi[0].size(1), ff = bo[1].size(2);
  auto row = [](const std::optional<at::Tensor>& b, int64_t s) {
    return b ? std::optional<at::Tensor>(b->select(0, s)) : std::nullopt;
  };
  // Scratch for the largest slot: h [n, F], a [n, ff], z [n, r], zs [n, K of the slot]
  int64_t max_rows = 0, max_kept = 0;
  for (int64_t s = 0; s < S; ++s) {
    max_rows = std::max(max_rows, off[s + 1] - off[s]);
    max_kept = std::max({max_kept, off_in[s + 1] - off_in[s], off_out[s + 1] - off_out[s]});
  }
  const int64_t max_rank = std::max(bi[0].size(2), bo[0].size(2));
  const auto opts = x.options();
  const at::Tensor h_buf = at::empty({max_rows * F}, opts), z_buf = at::empty({max_rows * max_rank}, opts),
                   zs_buf = at::empty({max_rows * max_kept}, opts),
                   a_buf = act.gated ? at::empty({max_rows * ff}, opts) : at::Tensor();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = off[s + 1] - off[s];
    if (n == 0) continue;
    at::Tensor h_s = scratch(h_buf, n, F);
    slr_linear_into(x.narrow(0, off[s], n), bi[0][s], bi[1][s], bi[2].narrow(0, off_in[s], off_in[s + 1] - off_in[s]),
                    bi[3].data_ptr<int64_t>() + off_in[s], row(b_in, s), h_s, z_buf, zs_buf, dtype, stream);
    at::Tensor a = h_s;
    if (act.gated) {
      a = scratch(a_buf, n, ff);
      call_kernel([&] {
        moe::gated_act_cuda(h_s.data_ptr(), F, a.data_ptr(), n, ff, act.fn, static_cast<float>(act.alpha),
                            static_cast<float>(act.limit), dtype, stream);
      });
    } else {
      expert_activation(a, act);  // ATen's in-place op on the device
    }
    slr_linear_into(a, bo[0][s], bo[1][s], bo[2].narrow(0, off_out[s], off_out[s + 1] - off_out[s]),
                    bo[3].data_ptr<int64_t>() + off_out[s], row(b_out, s), y.narrow(0, off[s], n), z_buf, zs_buf,
                    dtype, stream);
  }
}

}  // namespace

at::Tensor grouped_expert_ffn_slr_cuda(const at::Tensor& hidden_arg, at::TensorList w_in, at::TensorList w_out,
                                       const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                       const at::Tensor& top_k_weights, c10::string_view activation,
                                       const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                       double alpha, double limit) {
  const Activation act = check_grouped_ffn_slr_args(hidden_arg, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                                    activation, b_in, b_out, alpha, limit);
  const std::optional<at::Tensor> bias_in = b_in ? std::optional(b_in->detach()) : std::nullopt;
  const std::optional<at::Tensor> bias_out = b_out ? std::optional(b_out->detach()) : std::nullopt;
  TORCH_CHECK(hidden_arg.is_cuda(), kOp, ": expected CUDA tensors, got ", hidden_arg.device());
  const c10::cuda::CUDAGuard guard(hidden_arg.device());
  const auto dtype = kernel_dtype(hidden_arg.scalar_type(), kOp);
  void* stream = current_stream(hidden_arg.device());
  const at::Tensor hidden = hidden_arg.detach();
  Banks banks;
  for (const auto& t : w_in) banks.in.push_back(t.detach().contiguous());
  for (const auto& t : w_out) banks.out.push_back(t.detach().contiguous());
  const int64_t T = hidden.size(0), d = hidden.size(1), S = banks.in[0].size(0), k = top_k_index.size(1);
  const AlignedCuda r = align_checking_banks(hidden, expert_map, top_k_index, top_k_weights, banks, stream);

  const int64_t* off = r.host.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0) return at::zeros({T, d}, hidden.options());
  const at::Tensor x = hidden.index_select(0, r.sorted_tokens.narrow(0, 0, pairs));  // [pairs, d] by slot
  at::Tensor y = at::empty({pairs, d}, hidden.options());
  run_slots(x, off, banks, act, bias_in, bias_out, y, dtype, stream);
  at::Tensor out = at::empty({T, d}, hidden.options());
  call_kernel([&] {
    moe::combine_cuda(y.data_ptr(), r.weights.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(), T, k, d,
                      out.data_ptr(), dtype, stream);
  });
  return out;
}

}  // namespace mcsmoe::ops
