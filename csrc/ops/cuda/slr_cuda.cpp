// sparse_lowrank_linear on CUDA. The GEMMs (x V^T, then U; x S_rows^T over the kept rows) go through ATen
// (cuBLAS); kernels/slr_cuda.cu adds the kept rows' products into their output columns and checks row indices
// on the device. Row indices are checked before any kernel uses them (the add kernel indexes with them
// unchecked), with one small device-to-host copy of the check's status.
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>

#include <string>

#include "kernels/slr.h"
#include "ops/cuda/kernel_call.h"
#include "ops/cuda/slr_cuda.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

void raise_row_status(const int64_t* status, int64_t where, int64_t out, const char* op, const std::string& what) {
  TORCH_CHECK_INDEX(status[0] != 1, op, ": ", what, "[", where, "] = ", status[2],
                    " is not an output row in [0, ", out, ")");
  TORCH_CHECK_VALUE(status[0] != 2, op, ": ", what, "[", where, "] = ", status[2],
                    " repeats an earlier row (kept rows must be distinct)");
}

at::Tensor sparse_lowrank_linear_cuda(const at::Tensor& x_arg, const at::Tensor& U_arg, const at::Tensor& V_arg,
                                      const at::Tensor& S_arg, const at::Tensor& row_idx_arg,
                                      const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_lowrank_linear";
  check_slr_args(x_arg, U_arg, V_arg, S_arg, row_idx_arg, bias, op);
  TORCH_CHECK(x_arg.is_cuda(), op, ": expected CUDA tensors, got ", x_arg.device());
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const auto dtype = kernel_dtype(x_arg.scalar_type(), op);
  void* stream = current_stream(x_arg.device());
  // Autograd is registered in Python around this kernel: detach so the inner GEMMs record nothing.
  const at::Tensor U = U_arg.detach(), V = V_arg.detach(), S_rows = S_arg.detach(), row_idx = row_idx_arg.contiguous();
  const int64_t in = x_arg.size(-1), out = U.size(0), K = S_rows.size(0);
  if (K > 0) {  // one copy of the status; nothing to check (and no wait) without kept rows
    at::Tensor status = at::empty({3}, row_idx.options());
    at::Tensor seen = at::empty({out}, row_idx.options().dtype(at::kInt));
    call_kernel([&] {
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
    call_kernel([&] {
      slr::add_kept_rows_cuda(y.data_ptr(), y.stride(0), zs.data_ptr(), zs.stride(0), row_idx.data_ptr<int64_t>(),
                              T, K, dtype, stream);
    });
  }
  auto out_shape = x_arg.sizes().vec();
  out_shape.back() = out;
  return y.view(out_shape);
}

}  // namespace mcsmoe::ops
