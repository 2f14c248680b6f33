// Jonker-Volgenant linear assignment on the CPU. One call solves one problem; the op layer runs
// problems of a batch in parallel. The phases live in lap_dense.h (column reduction, row reduction,
// shortest augmenting paths) and lap_sparse.h (the candidate-set phase of large square problems),
// their row kernels in lap_rows.h; lap.h states the invariants every phase keeps.
#include "lap.h"

#include <cstdint>
#include <utility>
#include <vector>

#include "lap_dense.h"
#include "lap_sparse.h"

namespace mcsmoe::lap {

template <typename T>
bool all_finite(const T* data, int64_t count) {
  // x * 0 is 0 for finite x and NaN for inf or NaN: one vectorized pass, no branches
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < count; ++i) acc += data[i] * T(0);
  return acc == T(0);
}

template <typename T>
void solve_cpu(const T* cost, int64_t n, int64_t m, double sign, int64_t* col4row, SolveOptions options) {
  if (n == 0) return;
  cpu::Problem<T> p(cost, n, m, sign);
  const bool sparse = n == m && n >= options.sparse_min_size && options.sparse_k > 0 && options.sparse_k < m;
  std::vector<double> scratch(m);
  std::vector<int32_t> free_rows;
  if (n == m) p.column_reduction(scratch);
  for (int64_t i = 0; i < n; ++i)
    if (p.col_of_row[i] < 0) free_rows.push_back(static_cast<int32_t>(i));
  if (!sparse)  // the sparse phase runs its own row reduction, over candidate edges
    free_rows = p.augmenting_row_reduction(std::move(free_rows), scratch, 2);
  std::vector<double> shadow(m);
  std::vector<int32_t> free_cols;
  std::vector<int64_t> pred(m);
  std::vector<std::pair<int32_t, double>> scanned;
  scanned.reserve(m);
  if (sparse) free_rows = cpu::SparsePhase<T>(p).run(free_rows, options.sparse_k, pred, scanned);
  for (int32_t f : free_rows) p.shortest_augmenting_path(f, scratch, pred, shadow, free_cols, scanned);
  for (int64_t i = 0; i < n; ++i) col4row[i] = p.col_of_row[i];
}

template bool all_finite<float>(const float*, int64_t);
template bool all_finite<double>(const double*, int64_t);
template void solve_cpu<float>(const float*, int64_t, int64_t, double, int64_t*, SolveOptions);
template void solve_cpu<double>(const double*, int64_t, int64_t, double, int64_t*, SolveOptions);

}  // namespace mcsmoe::lap
