// What the compressed grouped FFN on CUDA (grouped_ffn_slr_cuda.cpp) shares with sparse_lowrank_linear's
// (slr_cuda.cpp, which defines it).
#pragma once
#include <cstdint>
#include <string>

namespace mcsmoe::ops {

// The errors check_row_idx_cpu raises (IndexError out of range, ValueError repeated), from a device row
// check's status (code, where, value; kernels/slr.h) copied to the host; `where` is the position within `what`.
void raise_row_status(const int64_t* status, int64_t where, int64_t out, const char* op, const std::string& what);

}  // namespace mcsmoe::ops
