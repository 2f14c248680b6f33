// Jonker-Volgenant linear assignment on the CPU. One call solves one problem; the op layer runs
// problems of a batch in parallel. See lap.h for the invariants every phase keeps.
#include "lap.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <utility>
#include <vector>

namespace mcsmoe::lap {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

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
  void reduced_row(int64_t i, double* out) const {
    const T* row = cost + i * m;
    const double* vp = v.data();
    for (int64_t j = 0; j < m; ++j) out[j] = sign * static_cast<double>(row[j]) - vp[j];
  }

  // Square problems: v[j] = column minimum; each column goes to its minimising row if that row is
  // still free (JV's column reduction), then reduction transfer lowers the price of each assigned
  // column by its row's slack to the second best column.
  void column_reduction(std::vector<double>& scratch) {
    std::vector<int32_t> argrow(m, 0);
    for (int64_t j = 0; j < m; ++j) v[j] = sign * static_cast<double>(cost[j]);
    for (int64_t i = 1; i < n; ++i) {
      const T* row = cost + i * m;
      for (int64_t j = 0; j < m; ++j) {
        double c = sign * static_cast<double>(row[j]);
        if (c < v[j]) {
          v[j] = c;
          argrow[j] = static_cast<int32_t>(i);
        }
      }
    }
    for (int64_t j = m - 1; j >= 0; --j) {
      int32_t i = argrow[j];
      if (col_of_row[i] < 0) {
        col_of_row[i] = static_cast<int32_t>(j);
        row_of_col[j] = i;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      int32_t j1 = col_of_row[i];
      if (j1 < 0) continue;
      reduced_row(i, scratch.data());
      double mu = kInf;
      for (int64_t j = 0; j < m; ++j)
        if (j != j1) mu = std::min(mu, scratch[j]);
      if (mu < kInf) v[j1] -= mu - scratch[j1];
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
  // found by a second, early-exit pass.
  void shortest_augmenting_path(int32_t f, std::vector<double>& d, std::vector<int64_t>& pred,
                                std::vector<double>& w, std::vector<std::pair<int32_t, double>>& scanned) {
    reduced_row(f, d.data());
    std::fill(pred.begin(), pred.end(), f);
    std::copy(v.begin(), v.end(), w.begin());
    scanned.clear();
    double dmin = min_of(d.data());
    int64_t jmin = first_at(d.data(), dmin);
    while (row_of_col[jmin] >= 0) {
      scanned.emplace_back(static_cast<int32_t>(jmin), dmin);
      w[jmin] = -kInf;
      d[jmin] = kInf;
      const int64_t i = row_of_col[jmin];
      const T* row = cost + i * m;
      const double h = sign * static_cast<double>(row[jmin]) - v[jmin] - dmin;
      dmin = relax_row(row, w.data(), sign, h, i, m, d.data(), pred.data());  // new minimum; scanned stay +inf
      jmin = first_at(d.data(), dmin);
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

  // The first column at distance dmin (never a scanned one: those sit at +inf > dmin).
  int64_t first_at(const double* d, double dmin) const {
    for (int64_t j = 0; j < m; ++j)
      if (d[j] == dmin) return j;
    return -1;  // unreachable: an unscanned free column always exists since n <= m
  }

  // ---- sparse phase (square problems): shortest paths over each row's k best columns ----------------
  std::vector<std::vector<int32_t>> candidates_of;  // filled lazily, for the rows a search reaches

  // The k columns of smallest reduced cost of row i (at the time of the first request): one pass
  // with a max-heap of the best seen so far (replacements are rare after the first few hundred).
  const std::vector<int32_t>& candidates(int64_t i, int k, std::vector<double>& scratch) {
    std::vector<int32_t>& c = candidates_of[i];
    if (c.empty()) {
      reduced_row(i, scratch.data());
      std::vector<std::pair<double, int32_t>> best(k);
      for (int j = 0; j < k; ++j) best[j] = {scratch[j], j};
      std::make_heap(best.begin(), best.end());
      for (int64_t j = k; j < m; ++j) {
        if (scratch[j] < best.front().first) {
          std::pop_heap(best.begin(), best.end());
          best.back() = {scratch[j], static_cast<int32_t>(j)};
          std::push_heap(best.begin(), best.end());
        }
      }
      c.resize(k);
      for (int j = 0; j < k; ++j) c[j] = best[j].second;
    }
    return c;
  }

  // Dijkstra from free row f over candidate edges only (a binary heap with lazy deletion). On reaching
  // a free column it moves the prices and flips the path like the dense search; it returns false,
  // changing nothing, when no free column is reachable. d must be +inf and done 0 everywhere on entry;
  // both are restored on exit.
  bool sparse_augmenting_path(int32_t f, int k, std::vector<double>& d, std::vector<int64_t>& pred,
                              std::vector<uint8_t>& done, std::vector<int32_t>& touched,
                              std::vector<std::pair<int32_t, double>>& scanned, std::vector<double>& scratch,
                              std::vector<uint8_t>& to_check) {
    using Item = std::pair<double, int32_t>;
    std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
    touched.clear();
    scanned.clear();
    auto relax_from = [&](int64_t i, double h) {
      const T* row = cost + i * m;
      for (int32_t j : candidates(i, k, scratch)) {
        if (done[j]) continue;
        const double dj = sign * static_cast<double>(row[j]) - v[j] - h;
        if (dj < d[j]) {
          if (d[j] == kInf) touched.push_back(j);
          d[j] = dj;
          pred[j] = i;
          heap.push({dj, j});
        }
      }
    };
    relax_from(f, 0.0);
    int32_t sink = -1;
    double dmin = 0.0;
    while (!heap.empty()) {
      const auto [dist, j] = heap.top();
      heap.pop();
      if (done[j] || dist != d[j]) continue;  // already scanned, or a stale entry
      if (row_of_col[j] < 0) {
        sink = j;
        dmin = dist;
        break;
      }
      done[j] = 1;
      scanned.emplace_back(j, dist);
      const int64_t i = row_of_col[j];
      to_check[i] = 1;  // its column's price may move: (I) must be checked for it afterwards
      relax_from(i, sign * static_cast<double>(cost[i * m + j]) - v[j] - dist);
    }
    if (sink >= 0) {
      for (auto [j, dj] : scanned) v[j] += dj - dmin;
      augment(f, sink, pred.data());
    }
    for (int32_t j : touched) {
      d[j] = kInf;
      done[j] = 0;
    }
    return sink >= 0;
  }

  // Runs the sparse searches for `free_rows`, then frees every row that is free or whose column no
  // longer minimises its reduced cost (edges outside the candidate sets were never looked at).
  // Only rows that started a search or owned a scanned column can break (I): every other row keeps
  // its column and price while other prices only fall. Afterwards (I) holds for every assigned row,
  // which is all the dense search needs on a square problem; the returned rows are finished by it.
  std::vector<int32_t> sparse_phase(const std::vector<int32_t>& free_rows, int k, std::vector<int64_t>& pred,
                                    std::vector<std::pair<int32_t, double>>& scanned, std::vector<double>& scratch) {
    candidates_of.assign(n, {});
    std::vector<double> d(m, kInf);
    std::vector<uint8_t> done(m, 0), to_check(n, 0);
    std::vector<int32_t> touched;
    for (int32_t f : free_rows) {
      to_check[f] = 1;
      sparse_augmenting_path(f, k, d, pred, done, touched, scanned, scratch, to_check);
    }
    candidates_of = {};
    std::vector<int32_t> unfinished;
    for (int64_t i = 0; i < n; ++i) {
      if (!to_check[i]) continue;
      const int32_t j0 = col_of_row[i];
      if (j0 >= 0) {
        reduced_row(i, scratch.data());
        if (min_of(scratch.data()) == scratch[j0]) continue;
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
  std::vector<int64_t> pred(m);
  std::vector<std::pair<int32_t, double>> scanned;
  scanned.reserve(m);
  if (sparse) free_rows = p.sparse_phase(free_rows, options.sparse_k, pred, scanned, scratch);
  for (int32_t f : free_rows) p.shortest_augmenting_path(f, scratch, pred, shadow, scanned);
  for (int64_t i = 0; i < n; ++i) col4row[i] = p.col_of_row[i];
}

template bool all_finite<float>(const float*, int64_t);
template bool all_finite<double>(const double*, int64_t);
template void solve_cpu<float>(const float*, int64_t, int64_t, double, int64_t*, SolveOptions);
template void solve_cpu<double>(const double*, int64_t, int64_t, double, int64_t*, SolveOptions);

}  // namespace mcsmoe::lap
