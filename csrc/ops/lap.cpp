// linear_assignment on the CPU: argument checks, then the JV solver on every problem of the batch
// in parallel (at::parallel_for -> torch's OpenMP pool). The contract is scipy's
// linear_sum_assignment: any real dtype, n > m solved transposed, +inf (-inf when maximising) a
// forbidden pair, ValueError on NaN, -inf (+inf when maximising), an infeasible problem or a wrong
// rank, TypeError on a complex or non-numeric dtype.
#include <ATen/Parallel.h>

#include <vector>

#include "kernels/lap.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

// [n, m] or [B, n, m] of any real dtype -> contiguous [B, r, k] float32 or float64 with r <= k: bool and
// integers become float64 (as in scipy), other floating types float32 (exactly); n > m is transposed
// (finish_assignment maps the answer back).
at::Tensor check_assignment_cost(const at::Tensor& cost) {
  TORCH_CHECK_VALUE(cost.dim() == 2 || cost.dim() == 3,
                    "linear_assignment: expected a matrix [n, m] or a batch [B, n, m], got a tensor of rank ",
                    cost.dim());
  const at::ScalarType t = cost.scalar_type();
  const bool integral = at::isIntegralType(t, /*includeBool=*/true);
  TORCH_CHECK_TYPE(integral || (at::isFloatingType(t) && !at::isComplexType(t)),
                   "linear_assignment: cost must be real (floating point, integer or bool), got ", t);
  at::Tensor c = cost.dim() == 2 ? cost.unsqueeze(0) : cost;
  if (integral)
    c = c.to(at::kDouble);
  else if (t != at::kFloat && t != at::kDouble)
    c = c.to(at::kFloat);
  if (c.size(1) > c.size(2)) c = c.transpose(1, 2);
  TORCH_CHECK_VALUE(c.size(2) < (int64_t{1} << 31), "linear_assignment: dimensions must be below 2^31, got ",
                    cost.sizes());
  return c.contiguous();
}

// cols [B, r] of the problem check_assignment_cost made -> the column of each row of `cost` (-1 for
// the rows left without one when n > m), with cost's rank.
at::Tensor finish_assignment(const at::Tensor& cost, at::Tensor cols) {
  const int64_t n = cost.size(-2), m = cost.size(-1);
  if (n > m) {  // cols[b, j] is the row that original column j took
    at::Tensor rows = at::full({cols.size(0), n}, -1, cols.options());
    rows.scatter_(1, cols, at::arange(m, cols.options()).expand_as(cols));
    cols = rows;
  }
  return cost.dim() == 2 ? cols.squeeze(0) : cols;
}

// ValueError for the first problem with invalid entries, else for the first infeasible one.
void check_assignment_status(const std::vector<lap::Status>& status) {
  for (size_t b = 0; b < status.size(); ++b)
    TORCH_CHECK_VALUE(status[b] != lap::Status::Invalid,
                      "linear_assignment: matrix contains invalid numeric entries (NaN, or -inf when minimizing, "
                      "+inf when maximizing) (problem ", b, ")");
  for (size_t b = 0; b < status.size(); ++b)
    TORCH_CHECK_VALUE(status[b] != lap::Status::Infeasible, "linear_assignment: cost matrix is infeasible (problem ",
                      b, "): every assignment uses a forbidden pair (+inf when minimizing, -inf when maximizing)");
}

at::Tensor linear_assignment_cpu(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.device().is_cpu(), "linear_assignment_cpu: cost must be on the CPU");
  at::Tensor c = check_assignment_cost(cost);
  const int64_t batch = c.size(0), n = c.size(1), m = c.size(2);
  at::Tensor out = at::empty({batch, n}, c.options().dtype(at::kLong));
  int64_t* out_p = out.data_ptr<int64_t>();
  const double sign = maximize ? -1.0 : 1.0;
  std::vector<lap::Status> status(batch, lap::Status::Ok);  // each problem is checked by the thread that solves it
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "linear_assignment_cpu", [&] {
    const scalar_t* cost_p = c.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        status[b] = lap::solve_cpu_checked<scalar_t>(cost_p + b * n * m, n, m, sign, out_p + b * n);
    });
  });
  check_assignment_status(status);
  return finish_assignment(cost, out);
}

}  // namespace mcsmoe::ops
