// Jonker-Volgenant linear assignment on the CPU. One call solves one problem; the op layer runs
// problems of a batch in parallel. The phases live in lap_dense.h (column reduction, row reduction,
// shortest augmenting paths) and lap_sparse.h (the candidate-set phase of large square problems),
// their row kernels in lap_rows.h; lap.h states the invariants every phase keeps.
#include "lap.h"

#include <algorithm>
#include <cmath>
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

BigM big_m(double lo, double hi, int64_t rows) {
  if (!(lo <= hi)) return {};  // no finite entry: every assignment is forbidden
  const double a = std::max(std::abs(lo), std::abs(hi));
  if (a == 0) return {};  // all finite costs 0: M = 1
  // 2^e >= (3 rows + 4) a / 2^960, from the exponents (the product itself may overflow)
  const int e = std::max(0, std::ilogb(a) + 1 + std::ilogb(3.0 * static_cast<double>(rows) + 4.0) + 1 - 960);
  BigM bm;
  bm.scale = std::ldexp(1.0, -e);
  const double lo_s = lo * bm.scale, hi_s = hi * bm.scale, a_s = a * bm.scale;
  bm.big = hi_s + static_cast<double>(rows + 1) * ((hi_s - lo_s) + a_s);
  return bm;
}

template <typename T>
CostScan scan_costs(const T* cost, int64_t count, double sign) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  CostScan s;
  for (int64_t k = 0; k < count; ++k) {
    const double x = sign * static_cast<double>(cost[k]);
    if (x == kInf) {
      ++s.forbidden;
    } else if (std::isnan(x) || x == -kInf) {
      s.invalid = true;
      return s;
    } else {
      s.lo = std::min(s.lo, x);
      s.hi = std::max(s.hi, x);
    }
  }
  return s;
}

template <typename T>
void substitute_forbidden(const T* cost, int64_t count, double sign, BigM bm, double* out) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < count; ++k) {
    const double x = sign * static_cast<double>(cost[k]);
    out[k] = x == kInf ? bm.big : x * bm.scale;
  }
}

template <typename T>
bool uses_forbidden(const T* cost, int64_t n, int64_t m, double sign, const int64_t* col4row) {
  for (int64_t i = 0; i < n; ++i)
    if (sign * static_cast<double>(cost[i * m + col4row[i]]) == std::numeric_limits<double>::infinity()) return true;
  return false;
}

template <typename T>
Status solve_cpu_checked(const T* cost, int64_t n, int64_t m, double sign, int64_t* col4row, SolveOptions options) {
  if (all_finite(cost, n * m)) {  // the common case: no copy, no second pass
    solve_cpu(cost, n, m, sign, col4row, options);
    return Status::Ok;
  }
  const CostScan scan = scan_costs(cost, n * m, sign);
  if (scan.invalid) return Status::Invalid;
  std::vector<double> work(static_cast<size_t>(n * m));
  substitute_forbidden(cost, n * m, sign, big_m(scan.lo, scan.hi, n), work.data());
  solve_cpu(work.data(), n, m, 1.0, col4row, options);
  return uses_forbidden(cost, n, m, sign, col4row) ? Status::Infeasible : Status::Ok;
}

template bool all_finite<float>(const float*, int64_t);
template bool all_finite<double>(const double*, int64_t);
template void solve_cpu<float>(const float*, int64_t, int64_t, double, int64_t*, SolveOptions);
template void solve_cpu<double>(const double*, int64_t, int64_t, double, int64_t*, SolveOptions);
template CostScan scan_costs<float>(const float*, int64_t, double);
template CostScan scan_costs<double>(const double*, int64_t, double);
template void substitute_forbidden<float>(const float*, int64_t, double, BigM, double*);
template void substitute_forbidden<double>(const double*, int64_t, double, BigM, double*);
template bool uses_forbidden<float>(const float*, int64_t, int64_t, double, const int64_t*);
template bool uses_forbidden<double>(const double*, int64_t, int64_t, double, const int64_t*);
template Status solve_cpu_checked<float>(const float*, int64_t, int64_t, double, int64_t*, SolveOptions);
template Status solve_cpu_checked<double>(const double*, int64_t, int64_t, double, int64_t*, SolveOptions);

}  // namespace mcsmoe::lap
