// The block-per-problem assignment solver's control flow: the order in which the phases of
// lap_phases.h run and where the barriers fall. One source for two drivers: the CUDA kernel
// (lap_cuda.cu, Block = a thread block with __syncthreads and a shuffle + shared-memory argmin) and the
// C++ tests (tests/cpp/test_lap.cpp, Block = NT simulated threads run one after another between
// barriers). A Block provides:
//   nthreads()      threads in the block
//   each(f)         every thread t runs f(t) (no barrier)
//   single(f)       thread 0 runs f() (no barrier)
//   sync()          a barrier
//   finish()        the end of the block's work (lets the host simulation run pending steps)
//   argmin(f)       every thread t computes f(t); returns argmin_combine over all t to every thread
//                   (ends with a barrier, so shared data written before it is visible after it)
//
// Why the barriers suffice: during a path search every thread reads and writes only its own slice
// (j = t, t + NT, ...) of d, pred, scanned and v; row_of_col and v[j0] are read by all threads but
// change only after the search (v by the owner of each column, row_of_col by thread 0 in
// augment_path), and a sync() follows. The owner of the column j0 just scanned marks it, so the
// only reader of scanned[j0] (that same thread, in relax_slice) needs no barrier. Whether the search
// ends (j0 free) is decided from the argmin's `assigned`, read before its barrier: a warp reading
// row_of_col[j0] after it could already see thread 0's augment_path write and search on alone.
#pragma once
#include <cstdint>

#include "lap_phases.h"

namespace mcsmoe::lap {

// One problem's working arrays (per column: v, d, pred, row_of_col, scanned; per row: col_of_row).
struct BlockState {
  double* v;
  double* d;
  int32_t* pred;
  int32_t* row_of_col;
  int32_t* col_of_row;
  uint8_t* scanned;
};

LAP_HD int64_t lap_align_up(int64_t x) { return (x + 15) / 16 * 16; }

// Bytes of one problem's BlockState, each array 16-byte aligned.
LAP_HD int64_t block_state_bytes(int64_t n, int64_t m) {
  return 2 * lap_align_up(m * 8) + 2 * lap_align_up(m * 4) + lap_align_up(n * 4) + lap_align_up(m);
}

// Lays a BlockState out in `base` (16-byte aligned, block_state_bytes(n, m) bytes).
LAP_HD BlockState carve_block_state(unsigned char* base, int64_t n, int64_t m) {
  BlockState s;
  s.v = reinterpret_cast<double*>(base);
  base += lap_align_up(m * 8);
  s.d = reinterpret_cast<double*>(base);
  base += lap_align_up(m * 8);
  s.pred = reinterpret_cast<int32_t*>(base);
  base += lap_align_up(m * 4);
  s.row_of_col = reinterpret_cast<int32_t*>(base);
  base += lap_align_up(m * 4);
  s.col_of_row = reinterpret_cast<int32_t*>(base);
  base += lap_align_up(n * 4);
  s.scanned = base;
  return s;
}

// Solves one problem (n <= m, n >= 1, finite costs): shortest augmenting path from every row in
// turn, starting from column prices v (column minima when square, zero when n < m). Writes
// col4row[n]. `before_row_scan(i)` is a hint the device uses to prefetch cost row i (no-op on host).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Block, typename T>
LAP_HD void solve_block(Block& blk, const T* cost, int64_t n, int64_t m, double sign, const BlockState& s,
                        int64_t* col4row) {
  const int nt = blk.nthreads();
  blk.each([&](int t) {
    prices_slice(t, nt, cost, n, m, sign, s.v);
    for (int64_t j = t; j < m; j += nt) s.row_of_col[j] = -1;
    for (int64_t i = t; i < n; i += nt) s.col_of_row[i] = -1;
  });
  blk.sync();
  for (int64_t f = 0; f < n; ++f) {
    blk.before_row_scan(cost, m, f);
    ArgMin best = blk.argmin(
        [&](int t) { return start_row_slice(t, nt, cost, m, sign, f, s.v, s.row_of_col, s.d, s.pred, s.scanned); });
    for (;;) {
      const int64_t j0 = best.index;  // closest unscanned column; always exists (a free one does)
      // best.assigned was read from row_of_col before the argmin's barrier. Reading row_of_col[j0] here instead
      // races with thread 0's augment_path (which writes row_of_col[j0]) once the other warps have broken out.
      if (!best.assigned) break;  // j0 is free: the path ends here
      const int32_t i = s.row_of_col[j0];  // j0 assigned: nobody writes row_of_col until every thread breaks
      blk.before_row_scan(cost, m, i);
      const double h = cost_at(cost, m, i, j0, sign) - s.v[j0] - best.value;
      blk.each([&](int t) {
        if (j0 % nt == t) s.scanned[j0] = 1;
      });
      best = blk.argmin(
          [&](int t) { return relax_slice(t, nt, cost, m, sign, i, h, s.v, s.row_of_col, s.d, s.pred, s.scanned); });
    }
    const double dmin = best.value;
    blk.each([&](int t) { update_prices_slice(t, nt, m, dmin, s.d, s.scanned, s.v); });
    blk.single([&] { augment_path(f, best.index, s.pred, s.row_of_col, s.col_of_row); });
    blk.sync();
  }
  blk.each([&](int t) {
    for (int64_t i = t; i < n; i += nt) col4row[i] = s.col_of_row[i];
  });
  blk.finish();
}

}  // namespace mcsmoe::lap
