// How the CUDA ops call the torch-free kernel launchers (csrc/kernels/*.cu): the launchers' dtype tag for a
// tensor's dtype, the current stream as they take it, and their std::runtime_error rethrown as a torch error.
// Only c10/cuda headers: ATen/cuda does not compile with this toolkit (no cublas_v2.h).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <stdexcept>

#include "kernels/dtype.h"

namespace mcsmoe::ops {

// float32, float16 or bfloat16 as the kernels' Dtype; anything else raises, naming op.
inline Dtype kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, op, ": CUDA supports float32, float16 and bfloat16, got ", t);
  }
}

// The current CUDA stream of `device`, as the launchers' void* stream argument.
inline void* current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// f() (a launcher call); its std::runtime_error (a CUDA error, a size limit) raised as c10::Error with the
// same message.
template <typename F>
void call_kernel(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace mcsmoe::ops
