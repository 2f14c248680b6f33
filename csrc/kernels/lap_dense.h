// The dense Jonker-Volgenant solver's state and phases: column reduction with reduction transfer,
// augmenting row reduction, shortest augmenting paths. Internal to lap.cpp; lap.h states the
// invariants every phase keeps.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "lap_rows.h"

namespace mcsmoe::lap::cpu {

// The smallest and second smallest values seen, with their columns (j2 = -1 until two were seen).
struct TwoBest {
  double umin = kInf, usub = kInf;
  int32_t j1 = -1, j2 = -1;
  void add(double h, int32_t j) {
    if (h >= usub) return;
    if (h >= umin) {
      usub = h;
      j2 = j;
    } else {
      usub = umin;
      j2 = j1;
      umin = h;
      j1 = j;
    }
  }
};

template <typename T>
struct Problem {
  const T* cost;
  int64_t n, m;
  double sign;
  std::vector<double> v;           // column prices
  std::vector<int32_t> col_of_row;  // -1: free row
  std::vector<int32_t> row_of_col;  // -1: free column

  Problem(const T* c, int64_t n_, int64_t m_, double s)
      : cost(c), n(n_), m(m_), sign(s), v(m_, 0.0), col_of_row(n_, -1), row_of_col(m_, -1) {}

  // Reduced row i into `out`: out[j] = c(i, j) - v[j].
  void reduced_row(int64_t i, double* out) const { reduce_row(cost + i * m, v.data(), sign, m, out); }

  // Square problems: v[j] = column minimum; each column goes to its minimising row if that row is
  // still free (JV's column reduction), then reduction transfer lowers the price of each assigned
  // column by its row's slack to the second best column.
  void column_reduction(std::vector<double>& scratch) {
    using Index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
    std::vector<T> colmin(m);
    std::vector<Index> argrow(m, 0);
    for (int64_t j = 0; j < m; ++j) colmin[j] = static_cast<T>(sign) * cost[j];
    for (int64_t i = 1; i < n; ++i)
      column_min_step(cost + i * m, static_cast<T>(sign), static_cast<Index>(i), m, colmin.data(), argrow.data());
    for (int64_t j = 0; j < m; ++j) v[j] = static_cast<double>(colmin[j]);
    for (int64_t j = m - 1; j >= 0; --j) {
      const int64_t i = argrow[j];
      if (col_of_row[i] < 0) {
        col_of_row[i] = static_cast<int32_t>(j);
        row_of_col[j] = static_cast<int32_t>(i);
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const int32_t j1 = col_of_row[i];
      if (j1 < 0) continue;
      reduced_row(i, scratch.data());
      const double own = scratch[j1];
      scratch[j1] = kInf;
      const double mu = min_of(scratch.data());
      if (mu < kInf) v[j1] -= mu - own;
    }
  }

  // JV's augmenting row reduction: a free row takes its best column, lowering that column's price
  // to the row's second best; the row it displaces is retried at once. Bounded work per pass; any
  // rows left free are handled by shortest paths, so the bound costs no optimality.
  std::vector<int32_t> augmenting_row_reduction(std::vector<int32_t> free_rows, std::vector<double>& scratch,
                                                int passes) {
    for (int pass = 0; pass < passes && !free_rows.empty(); ++pass) {
      std::vector<int32_t> still_free;
      int64_t budget = 4 * (n + 16);
      size_t next = 0;
      while (next < free_rows.size()) {
        const int32_t i = free_rows[next++];
        reduced_row(i, scratch.data());
        TwoBest best;
        for (int64_t j = 0; j < m; ++j) best.add(scratch[j], static_cast<int32_t>(j));
        const auto [i0, strict] = reduction_step(i, best);
        if (i0 < 0) continue;
        if (strict && budget-- > 0)
          free_rows[--next] = i0;
        else
          still_free.push_back(i0);
      }
      free_rows.swap(still_free);
    }
    return free_rows;
  }

  // One step of JV's row reduction: free row i takes its best column, whose price drops to the row's
  // second best value; on a tie it takes the second best column instead if the best one is taken.
  // Returns the row it displaced (-1 if none) and whether the step was strict (moved a price).
  std::pair<int32_t, bool> reduction_step(int32_t i, const TwoBest& best) {
    int32_t j1 = best.j1, i0 = row_of_col[j1];
    const bool strict = best.umin < best.usub;
    if (strict) {
      if (best.usub < kInf) v[j1] -= best.usub - best.umin;  // a single column has no second best
    } else if (i0 >= 0) {
      j1 = best.j2;
      i0 = row_of_col[j1];
    }
    col_of_row[i] = j1;
    row_of_col[j1] = i;
    if (i0 >= 0) col_of_row[i0] = -1;
    return {i0, strict};
  }

  // Dijkstra from free row f over reduced costs, then flip the path and move the prices.
  // A scanned column gets shadow price w[j] = -inf and distance +inf (its distance is kept in
  // `scanned`), so the relax-and-min loop needs no branch and vectorizes; the minimum's index is
  // found by a second, early-exit pass. Among columns at the minimum a free one wins, since the path
  // ends there: with many tied costs, taking the lowest index would scan every tied assigned column
  // first (O(n) steps per search; a constant n = 3072 matrix took 12 s instead of 0.05 s).
  void shortest_augmenting_path(int32_t f, std::vector<double>& d, std::vector<int64_t>& pred,
                                std::vector<double>& w, std::vector<int32_t>& free_cols,
                                std::vector<std::pair<int32_t, double>>& scanned) {
    reduced_row(f, d.data());
    std::fill(pred.begin(), pred.end(), f);
    std::copy(v.begin(), v.end(), w.begin());
    free_cols.clear();
    for (int64_t j = 0; j < m; ++j)
      if (row_of_col[j] < 0) free_cols.push_back(static_cast<int32_t>(j));
    scanned.clear();
    double dmin = min_of(d.data());
    int64_t jmin = next_column(d.data(), dmin, free_cols);
    while (row_of_col[jmin] >= 0) {
      scanned.emplace_back(static_cast<int32_t>(jmin), dmin);
      w[jmin] = -kInf;
      d[jmin] = kInf;
      const int64_t i = row_of_col[jmin];
      const T* row = cost + i * m;
      const double h = sign * static_cast<double>(row[jmin]) - v[jmin] - dmin;
      dmin = relax_row(row, w.data(), sign, h, i, m, d.data(), pred.data());  // new minimum; scanned stay +inf
      jmin = next_column(d.data(), dmin, free_cols);
    }
    for (auto [j, dj] : scanned) v[j] += dj - dmin;
    augment(f, jmin, pred.data());
  }

  double min_of(const double* d) const {
    double best = kInf;
#pragma omp simd reduction(min : best)
    for (int64_t j = 0; j < m; ++j) best = d[j] < best ? d[j] : best;
    return best;
  }

  // The first column at distance dmin, unless a free column (ascending in free_cols) is there too
  // (never a scanned one: those sit at +inf > dmin).
  int64_t next_column(const double* d, double dmin, const std::vector<int32_t>& free_cols) const {
    int64_t j = 0;
    while (d[j] != dmin) ++j;  // an unscanned free column always exists since n <= m, so one is at dmin
    if (row_of_col[j] < 0) return j;
    for (int32_t jf : free_cols)
      if (d[jf] == dmin) return jf;
    return j;
  }

  void augment(int64_t f, int64_t sink, const int64_t* pred) {
    for (int64_t j = sink;;) {
      const int64_t i = pred[j];
      row_of_col[j] = static_cast<int32_t>(i);
      const int64_t next = col_of_row[i];
      col_of_row[i] = static_cast<int32_t>(j);
      if (i == f) break;
      j = next;
    }
  }
};

}  // namespace mcsmoe::lap::cpu
