// sparse_lowrank_linear and grouped_expert_ffn_slr on CUDA. The GEMMs (x V^T, then U; x S_rows^T over
// the kept rows) go through ATen (cuBLAS); kernels/slr_cuda.cu adds the kept rows' products into their
// output columns and checks row indices on the device. Row indices are checked before any kernel uses
// them (the add kernel indexes with them unchecked), each op with one small device-to-host copy: the
// linear copies its status; the grouped op sends both banks' offsets and row statuses back in the
// routing alignment's copy (align_cuda.h), so it waits on the device once, as the dense op does.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/moe_ffn.h"
#include "kernels/slr.h"
#include "ops/cuda/align_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {
namespace {

// The kernel launchers throw std::runtime_error (they are torch-free): rethrow as c10::Error.
template <typename F>
void launch(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

slr::Dtype slr_dtype(at::ScalarType t, const char* op) {
  switch (kernel_dtype(t, op)) {  // raises for anything but float32, float16, bfloat16
    case moe::Dtype::f32: return slr::Dtype::f32;
    case moe::Dtype::f16: return slr::Dtype::f16;
    case moe::Dtype::bf16: return slr::Dtype::bf16;
  }
  TORCH_CHECK(false, op, ": unexpected dtype ", t);
}

// The errors check_row_idx_cpu raises, from a device status (code, where, value); `where` is the
// position within `what`.
void raise_row_status(const int64_t* status, int64_t where, int64_t out, const char* op, const std::string& what) {
  TORCH_CHECK_INDEX(status[0] != 1, op, ": ", what, "[", where, "] = ", status[2],
                    " is not an output row in [0, ", out, ")");
  TORCH_CHECK_VALUE(status[0] != 2, op, ": ", what, "[", where, "] = ", status[2],
                    " repeats an earlier row (kept rows must be distinct)");
}

// A contiguous [n, m] matrix at the start of a flat scratch buffer.
at::Tensor scratch(const at::Tensor& buf, int64_t n, int64_t m) { return buf.narrow(0, 0, n * m).view({n, m}); }

// y [n, out] (rows contiguous) = x (U V + S)^T, written in place; row_idx: device pointer to S_rows.size(0)
// checked rows. z_buf and zs_buf are flat scratch of at least n * r and n * K elements.
void slr_linear_into(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& S_rows,
                     const int64_t* row_idx, const std::optional<at::Tensor>& bias, at::Tensor y,
                     const at::Tensor& z_buf, const at::Tensor& zs_buf, slr::Dtype dtype, void* stream) {
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
  launch([&] { slr::add_kept_rows_cuda(y.data_ptr(), y.stride(0), zs.data_ptr(), K, row_idx, n, K, dtype, stream); });
}

// The host copy of a bank's offsets, checked as checked_offsets (slr_ffn.cpp) does on the CPU, and the
// bank's row status (lowest offending position in the whole row_idx) raised with its slot and entry.
std::vector<int64_t> host_offsets(const int64_t* offsets, const int64_t* status, int64_t S, int64_t K, int64_t out,
                                  const char* op, const char* name) {
  std::vector<int64_t> off(offsets, offsets + S + 1);
  TORCH_CHECK(off[0] == 0 && off[S] == K, op, ": ", name, " row_offsets must start at 0 and end at ", K, ", got ",
              off[0], " and ", off[S]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(off[s] <= off[s + 1], op, ": ", name, " row_offsets must not decrease, got ", off[s], " then ",
                off[s + 1]);
  if (K > 0 && status[0] != 0) {  // K > 0: S >= 1 and the device check ran
    const int64_t j = status[1];
    const int64_t s = std::upper_bound(off.begin(), off.end(), j) - off.begin() - 1;
    raise_row_status(status, j - off[s], out, op,
                     std::string(name) + " row_idx of slot " + std::to_string(s) + ", entry ");
  }
  return off;
}

}  // namespace

at::Tensor sparse_lowrank_linear_cuda(const at::Tensor& x_arg, const at::Tensor& U_arg, const at::Tensor& V_arg,
                                      const at::Tensor& S_arg, const at::Tensor& row_idx_arg,
                                      const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_lowrank_linear";
  check_slr_args(x_arg, U_arg, V_arg, S_arg, row_idx_arg, bias, op);
  TORCH_CHECK(x_arg.is_cuda(), op, ": expected CUDA tensors, got ", x_arg.device());
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const auto dtype = slr_dtype(x_arg.scalar_type(), op);
  void* stream = c10::cuda::getCurrentCUDAStream(x_arg.device().index()).stream();
  // Autograd is registered in Python around this kernel: detach so the inner GEMMs record nothing.
  const at::Tensor U = U_arg.detach(), V = V_arg.detach(), S_rows = S_arg.detach(), row_idx = row_idx_arg.contiguous();
  const int64_t in = x_arg.size(-1), out = U.size(0), K = S_rows.size(0);
  if (K > 0) {  // one copy of the status; nothing to check (and no wait) without kept rows
    at::Tensor status = at::empty({3}, row_idx.options());
    at::Tensor seen = at::empty({out}, row_idx.options().dtype(at::kInt));
    launch([&] {
      slr::check_row_idx_cuda(row_idx.data_ptr<int64_t>(), K, out, seen.data_ptr<int32_t>(),
                              status.data_ptr<int64_t>(), stream);
    });
    const at::Tensor host = status.cpu();
    raise_row_status(host.data_ptr<int64_t>(), host.data_ptr<int64_t>()[1], out, op, "row_idx");
  }
  // Rows as the product of the leading sizes: reshape({-1, in}) is ambiguous when in = 0.
  const int64_t T = c10::multiply_integers(x_arg.sizes().begin(), x_arg.sizes().end() - 1);
  const at::Tensor x = x_arg.detach().reshape({T, in});
  const at::Tensor z = at::mm(x, V.t());
  at::Tensor y = bias ? at::addmm(bias->detach(), z, U.t()) : at::mm(z, U.t());  // [T, out], contiguous
  if (K > 0 && T > 0) {
    const at::Tensor zs = at::mm(x, S_rows.t());  // [T, K], contiguous
    launch([&] {
      slr::add_kept_rows_cuda(y.data_ptr(), y.stride(0), zs.data_ptr(), zs.stride(0), row_idx.data_ptr<int64_t>(),
                              T, K, dtype, stream);
    });
  }
  auto out_shape = x_arg.sizes().vec();
  out_shape.back() = out;
  return y.view(out_shape);
}

at::Tensor grouped_expert_ffn_slr_cuda(const at::Tensor& hidden_arg, at::TensorList w_in, at::TensorList w_out,
                                       const at::Tensor& expert_map, const at::Tensor& top_k_index,
                                       const at::Tensor& top_k_weights, c10::string_view activation,
                                       const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                                       double alpha, double limit) {
  const char* op = "grouped_expert_ffn_slr";
  const Activation act = check_slr_ffn_args(hidden_arg, w_in, w_out, expert_map, top_k_index, top_k_weights,
                                            activation, b_in, b_out, alpha, limit);
  const std::optional<at::Tensor> bias_in = b_in ? std::optional(b_in->detach()) : std::nullopt;
  const std::optional<at::Tensor> bias_out = b_out ? std::optional(b_out->detach()) : std::nullopt;
  auto row = [](const std::optional<at::Tensor>& b, int64_t s) {
    return b ? std::optional<at::Tensor>(b->select(0, s)) : std::nullopt;
  };
  TORCH_CHECK(hidden_arg.is_cuda(), op, ": expected CUDA tensors, got ", hidden_arg.device());
  const c10::cuda::CUDAGuard guard(hidden_arg.device());
  const auto mdtype = kernel_dtype(hidden_arg.scalar_type(), op);
  const auto sdtype = slr_dtype(hidden_arg.scalar_type(), op);
  void* stream = c10::cuda::getCurrentCUDAStream(hidden_arg.device().index()).stream();
  const at::Tensor hidden = hidden_arg.detach();
  std::vector<at::Tensor> bi, bo;  // [U, V, S_rows, row_idx, row_offsets], detached (an inference op), contiguous
  for (const auto& t : w_in) bi.push_back(t.detach().contiguous());
  for (const auto& t : w_out) bo.push_back(t.detach().contiguous());
  const int64_t T = hidden.size(0), d = hidden.size(1), S = bi[0].size(0), k = top_k_index.size(1),
                F = bi[0].size(1), ff = bo[0].size(2), K_in = bi[3].size(0), K_out = bo[3].size(0);

  // After the alignment's offsets and status, the copy carries: w_in's offsets [S+1], w_out's [S+1],
  // w_in's row status [3], w_out's [3].
  const int64_t base = S + 1 + 3;
  AlignedCuda r = launch_align(top_k_index, top_k_weights, expert_map, S, op, 2 * (S + 1) + 6);
  at::Tensor extra = r.dev.narrow(0, base, 2 * (S + 1) + 6);
  extra.narrow(0, 0, S + 1).copy_(bi[4]);
  extra.narrow(0, S + 1, S + 1).copy_(bo[4]);
  int64_t* status = extra.data_ptr<int64_t>() + 2 * (S + 1);
  if (S > 0) {  // S = 0: no slot to check (the host check below requires K = 0 then)
    at::Tensor seen = at::empty({S * std::max(F, d)}, hidden.options().dtype(at::kInt));  // reused: stream order
    launch([&] {
      slr::check_row_idx_slots_cuda(bi[3].data_ptr<int64_t>(), K_in, bi[4].data_ptr<int64_t>(), S, F,
                                    seen.data_ptr<int32_t>(), status, stream);
      slr::check_row_idx_slots_cuda(bo[3].data_ptr<int64_t>(), K_out, bo[4].data_ptr<int64_t>(), S, d,
                                    seen.data_ptr<int32_t>(), status + 3, stream);
    });
  }
  r.host = r.dev.to(at::kCPU);  // the one wait on the device
  const int64_t* h = r.host.data_ptr<int64_t>() + base;
  // Same order of checks as the CPU op: the banks' rows, then the routing.
  const auto off_in = host_offsets(h, h + 2 * (S + 1), S, K_in, F, op, "w_in");
  const auto off_out = host_offsets(h + S + 1, h + 2 * (S + 1) + 3, S, K_out, d, op, "w_out");
  check_align(r, k, expert_map.size(0), S, op);

  const int64_t* off = r.host.data_ptr<int64_t>();
  const int64_t pairs = off[S];
  if (pairs == 0 || d == 0) return at::zeros({T, d}, hidden.options());
  const at::Tensor x = hidden.index_select(0, r.sorted_tokens.narrow(0, 0, pairs));  // [pairs, d] by slot
  at::Tensor y = at::empty({pairs, d}, hidden.options());
  // Scratch for the largest slot: h [n, F], a [n, ff], z [n, r], zs [n, K of the slot]
  int64_t max_rows = 0, max_kept = 0;
  for (int64_t s = 0; s < S; ++s) {
    max_rows = std::max(max_rows, off[s + 1] - off[s]);
    max_kept = std::max({max_kept, off_in[s + 1] - off_in[s], off_out[s + 1] - off_out[s]});
  }
  const int64_t max_rank = std::max(bi[0].size(2), bo[0].size(2));
  const auto opts = hidden.options();
  const at::Tensor h_buf = at::empty({max_rows * F}, opts), z_buf = at::empty({max_rows * max_rank}, opts),
                   zs_buf = at::empty({max_rows * max_kept}, opts),
                   a_buf = act.gated ? at::empty({max_rows * ff}, opts) : at::Tensor();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = off[s + 1] - off[s];
    if (n == 0) continue;
    at::Tensor h_s = scratch(h_buf, n, F);
    slr_linear_into(x.narrow(0, off[s], n), bi[0][s], bi[1][s], bi[2].narrow(0, off_in[s], off_in[s + 1] - off_in[s]),
                    bi[3].data_ptr<int64_t>() + off_in[s], row(bias_in, s), h_s, z_buf, zs_buf, sdtype, stream);
    at::Tensor a = h_s;
    if (act.gated) {
      a = scratch(a_buf, n, ff);
      launch([&] {
        moe::gated_act_cuda(h_s.data_ptr(), F, a.data_ptr(), n, ff, act.fn, static_cast<float>(act.alpha),
                            static_cast<float>(act.limit), mdtype, stream);
      });
    } else {
      expert_activation(a, act);  // ATen's in-place op on the device
    }
    slr_linear_into(a, bo[0][s], bo[1][s], bo[2].narrow(0, off_out[s], off_out[s + 1] - off_out[s]),
                    bo[3].data_ptr<int64_t>() + off_out[s], row(bias_out, s), y.narrow(0, off[s], n), z_buf, zs_buf,
                    sdtype, stream);
  }
  at::Tensor out = at::empty({T, d}, opts);
  launch([&] {
    moe::combine_cuda(y.data_ptr(), r.weights.data_ptr<float>(), r.token_rows.data_ptr<int64_t>(), T, k, d,
                      out.data_ptr(), mdtype, stream);
  });
  return out;
}

}  // namespace mcsmoe::ops
