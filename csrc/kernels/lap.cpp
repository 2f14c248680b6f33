// Jonker-Volgenant linear assignment on the CPU. One call solves one problem; the op layer runs
// problems of a batch in parallel. See lap.h for the invariants every phase keeps.
#include "lap.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace mcsmoe::lap {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int kSparseRounds = 2;
constexpr int64_t kFailedScanBudget = 16;  // in units of m scanned columns

// The hot loop of the shortest augmenting path, built for AVX2 and for the baseline ISA; the loader
// picks the clone the processor supports (GCC function multiversioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define LAP_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LAP_ISA_CLONES
#endif

template <typename T>
inline double relax_row_impl(const T* row, const double* w, double sign, double h, int64_t i, int64_t m,
                             double* d, int64_t* pred) {
  double best = kInf;
#pragma omp simd reduction(min : best)
  for (int64_t j = 0; j < m; ++j) {
    const double dj = sign * static_cast<double>(row[j]) - w[j] - h;
    const bool shorter = dj < d[j];
    d[j] = shorter ? dj : d[j];
    pred[j] = shorter ? i : pred[j];
    best = d[j] < best ? d[j] : best;
  }
  return best;
}

LAP_ISA_CLONES double relax_row(const float* row, const double* w, double sign, double h, int64_t i, int64_t m,
                                double* d, int64_t* pred) {
  return relax_row_impl(row, w, sign, h, i, m, d, pred);
}

LAP_ISA_CLONES double relax_row(const double* row, const double* w, double sign, double h, int64_t i, int64_t m,
                                double* d, int64_t* pred) {
  return relax_row_impl(row, w, sign, h, i, m, d, pred);
}

template <typename T>
inline void reduce_row_impl(const T* row, const double* v, double sign, int64_t m, double* out) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) out[j] = sign * static_cast<double>(row[j]) - v[j];
}

LAP_ISA_CLONES void reduce_row(const float* row, const double* v, double sign, int64_t m, double* out) {
  reduce_row_impl(row, v, sign, m, out);
}

LAP_ISA_CLONES void reduce_row(const double* row, const double* v, double sign, int64_t m, double* out) {
  reduce_row_impl(row, v, sign, m, out);
}

// A double as a float, clamped to the finite range (costs and prices beyond it must not become inf:
// inf - inf would make the selection compare NaNs).
inline float to_finite_float(double x) {
  constexpr double kMax = std::numeric_limits<float>::max();
  return static_cast<float>(x < -kMax ? -kMax : (x > kMax ? kMax : x));
}

// Reduced costs in float, for choosing candidate columns (which needs no exactness). With v finite
// floats, every entry is a float or +-inf, never NaN.
template <typename T>
inline void reduce_row_float_impl(const T* row, const float* v, float sign, int64_t m, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    if constexpr (std::is_same_v<T, float>)
      out[j] = sign * row[j] - v[j];
    else
      out[j] = sign * to_finite_float(row[j]) - v[j];
  }
}

LAP_ISA_CLONES void reduce_row_float(const float* row, const float* v, float sign, int64_t m, float* out) {
  reduce_row_float_impl(row, v, sign, m, out);
}

LAP_ISA_CLONES void reduce_row_float(const double* row, const float* v, float sign, int64_t m, float* out) {
  reduce_row_float_impl(row, v, sign, m, out);
}

// min_j sign * row[j] - v[j], in the same arithmetic as reduce_row.
template <typename T>
inline double min_reduced_impl(const T* row, const double* v, double sign, int64_t m) {
  double best = std::numeric_limits<double>::infinity();
#pragma omp simd reduction(min : best)
  for (int64_t j = 0; j < m; ++j) {
    const double r = sign * static_cast<double>(row[j]) - v[j];
    best = r < best ? r : best;
  }
  return best;
}

LAP_ISA_CLONES double min_reduced(const float* row, const double* v, double sign, int64_t m) {
  return min_reduced_impl(row, v, sign, m);
}

LAP_ISA_CLONES double min_reduced(const double* row, const double* v, double sign, int64_t m) {
  return min_reduced_impl(row, v, sign, m);
}

// One row of the column reduction: colmin[j] = min(colmin[j], sign * row[j]), argrow[j] = i where it
// falls. Both arrays have the element width of T, so the loop vectorizes without conversions.
template <typename T, typename I>
inline void column_min_step_impl(const T* row, T sign, I i, int64_t m, T* colmin, I* argrow) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const T c = sign * row[j];
    const bool lower = c < colmin[j];
    colmin[j] = lower ? c : colmin[j];
    argrow[j] = lower ? i : argrow[j];
  }
}

LAP_ISA_CLONES void column_min_step(const float* row, float sign, int32_t i, int64_t m, float* colmin, int32_t* argrow) {
  column_min_step_impl(row, sign, i, m, colmin, argrow);
}

LAP_ISA_CLONES void column_min_step(const double* row, double sign, int64_t i, int64_t m, double* colmin,
                                    int64_t* argrow) {
  column_min_step_impl(row, sign, i, m, colmin, argrow);
}

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
      size_t k = 0;
      while (k < free_rows.size()) {
        int32_t i = free_rows[k++];
        reduced_row(i, scratch.data());
        double umin = scratch[0], usub = kInf;
        int32_t j1 = 0, j2 = -1;
        for (int64_t j = 1; j < m; ++j) {
          double h = scratch[j];
          if (h < usub) {
            if (h >= umin) {
              usub = h;
              j2 = static_cast<int32_t>(j);
            } else {
              usub = umin;
              umin = h;
              j2 = j1;
              j1 = static_cast<int32_t>(j);
            }
          }
        }
        int32_t i0 = row_of_col[j1];
        bool strict = umin < usub;
        if (strict) {
          if (usub < kInf) v[j1] -= usub - umin;
        } else if (i0 >= 0) {
          j1 = j2;
          i0 = row_of_col[j2];
        }
        col_of_row[i] = j1;
        row_of_col[j1] = i;
        if (i0 >= 0) {
          col_of_row[i0] = -1;
          if (strict && budget-- > 0)
            free_rows[--k] = i0;
          else
            still_free.push_back(i0);
        }
      }
      free_rows.swap(still_free);
    }
    return free_rows;
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

  // ---- sparse phase (square problems): shortest paths over each row's k best columns ----------------
  // Row i's candidate edges sit at [i * k, (i + 1) * k): their columns and signed costs, contiguous so a
  // search step reads them in one stream instead of k scattered reads of the cost matrix. They are
  // selected when a search first reaches the row (easy problems reach few rows).
  struct Candidates {
    int k = 0;
    std::vector<int32_t> col;
    std::vector<T> cost;  // sign * c(i, j), exact in T
    std::vector<uint8_t> ready;
    std::vector<float> v, r, block_min, kth;  // selection scratch: prices and reduced costs in float
    std::vector<int32_t> picked;
  } cand;

  void init_candidates(int k) {
    cand.k = k;
    cand.col.resize(n * k);
    cand.cost.resize(n * k);
    cand.ready.assign(n, 0);
    cand.v.resize(m);
    cand.r.resize(m);
    cand.picked.resize(m);
  }

  // The prices the selection uses (a float copy of v).
  void snapshot_prices() {
    for (int64_t j = 0; j < m; ++j) cand.v[j] = to_finite_float(v[j]);
  }

  // Row i's k columns of smallest reduced cost, at the prices of the last snapshot. Any sets give an
  // exact result (the check after the searches catches what they miss), so the selection only needs
  // to be cheap: it runs in float; the k-th smallest of the block minima bounds the k-th smallest
  // entry from above, the few entries under that bound are collected branch-free from the blocks
  // that hold them, and nth_element trims them to k.
  void select_candidates(int64_t i) {
    const int k = cand.k;
    const int64_t block = std::max<int64_t>(1, m / (3 * k));
    const int64_t blocks = (m + block - 1) / block;  // >= k since k < m
    float* r = cand.r.data();
    reduce_row_float(cost + i * m, cand.v.data(), static_cast<float>(sign), m, r);
    cand.block_min.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      float lo = std::numeric_limits<float>::infinity();
      const int64_t end = std::min(m, (b + 1) * block);
#pragma omp simd reduction(min : lo)
      for (int64_t j = b * block; j < end; ++j) lo = r[j] < lo ? r[j] : lo;
      cand.block_min[b] = lo;
    }
    cand.kth = cand.block_min;
    std::nth_element(cand.kth.begin(), cand.kth.begin() + (k - 1), cand.kth.end());
    const float bound = cand.kth[k - 1];
    int32_t* picked = cand.picked.data();
    int64_t count = 0;
    // Blocks are visited from a row-dependent start: among tied entries nth_element keeps the front
    // ones, and without the rotation every row of a tie-heavy matrix would pick the same low columns
    // (the searches then cannot reach most free columns).
    const int64_t first_block = (i * 97) % blocks;
    for (int64_t bb = 0; bb < blocks; ++bb) {
      const int64_t b = (first_block + bb) % blocks;
      if (cand.block_min[b] > bound) continue;
      const int64_t end = std::min(m, (b + 1) * block);
      for (int64_t j = b * block; j < end; ++j) {
        picked[count] = static_cast<int32_t>(j);
        count += r[j] <= bound;
      }
    }
    assert(count >= k && "no NaN in r: at least k blocks hold an entry under the bound");
    std::nth_element(picked, picked + (k - 1), picked + count, [r](int32_t a, int32_t b) { return r[a] < r[b]; });
    const T* row = cost + i * m;
    for (int t = 0; t < k; ++t) {
      cand.col[i * k + t] = picked[t];
      cand.cost[i * k + t] = static_cast<T>(sign) * row[picked[t]];
    }
    cand.ready[i] = 1;
  }

  // Candidates for row i, selected at the current prices if it has none yet.
  void ensure_candidates(int64_t i) {
    if (cand.ready[i]) return;
    snapshot_prices();
    select_candidates(i);
  }

  // Dijkstra from free row f over candidate edges only (a binary heap with lazy deletion). A scanned
  // column's distance is set to -inf, so no later edge improves it. Free columns are not pushed: the
  // nearest one reached so far bounds the search, which ends when the heap holds nothing closer, and no
  // column at or beyond that bound is recorded at all. On reaching the free column the search moves
  // the prices and flips the path like the dense search; it returns false, changing nothing, when no
  // free column is reachable. d must be +inf everywhere on entry, and is restored on exit.
  using HeapItem = std::pair<double, int32_t>;
  bool sparse_augmenting_path(int32_t f, std::vector<double>& d, std::vector<int64_t>& pred,
                              std::vector<int32_t>& touched, std::vector<std::pair<int32_t, double>>& scanned,
                              std::vector<HeapItem>& heap, std::vector<uint8_t>& to_check) {
    const int k = cand.k;
    const auto later = std::greater<HeapItem>();
    heap.clear();
    touched.clear();
    scanned.clear();
    int32_t sink = -1;
    double bound = kInf;  // distance to `sink`, the nearest free column reached
    auto relax_from = [&](int64_t i, double h) {
      ensure_candidates(i);
      const int32_t* cols = cand.col.data() + i * k;
      const T* costs = cand.cost.data() + i * k;
      for (int t = 0; t < k; ++t) {
        const int32_t j = cols[t];
        const double dj = static_cast<double>(costs[t]) - v[j] - h;
        if (dj < d[j] && dj < bound) {
          if (d[j] == kInf) touched.push_back(j);
          d[j] = dj;
          pred[j] = i;
          const int64_t owner = row_of_col[j];
          if (owner < 0) {
            sink = j;
            bound = dj;
          } else {
            // scanning j will read these: start the (likely cache-missing) loads now
            __builtin_prefetch(cost + owner * m + j);
            __builtin_prefetch(cand.cost.data() + owner * k);
            __builtin_prefetch(cand.col.data() + owner * k);
            heap.emplace_back(dj, j);
            std::push_heap(heap.begin(), heap.end(), later);
          }
        }
      }
    };
    relax_from(f, 0.0);
    while (!heap.empty() && heap.front().first < bound) {
      const auto [dist, j] = heap.front();
      std::pop_heap(heap.begin(), heap.end(), later);
      heap.pop_back();
      if (dist != d[j]) continue;  // already scanned, or a stale entry
      d[j] = -kInf;
      scanned.emplace_back(j, dist);
      const int64_t i = row_of_col[j];
      to_check[i] = 1;  // its column's price may move: (I) must be checked for it afterwards
      relax_from(i, sign * static_cast<double>(cost[i * m + j]) - v[j] - dist);
    }
    if (sink >= 0) {
      for (auto [j, dj] : scanned) v[j] += dj - bound;
      augment(f, sink, pred.data());
    }
    for (int32_t j : touched) d[j] = kInf;
    return sink >= 0;
  }

  // Augmenting row reduction over candidate edges (JV's step at O(k) instead of O(m) per row): a
  // free row takes its best candidate column, whose price drops to the row's second best candidate;
  // the row it displaces is retried at once, within a budget. Every row that takes a column is
  // flagged for the check; the candidate edges of all assigned rows stay non-negative, which the
  // sparse searches need. Returns the rows still free.
  std::vector<int32_t> sparse_row_reduction(std::vector<int32_t> free_rows, std::vector<uint8_t>& to_check) {
    const int k = cand.k;
    std::vector<int32_t> still_free;
    int64_t budget = 4 * (n + 16);
    size_t next = 0;
    while (next < free_rows.size()) {
      const int32_t i = free_rows[next++];
      ensure_candidates(i);
      const int32_t* cols = cand.col.data() + i * k;
      const T* costs = cand.cost.data() + i * k;
      double umin = kInf, usub = kInf;
      int32_t j1 = -1, j2 = -1;
      for (int t = 0; t < k; ++t) {
        const double h = static_cast<double>(costs[t]) - v[cols[t]];
        if (h < usub) {
          if (h >= umin) {
            usub = h;
            j2 = cols[t];
          } else {
            usub = umin;
            umin = h;
            j2 = j1;
            j1 = cols[t];
          }
        }
      }
      int32_t i0 = row_of_col[j1];
      const bool strict = umin < usub;
      if (strict) {
        if (usub < kInf) v[j1] -= usub - umin;  // k = 1 has no second best
      } else if (i0 >= 0) {
        j1 = j2;
        i0 = row_of_col[j2];
      }
      col_of_row[i] = j1;
      row_of_col[j1] = i;
      to_check[i] = 1;
      if (i0 >= 0) {
        col_of_row[i0] = -1;
        if (strict && budget-- > 0)
          free_rows[--next] = i0;
        else
          still_free.push_back(i0);
      }
    }
    return still_free;
  }

  // Runs the sparse searches for `free_rows`, then frees every row that is free or whose column no
  // longer minimises its reduced cost (edges outside the candidate sets were never looked at). Rows
  // freed so get their candidates selected again and a second round of searches (measured: the dense
  // search is left a few rows instead of tens to hundreds).
  // Only rows that started a search or owned a scanned column can break (I): every other row keeps
  // its column and price while other prices only fall. Afterwards (I) holds for every assigned row,
  // which is all the dense search needs on a square problem; the returned rows are finished by it.
  std::vector<int32_t> sparse_phase(const std::vector<int32_t>& free_rows, int k, std::vector<int64_t>& pred,
                                    std::vector<std::pair<int32_t, double>>& scanned) {
    if (cand.k != k) init_candidates(k);
    // With many free rows the searches reach nearly every row: select all candidates up front, from the
    // prices of the initialisation (measured: fewer rows fail the check than with later prices).
    if (free_rows.size() * 8 >= static_cast<size_t>(n)) {
      snapshot_prices();
      for (int64_t i = 0; i < n; ++i) select_candidates(i);
    }
    std::vector<double> d(m, kInf);
    std::vector<uint8_t> to_check(n, 0);
    std::vector<int32_t> touched;
    std::vector<HeapItem> heap;
    std::vector<int32_t> rows = sparse_row_reduction(free_rows, to_check);
    // A search that reaches no free column scans everything it can reach for nothing. When such scans
    // add up to kFailedScanBudget dense searches' worth (tie-heavy costs: a constant matrix had a
    // quarter of its searches fail), the remaining rows go to the dense search directly.
    int64_t failed_scans = 0;
    for (int round = 0;; ++round) {
      for (int32_t f : rows) {
        to_check[f] = 1;  // free rows come back from check_rows whether searched or not
        if (failed_scans > kFailedScanBudget * m) continue;
        if (!sparse_augmenting_path(f, d, pred, touched, scanned, heap, to_check))
          failed_scans += static_cast<int64_t>(scanned.size());
      }
      rows = check_rows(to_check);
      if (rows.empty() || round + 1 == kSparseRounds || failed_scans > kFailedScanBudget * m) break;
      for (int32_t i : rows) cand.ready[i] = 0;  // their best column lay outside the set: select again
    }
    cand = {};
    return rows;
  }

  // Frees every flagged row whose column no longer minimises its reduced cost; returns those rows and
  // the flagged rows that were free. Clears the flags.
  std::vector<int32_t> check_rows(std::vector<uint8_t>& to_check) {
    std::vector<int32_t> unfinished;
    for (int64_t i = 0; i < n; ++i) {
      if (!to_check[i]) continue;
      to_check[i] = 0;
      const int32_t j0 = col_of_row[i];
      if (j0 >= 0) {
        const T* row = cost + i * m;
        if (min_reduced(row, v.data(), sign, m) == sign * static_cast<double>(row[j0]) - v[j0]) continue;
        row_of_col[j0] = -1;
        col_of_row[i] = -1;
      }
      unfinished.push_back(static_cast<int32_t>(i));
    }
    return unfinished;
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

}  // namespace

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
  Problem<T> p(cost, n, m, sign);
  const bool sparse = n == m && n >= options.sparse_min_size && options.sparse_k > 0 && options.sparse_k < m;
  std::vector<double> scratch(m);
  std::vector<int32_t> free_rows;
  if (n == m) p.column_reduction(scratch);
  for (int64_t i = 0; i < n; ++i)
    if (p.col_of_row[i] < 0) free_rows.push_back(static_cast<int32_t>(i));
  // with cheap sparse searches to follow, row reduction does not pay for itself (measured)
  free_rows = p.augmenting_row_reduction(std::move(free_rows), scratch, sparse ? 0 : 2);
  std::vector<double> shadow(m);
  std::vector<int32_t> free_cols;
  std::vector<int64_t> pred(m);
  std::vector<std::pair<int32_t, double>> scanned;
  scanned.reserve(m);
  if (sparse) free_rows = p.sparse_phase(free_rows, options.sparse_k, pred, scanned);
  for (int32_t f : free_rows) p.shortest_augmenting_path(f, scratch, pred, shadow, free_cols, scanned);
  for (int64_t i = 0; i < n; ++i) col4row[i] = p.col_of_row[i];
}

template bool all_finite<float>(const float*, int64_t);
template bool all_finite<double>(const double*, int64_t);
template void solve_cpu<float>(const float*, int64_t, int64_t, double, int64_t*, SolveOptions);
template void solve_cpu<double>(const double*, int64_t, int64_t, double, int64_t*, SolveOptions);

}  // namespace mcsmoe::lap
