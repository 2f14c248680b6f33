// linear_assignment on CUDA: argument checks, a workspace from torch's caching allocator, then the
// block-per-problem kernel (kernels/lap_cuda.cu) on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <stdexcept>

#include "kernels/lap.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

at::Tensor linear_assignment_cuda(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.is_cuda(), "linear_assignment_cuda: cost must be a CUDA tensor, got device ", cost.device());
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor c = check_assignment_cost(cost, /*check_finite=*/true);  // [B, n, m], contiguous, finite
  const int64_t batch = c.size(0), n = c.size(1), m = c.size(2);
  TORCH_CHECK(batch < (int64_t{1} << 31), "linear_assignment: batch must be below 2^31 on CUDA, got ", batch);
  at::Tensor out = at::empty({batch, n}, c.options().dtype(at::kLong));
  if (batch > 0 && n > 0) {
    const double sign = maximize ? -1.0 : 1.0;
    const size_t bytes = lap::lap_cuda_workspace_bytes(batch, n, m);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, c.options().dtype(at::kByte));
    void* stream = c10::cuda::getCurrentCUDAStream(cost.device().index()).stream();
    try {
      AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "linear_assignment_cuda", [&] {
        lap::solve_cuda<scalar_t>(c.data_ptr<scalar_t>(), batch, n, m, sign, out.data_ptr<int64_t>(),
                                  workspace.data_ptr(), stream);
      });
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, e.what());
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, e.what());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cost.dim() == 2 ? out.squeeze(0) : out;
}

}  // namespace mcsmoe::ops
