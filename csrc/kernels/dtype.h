// The element types the CUDA kernels take (the ops map torch's float32, float16 and bfloat16 onto them;
// cuda_dispatch.cuh maps them onto float, __half and __nv_bfloat16). Torch-free, host-only.
#pragma once

namespace mcsmoe {

enum class Dtype { f32, f16, bf16 };

}  // namespace mcsmoe
