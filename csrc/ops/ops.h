// ATen-facing op implementations, one function per (op, device). Registered in bindings.cpp.
#pragma once
#include <ATen/ATen.h>

namespace mcsmoe::ops {

at::Tensor linear_assignment_cpu(const at::Tensor& cost, bool maximize);
#ifdef MCSMOE_WITH_CUDA
at::Tensor linear_assignment_cuda(const at::Tensor& cost, bool maximize);
#endif

// Shared argument checks; return the cost as a contiguous [B, n, m] tensor.
at::Tensor check_assignment_cost(const at::Tensor& cost);

}  // namespace mcsmoe::ops
