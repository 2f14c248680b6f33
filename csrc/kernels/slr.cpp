// CPU side of kernels/slr.h.
#include "kernels/slr.h"

#include <cstring>

namespace mcsmoe::slr {

RowIdxStatus check_row_idx(const int64_t* row_idx, int64_t K, int64_t out, unsigned char* seen) {
  if (out > 0) std::memset(seen, 0, static_cast<size_t>(out));
  for (int64_t j = 0; j < K; ++j) {
    const int64_t r = row_idx[j];
    if (r < 0 || r >= out) return {1, j, r};
    if (seen[r]) return {2, j, r};
    seen[r] = 1;
  }
  return {};
}

}  // namespace mcsmoe::slr
