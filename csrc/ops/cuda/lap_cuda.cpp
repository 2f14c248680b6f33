// linear_assignment on CUDA: argument checks, a workspace from torch's caching allocator, then the
// block-per-problem kernel (kernels/lap_cuda.cu) on the current stream. Same contract as the CPU op
// (ops/lap.cpp). Forbidden pairs take lap.h's big M: when some entry is not finite, tensor ops find
// invalid entries and each problem's finite range, a float64 copy gets the substituted costs (the
// kernel only ever sees finite costs), and afterwards a gather finds the problems whose optimum uses a
// forbidden pair: those are infeasible.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/lap.h"
#include "ops/cuda/kernel_call.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The signed costs with big M substituted for forbidden pairs, as a contiguous float64 [B, n, m]
// tensor to minimise, and the forbidden mask; ValueError when a problem has invalid entries.
std::pair<at::Tensor, at::Tensor> substitute_forbidden(const at::Tensor& c, bool maximize) {
  const int64_t batch = c.size(0), rows = c.size(1);
  const at::Tensor s = (maximize ? c.neg() : c).to(at::kDouble);
  const at::Tensor finite = at::isfinite(s);
  const at::Tensor forbidden = s == kInf;
  const at::Tensor invalid = (at::isnan(s) | (s == -kInf)).flatten(1).any(1);
  const at::Tensor lo = at::where(finite, s, kInf).flatten(1).amin(1);
  const at::Tensor hi = at::where(finite, s, -kInf).flatten(1).amax(1);
  const at::Tensor stats = at::stack({invalid.to(at::kDouble), lo, hi}).cpu();  // [3, B], one sync
  const double* st = stats.data_ptr<double>();
  std::vector<lap::Status> status(batch, lap::Status::Ok);
  std::vector<double> scale(batch), big(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (st[b] != 0) status[b] = lap::Status::Invalid;
    const lap::BigM bm = lap::big_m(st[batch + b], st[2 * batch + b], rows);
    scale[b] = bm.scale;
    big[b] = bm.big;
  }
  check_assignment_status(status);
  const auto opts = s.options();
  const at::Tensor scale_t = at::tensor(scale, opts.device(at::kCPU)).to(c.device()).view({batch, 1, 1});
  const at::Tensor big_t = at::tensor(big, opts.device(at::kCPU)).to(c.device()).view({batch, 1, 1});
  return {at::where(forbidden, big_t, s * scale_t).contiguous(), forbidden};
}

}  // namespace

at::Tensor linear_assignment_cuda(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.is_cuda(), "linear_assignment_cuda: cost must be a CUDA tensor, got device ", cost.device());
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor c = check_assignment_cost(cost);  // [B, n, m], n <= m, contiguous
  const int64_t batch = c.size(0), n = c.size(1), m = c.size(2);
  TORCH_CHECK_VALUE(batch < (int64_t{1} << 31), "linear_assignment: batch must be below 2^31 on CUDA, got ", batch);
  at::Tensor out = at::empty({batch, n}, c.options().dtype(at::kLong));
  if (batch > 0 && n > 0) {
    double sign = maximize ? -1.0 : 1.0;
    at::Tensor forbidden;  // defined when some entry is not finite
    if (!at::isfinite(c).all().item<bool>()) {
      std::tie(c, forbidden) = substitute_forbidden(c, maximize);
      sign = 1.0;
    }
    const size_t bytes = lap::lap_cuda_workspace_bytes(batch, n, m);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, c.options().dtype(at::kByte));
    void* stream = current_stream(cost.device());
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
    if (forbidden.defined()) {  // the optimum uses a forbidden pair only where none avoids them
      const at::Tensor used = forbidden.gather(2, out.unsqueeze(2)).flatten(1).any(1).cpu();
      const bool* u = used.data_ptr<bool>();
      std::vector<lap::Status> status(batch, lap::Status::Ok);
      for (int64_t b = 0; b < batch; ++b)
        if (u[b]) status[b] = lap::Status::Infeasible;
      check_assignment_status(status);
    }
  }
  return finish_assignment(cost, out);
}

}  // namespace mcsmoe::ops
