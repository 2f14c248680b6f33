// GPU side of kernels/slr.h: adding the kept rows' products into their output columns (one thread per
// (token, kept row): distinct row indices make every write distinct), and the row index check, for one
// list of rows or for a bank's per-slot lists in one pass (check_row_idx_slots_cuda).
#include <climits>
#include <stdexcept>
#include <type_traits>

#include "kernels/cuda_dispatch.cuh"
#include "kernels/slr.h"

namespace mcsmoe::slr {
namespace {

constexpr const char* kOp = "sparse_lowrank_linear";

template <typename T>
__global__ void add_kept_rows_kernel(T* __restrict__ y, int64_t ldy, const T* __restrict__ z, int64_t ldz,
                                     const int64_t* __restrict__ row_idx, int64_t rows, int64_t K) {
  const int64_t total = rows * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / K, j = i - t * K;
    // fp32 runs the shared step; the half types spell out its float round trip with cuda_dispatch.cuh's
    // load/store (torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__)
    if constexpr (std::is_same_v<T, float>) {
      add_kept_entry<float, float>(y + t * ldy, z + t * ldz, row_idx, j);
    } else {
      T* dst = y + t * ldy + row_idx[j];
      store(dst, load(dst) + load(z + t * ldz + j));
    }
  }
}

__global__ void fill_kernel(int32_t* p, int64_t n, int32_t value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = value;
}

// Slot s owns positions offsets[s] .. offsets[s+1] of row_idx (one slot when offsets is null). The
// slot of position j is the last s < S with offsets[s] <= j: always in [0, S) even for offsets the host
// has not validated yet, so no index below leaves `first` [S * out].
__device__ int64_t slot_of(const int64_t* offsets, int64_t S, int64_t j) {
  if (offsets == nullptr) return 0;
  int64_t lo = 0, hi = S - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= j) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Pass 1: the first position of every (slot, row) (and out-of-range positions into bad).
__global__ void first_position_kernel(const int64_t* row_idx, int64_t K, const int64_t* offsets, int64_t S,
                                      int64_t out, int32_t* first, unsigned long long* bad) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < K;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_idx[j];
    if (r < 0 || r >= out)
      atomicMin(bad, static_cast<unsigned long long>(j));
    else
      atomicMin(first + slot_of(offsets, S, j) * out + r, static_cast<int32_t>(j));
  }
}

// Pass 2: a position that is not its (slot, row)'s first is a duplicate.
__global__ void duplicate_kernel(const int64_t* row_idx, int64_t K, const int64_t* offsets, int64_t S, int64_t out,
                                 const int32_t* first, unsigned long long* bad) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < K;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_idx[j];
    if (r >= 0 && r < out && first[slot_of(offsets, S, j) * out + r] != static_cast<int32_t>(j))
      atomicMin(bad, static_cast<unsigned long long>(j));
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

}  // namespace

void add_kept_rows_cuda(void* y, int64_t ldy, const void* z, int64_t ldz, const int64_t* row_idx, int64_t rows,
                        int64_t K, Dtype dtype, void* stream) {
  if (rows == 0 || K == 0) return;
  const int threads = 256;
  auto s = static_cast<cudaStream_t>(stream);
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    add_kept_rows_kernel<T><<<grid_for(rows * K, threads), threads, 0, s>>>(static_cast<T*>(y), ldy,
                                                                            static_cast<const T*>(z), ldz, row_idx,
                                                                            rows, K);
  });
  cuda_check(cudaGetLastError(), kOp, "add_kept_rows kernel");
}

void check_row_idx_slots_cuda(const int64_t* row_idx, int64_t K, const int64_t* offsets, int64_t S, int64_t out,
                              int32_t* seen, int64_t* status_out, void* stream) {
  if (K >= INT32_MAX) throw std::runtime_error(std::string(kOp) + ": more than 2^31 kept rows");
  if (S < 1) throw std::runtime_error(std::string(kOp) + ": a row index check needs at least one slot");
  auto s = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  // status_out doubles as the scratch word for the lowest bad position (reset before use)
  auto* bad = reinterpret_cast<unsigned long long*>(status_out + 1);
  cuda_check(cudaMemsetAsync(bad, 0xff, sizeof(unsigned long long), s), kOp, "memset");
  if (S * out > 0) fill_kernel<<<grid_for(S * out, threads), threads, 0, s>>>(seen, S * out, INT32_MAX);
  if (K > 0) {
    first_position_kernel<<<grid_for(K, threads), threads, 0, s>>>(row_idx, K, offsets, S, out, seen, bad);
    duplicate_kernel<<<grid_for(K, threads), threads, 0, s>>>(row_idx, K, offsets, S, out, seen, bad);
  }
  status_kernel<<<1, 1, 0, s>>>(row_idx, K, out, bad, status_out);
  cuda_check(cudaGetLastError(), kOp, "row index check kernels");
}

void check_row_idx_cuda(const int64_t* row_idx, int64_t K, int64_t out, int32_t* seen, int64_t* status_out,
                        void* stream) {
  check_row_idx_slots_cuda(row_idx, K, nullptr, 1, out, seen, status_out, stream);
}

}  // namespace mcsmoe::slr
