// Sparse-plus-low-rank linear y = x (U V + S)^T, the parts that are not GEMMs. Torch-free.
//
// S is zero outside K kept rows: S_rows [K, in] holds them and row_idx [K] names the output row
// (the column of y) each one belongs to. The op computes z = x S_rows^T [T, K] with a GEMM and adds
// column j of z into column row_idx[j] of y. Row indices must be distinct: then every (t, j) writes
// a different element of y, so the GPU needs no atomics and the CPU no ordering.
//
// add_kept_entry is the per-element step, shared by the CPU loop and the CUDA kernel (one thread per
// (t, j)), so the C++ tests check the very code the GPU runs.
#pragma once
#include <cstdint>

#include "kernels/dtype.h"

#if defined(__CUDACC__)
#define SLR_HD __host__ __device__ __forceinline__
#else
#define SLR_HD inline
#endif

namespace mcsmoe::slr {

// y[row_idx[j]] += z[j] for one row of y and of z; the sum is formed in Acc and rounded once.
template <typename T, typename Acc>
SLR_HD void add_kept_entry(T* y_row, const T* z_row, const int64_t* row_idx, int64_t j) {
  T& dst = y_row[row_idx[j]];
  dst = static_cast<T>(static_cast<Acc>(dst) + static_cast<Acc>(z_row[j]));
}

// Every row of y: y [T, *] with row stride ldy, z [T, K] with row stride ldz.
template <typename T, typename Acc>
void add_kept_rows_cpu(T* y, int64_t ldy, const T* z, int64_t ldz, const int64_t* row_idx, int64_t T_rows,
                       int64_t K) {
  for (int64_t t = 0; t < T_rows; ++t)
    for (int64_t j = 0; j < K; ++j) add_kept_entry<T, Acc>(y + t * ldy, z + t * ldz, row_idx, j);
}

// Result of checking row indices: 0 ok, 1 an index outside [0, out), 2 an index seen before.
struct RowIdxStatus {
  int code = 0;
  int64_t where = 0;  // position in row_idx of the first offending entry
  int64_t value = 0;  // its value
};

// Checks K row indices against `out` rows; `seen` is caller-owned scratch of `out` bytes (zeroed here).
RowIdxStatus check_row_idx(const int64_t* row_idx, int64_t K, int64_t out, unsigned char* seen);

#ifdef MCSMOE_WITH_CUDA
// add_kept_rows on the GPU (device pointers; half types add in float).
void add_kept_rows_cuda(void* y, int64_t ldy, const void* z, int64_t ldz, const int64_t* row_idx, int64_t T_rows,
                        int64_t K, Dtype dtype, void* stream);
// check_row_idx on the GPU: `seen` is device scratch of `out` int32 (zeroed here), status_out three
// device int64 (code, where, value) holding the lowest offending position (code 0 when none).
void check_row_idx_cuda(const int64_t* row_idx, int64_t K, int64_t out, int32_t* seen, int64_t* status_out,
                        void* stream);
// check_row_idx_cuda over a bank's per-slot row lists in one pass: slot s owns positions
// offsets[s] .. offsets[s+1] (a device pointer) and its rows must be distinct; `seen` is device scratch
// of S * out int32.
void check_row_idx_slots_cuda(const int64_t* row_idx, int64_t K, const int64_t* offsets, int64_t S, int64_t out,
                              int32_t* seen, int64_t* status_out, void* stream);
#endif

}  // namespace mcsmoe::slr
