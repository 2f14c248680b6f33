// GPU side of kernels/slr.h: adding the kept rows' products into their output columns (one thread per
// (token, kept row): distinct row indices make every write distinct), and the row index check.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/slr.h"

namespace mcsmoe::slr {
namespace {

template <typename T>
__global__ void add_kept_rows_kernel(T* __restrict__ y, int64_t ldy, const T* __restrict__ z, int64_t ldz,
                                     const int64_t* __restrict__ row_idx, int64_t rows, int64_t K) {
  const int64_t total = rows * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / K, j = i - t * K;
    // fp32 runs the shared step; the half types spell out its float round trip (torch builds .cu
    // files with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__)
    if constexpr (std::is_same_v<T, float>) {
      add_kept_entry<float, float>(y + t * ldy, z + t * ldz, row_idx, j);
    } else if constexpr (std::is_same_v<T, __half>) {
      __half& dst = y[t * ldy + row_idx[j]];
      dst = __float2half(__half2float(dst) + __half2float(z[t * ldz + j]));
    } else {
      __nv_bfloat16& dst = y[t * ldy + row_idx[j]];
      dst = __float2bfloat16(__bfloat162float(dst) + __bfloat162float(z[t * ldz + j]));
    }
  }
}

__global__ void fill_kernel(int32_t* p, int64_t n, int32_t value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = value;
}

// Pass 1: the first position of every row index (and out-of-range positions into bad).
__global__ void first_position_kernel(const int64_t* row_idx, int64_t K, int64_t out, int32_t* first,
                                      unsigned long long* bad) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < K;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_idx[j];
    if (r < 0 || r >= out)
      atomicMin(bad, static_cast<unsigned long long>(j));
    else
      atomicMin(first + r, static_cast<int32_t>(j));
  }
}

// Pass 2: a position that is not its row's first is a duplicate.
__global__ void duplicate_kernel(const int64_t* row_idx, int64_t K, int64_t out, const int32_t* first,
                                 unsigned long long* bad) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < K;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_idx[j];
    if (r >= 0 && r < out && first[r] != static_cast<int32_t>(j)) atomicMin(bad, static_cast<unsigned long long>(j));
  }
}

// Pass 3 (one thread): the status of the lowest offending position.
__global__ void status_kernel(const int64_t* row_idx, int64_t K, int64_t out, const unsigned long long* bad,
                              int64_t* status) {
  const unsigned long long j = *bad;
  if (j >= static_cast<unsigned long long>(K)) {
    status[0] = 0, status[1] = 0, status[2] = 0;
    return;
  }
  const int64_t r = row_idx[j];
  status[0] = (r < 0 || r >= out) ? 1 : 2;
  status[1] = static_cast<int64_t>(j);
  status[2] = r;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sparse_lowrank_linear: ") + what + ": " + cudaGetErrorString(err));
}

unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 8)));
}

}  // namespace

void add_kept_rows_cuda(void* y, int64_t ldy, const void* z, int64_t ldz, const int64_t* row_idx, int64_t rows,
                        int64_t K, Dtype dtype, void* stream) {
  if (rows == 0 || K == 0) return;
  const int threads = 256;
  auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    add_kept_rows_kernel<T><<<grid_for(rows * K, threads), threads, 0, s>>>(static_cast<T*>(y), ldy,
                                                                            static_cast<const T*>(z), ldz, row_idx,
                                                                            rows, K);
  };
  switch (dtype) {
    case Dtype::f32: launch(static_cast<float*>(nullptr)); break;
    case Dtype::f16: launch(static_cast<__half*>(nullptr)); break;
    case Dtype::bf16: launch(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
  check(cudaGetLastError(), "add_kept_rows kernel");
}

void check_row_idx_cuda(const int64_t* row_idx, int64_t K, int64_t out, int32_t* seen, int64_t* status_out,
                        void* stream) {
  if (K >= INT32_MAX) throw std::runtime_error("sparse_lowrank_linear: more than 2^31 kept rows");
  auto s = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  // status_out doubles as the scratch word for the lowest bad position (reset before use)
  auto* bad = reinterpret_cast<unsigned long long*>(status_out + 1);
  check(cudaMemsetAsync(bad, 0xff, sizeof(unsigned long long), s), "memset");
  if (out > 0) fill_kernel<<<grid_for(out, threads), threads, 0, s>>>(seen, out, INT32_MAX);
  if (K > 0) {
    first_position_kernel<<<grid_for(K, threads), threads, 0, s>>>(row_idx, K, out, seen, bad);
    duplicate_kernel<<<grid_for(K, threads), threads, 0, s>>>(row_idx, K, out, seen, bad);
  }
  status_kernel<<<1, 1, 0, s>>>(row_idx, K, out, bad, status_out);
  check(cudaGetLastError(), "row index check kernels");
}

}  // namespace mcsmoe::slr
