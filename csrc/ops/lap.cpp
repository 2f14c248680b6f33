// linear_assignment on the CPU: argument checks, then the JV solver on every problem of the batch
// in parallel (at::parallel_for -> torch's OpenMP pool).
#include <ATen/Parallel.h>

#include <vector>

#include "kernels/lap.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

at::Tensor check_assignment_cost(const at::Tensor& cost, bool check_finite) {
  TORCH_CHECK(cost.dim() == 2 || cost.dim() == 3,
              "linear_assignment: cost must be [n, m] or [B, n, m], got a tensor of rank ", cost.dim());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "linear_assignment: cost must be float32 or float64, got ", cost.scalar_type());
  at::Tensor c = cost.dim() == 2 ? cost.unsqueeze(0) : cost;
  TORCH_CHECK(c.size(1) <= c.size(2), "linear_assignment: need n <= m (rows <= columns), got cost of shape ",
              cost.sizes(), "; transpose the cost matrix");
  TORCH_CHECK(c.size(1) < (int64_t{1} << 31) && c.size(2) < (int64_t{1} << 31),
              "linear_assignment: dimensions must be below 2^31, got ", cost.sizes());
  TORCH_CHECK(!check_finite || c.numel() == 0 || at::isfinite(c).all().item<bool>(),
              "linear_assignment: cost contains NaN or infinite entries");
  return c.contiguous();
}

at::Tensor linear_assignment_cpu(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.device().is_cpu(), "linear_assignment_cpu: cost must be on the CPU");
  at::Tensor c = check_assignment_cost(cost, /*check_finite=*/false);
  const int64_t batch = c.size(0), n = c.size(1), m = c.size(2);
  at::Tensor out = at::empty({batch, n}, c.options().dtype(at::kLong));
  int64_t* out_p = out.data_ptr<int64_t>();
  const double sign = maximize ? -1.0 : 1.0;
  std::vector<uint8_t> finite(batch, 1);  // each problem is checked by the thread that solves it
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "linear_assignment_cpu", [&] {
    const scalar_t* cost_p = c.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        finite[b] = lap::all_finite(cost_p + b * n * m, n * m);
        if (finite[b]) lap::solve_cpu<scalar_t>(cost_p + b * n * m, n, m, sign, out_p + b * n);
      }
    });
  });
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(finite[b], "linear_assignment: cost contains NaN or infinite entries (problem ", b, ")");
  return cost.dim() == 2 ? out.squeeze(0) : out;
}

}  // namespace mcsmoe::ops
