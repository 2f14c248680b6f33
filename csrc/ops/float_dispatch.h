// The floating dtypes the CPU (de)quantization functions take or write (dequant.cpp, quantize.cpp): f is called with
// the tensor's data pointer as float*, c10::BFloat16* or c10::Half*; any other dtype is a ValueError naming it.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace mcsmoe::ops {

template <typename F>
void dispatch_float(const at::Tensor& t, const char* what, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: return f(t.data_ptr<float>());
    case at::kBFloat16: return f(t.data_ptr<c10::BFloat16>());
    case at::kHalf: return f(t.data_ptr<c10::Half>());
    default: TORCH_CHECK_VALUE(false, what, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace mcsmoe::ops
