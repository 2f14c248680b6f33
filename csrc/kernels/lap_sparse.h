// The sparse phase of the CPU assignment solver (square problems): augmenting row reduction and
// Dijkstra searches over each row's k best columns, then a dense check of every row whose column may
// have stopped minimising its reduced cost. It works on a Problem's assignment and prices, keeps
// invariant (I) of lap.h for every row it leaves assigned, and returns the rows the dense search must
// finish. Internal to lap.cpp.
#pragma once
#include <algorithm>
#include <cassert>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "lap_dense.h"
#include "lap_rows.h"

namespace mcsmoe::lap::cpu {

inline constexpr int kSparseRounds = 2;
inline constexpr int64_t kFailedScanBudget = 16;  // in units of m scanned columns

template <typename T>
struct SparsePhase {
  Problem<T>& p;
  // the problem's data and state, under the names the dense phases use
  const T* cost;
  const int64_t n, m;
  const double sign;
  std::vector<double>& v;
  std::vector<int32_t>& col_of_row;
  std::vector<int32_t>& row_of_col;

  explicit SparsePhase(Problem<T>& problem)
      : p(problem), cost(problem.cost), n(problem.n), m(problem.m), sign(problem.sign), v(problem.v),
        col_of_row(problem.col_of_row), row_of_col(problem.row_of_col) {}

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
      p.augment(f, sink, pred.data());
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
      TwoBest best;
      for (int t = 0; t < k; ++t) best.add(static_cast<double>(costs[t]) - v[cols[t]], cols[t]);
      const auto [i0, strict] = p.reduction_step(i, best);
      to_check[i] = 1;
      if (i0 < 0) continue;
      if (strict && budget-- > 0)
        free_rows[--next] = i0;
      else
        still_free.push_back(i0);
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
  std::vector<int32_t> run(const std::vector<int32_t>& free_rows, int k, std::vector<int64_t>& pred,
                                    std::vector<std::pair<int32_t, double>>& scanned) {
    init_candidates(k);
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
};

}  // namespace mcsmoe::lap::cpu
