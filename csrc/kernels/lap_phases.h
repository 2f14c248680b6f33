// The work between two barriers of the block-per-problem assignment solver, as __host__ __device__
// functions over one thread's slice of the columns (j = tid, tid + nthreads, ...). The CUDA kernel
// (lap_cuda.cu) runs them with __syncthreads() between phases; the C++ tests run the very same phases on
// the CPU, one simulated thread after another (tests/cpp/test_lap.cpp).
//
// Algorithm per problem: shortest augmenting paths (Dijkstra on reduced costs c(i,j) - v[j]) for
// each row in turn, from column prices v that start at the column minima (square) or zero (n < m).
#pragma once
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define LAP_HD __host__ __device__ __forceinline__
#else
#define LAP_HD inline
#endif

namespace mcsmoe::lap {

struct ArgMin {
  double value;
  int32_t index;     // -1 when the slice had no candidate
  int32_t assigned;  // 1 when the column has a row; on ties free columns win (the path ends there)
};

LAP_HD ArgMin argmin_identity() { return {std::numeric_limits<double>::infinity(), -1, 1}; }

// Deterministic combine, a strict order on (value, assigned, index): the smaller value wins; on equal
// values a free column beats an assigned one (as in the CPU solver: with many tied costs, taking the
// lowest index instead would scan every assigned column before reaching a free one, O(n^2) steps);
// then the lower column index wins. The result does not depend on the order of combination.
LAP_HD ArgMin argmin_combine(ArgMin a, ArgMin b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.value < a.value) return b;
  if (b.value == a.value && (b.assigned < a.assigned || (b.assigned == a.assigned && b.index < a.index))) return b;
  return a;
}

template <typename T>
LAP_HD double cost_at(const T* cost, int64_t m, int64_t i, int64_t j, double sign) {
  return sign * static_cast<double>(cost[i * m + j]);
}

// Phase "prices": v[j] = min_i c(i, j) for square problems (column reduction), 0 otherwise.
template <typename T>
LAP_HD void prices_slice(int tid, int nthreads, const T* cost, int64_t n, int64_t m, double sign, double* v) {
  for (int64_t j = tid; j < m; j += nthreads) {
    double best = 0.0;
    if (n == m) {
      best = cost_at(cost, m, 0, j, sign);
      for (int64_t i = 1; i < n; ++i) {
        double c = cost_at(cost, m, i, j, sign);
        best = c < best ? c : best;
      }
    }
    v[j] = best;
  }
}

// Phase "start row f": every column is unscanned with tentative distance c(f, j) - v[j].
template <typename T>
LAP_HD ArgMin start_row_slice(int tid, int nthreads, const T* cost, int64_t m, double sign, int64_t f,
                              const double* v, const int32_t* row_of_col, double* d, int32_t* pred,
                              uint8_t* scanned) {
  ArgMin best = argmin_identity();
  for (int64_t j = tid; j < m; j += nthreads) {
    d[j] = cost_at(cost, m, f, j, sign) - v[j];
    pred[j] = static_cast<int32_t>(f);
    scanned[j] = 0;
    best = argmin_combine(best, {d[j], static_cast<int32_t>(j), row_of_col[j] >= 0});
  }
  return best;
}

// Phase "relax": column j0 (assigned to row i, distance dmin) was scanned; shorten the distances of
// the unscanned columns through row i and return this slice's closest unscanned column.
template <typename T>
LAP_HD ArgMin relax_slice(int tid, int nthreads, const T* cost, int64_t m, double sign, int64_t i, double h,
                          const double* v, const int32_t* row_of_col, double* d, int32_t* pred,
                          const uint8_t* scanned) {
  ArgMin best = argmin_identity();
  for (int64_t j = tid; j < m; j += nthreads) {
    if (scanned[j]) continue;
    double dj = cost_at(cost, m, i, j, sign) - v[j] - h;
    if (dj < d[j]) {
      d[j] = dj;
      pred[j] = static_cast<int32_t>(i);
    }
    best = argmin_combine(best, {d[j], static_cast<int32_t>(j), row_of_col[j] >= 0});
  }
  return best;
}

// Phase "prices after a path": scanned columns move by their slack to the path length dmin.
LAP_HD void update_prices_slice(int tid, int nthreads, int64_t m, double dmin, const double* d,
                                const uint8_t* scanned, double* v) {
  for (int64_t j = tid; j < m; j += nthreads)
    if (scanned[j]) v[j] += d[j] - dmin;
}

// Serial step: flip the alternating path that ends at free column `sink` back to row f.
LAP_HD void augment_path(int64_t f, int64_t sink, const int32_t* pred, int32_t* row_of_col, int32_t* col_of_row) {
  int64_t j = sink;
  while (true) {
    int32_t i = pred[j];
    row_of_col[j] = i;
    int32_t next = col_of_row[i];
    col_of_row[i] = static_cast<int32_t>(j);
    if (i == f) break;
    j = next;
  }
}

}  // namespace mcsmoe::lap
