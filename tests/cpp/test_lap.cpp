// Linear assignment kernels without torch and without a GPU:
//   (a) solve_cpu against brute force on small problems;
//   (b) the block-per-problem solver of the CUDA kernel (solve_block, lap_block.h: the same phases
//       in the same order, with the same barriers) driven by NT simulated threads that run one after
//       another between barriers, against brute force and against solve_cpu's objective. Threads run
//       forward, backward and shuffled between barriers: all orders must give the same answer, which
//       they do only if no thread reads what another writes without a barrier in between;
//   (c) edge cases;
//   (d) the sparse phase of solve_cpu, forced on small problems;
//   (e) large tie-heavy problems;
//   (f) forbidden pairs (+inf when minimising, -inf when maximising), invalid entries and infeasible
//       problems (solve_cpu_checked, and big M on the block solver), against brute force and an
//       independent feasibility check (maximum bipartite matching over the allowed pairs).
// Exit status 1 on any failure. `test_lap --stats N` prints how many barrier-separated argmin steps
// the block solver takes on a random N x N problem (an estimate of the GPU's work).
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/lap.h"
#include "kernels/lap_block.h"

using namespace mcsmoe::lap;

namespace {

int g_passed = 0, g_failed = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (cond) {                                                  \
      ++g_passed;                                                \
    } else {                                                     \
      ++g_failed;                                                \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
    }                                                            \
  } while (0)

// ---- NT simulated threads, one after another between barriers -----------------------------------
enum class Order { Forward, Backward, Shuffled };

// Between two barriers each simulated thread runs its whole share of the work (every step since the
// last barrier, in program order) before the next thread starts: exactly what one thread of the
// block would do if the others were stalled. Threads take turns forward, backward or shuffled; a
// read of another thread's write without a barrier between them changes the answer with the order.
struct HostBlock {
  int nt;
  Order order;
  std::mt19937 rng{12345};
  int64_t argmins = 0, syncs = 0;
  std::vector<std::function<void(int)>> pending{};  // steps since the last barrier, per thread

  int nthreads() const { return nt; }

  std::vector<int> thread_order() {
    std::vector<int> ts(nt);
    std::iota(ts.begin(), ts.end(), 0);
    if (order == Order::Backward) std::reverse(ts.begin(), ts.end());
    if (order == Order::Shuffled) std::shuffle(ts.begin(), ts.end(), rng);
    return ts;
  }

  template <class F>
  void each(F f) {
    pending.emplace_back(f);
  }
  template <class F>
  void single(F f) {
    pending.emplace_back([f](int t) {
      if (t == 0) f();
    });
  }
  template <typename T>
  void before_row_scan(const T*, int64_t, int64_t) {}

  // Runs the pending steps and then last(t) thread by thread, up to a barrier.
  template <class F>
  void run_interval(F&& last) {
    for (int t : thread_order()) {
      for (auto& step : pending) step(t);
      last(t);
    }
    pending.clear();
    ++syncs;
  }
  void sync() {
    run_interval([](int) {});
  }
  void finish() {
    run_interval([](int) {});
    --syncs;  // no barrier on the device
  }

  // Same combine tree as the device: butterfly within each warp of 32 (lanes past nt hold the
  // identity), then the warps' results in order.
  template <class F>
  ArgMin argmin(F&& f) {
    ++argmins;
    const int warps = (nt + 31) / 32;
    std::vector<ArgMin> lane(static_cast<size_t>(warps) * 32, argmin_identity());
    run_interval([&](int t) { lane[t] = f(t); });
    for (int w = 0; w < warps; ++w) {
      ArgMin* a = lane.data() + 32 * w;
      for (int offset = 16; offset > 0; offset >>= 1) {
        ArgMin next[32];
        for (int l = 0; l < 32; ++l) next[l] = argmin_combine(a[l], a[l ^ offset]);
        std::copy(next, next + 32, a);
      }
    }
    ArgMin r = lane[0];
    for (int w = 1; w < warps; ++w) r = argmin_combine(r, lane[32 * w]);
    return r;
  }
};

// Runs the CUDA kernel's per-problem solver on the host. The working arrays start as garbage, as
// device memory would.
template <typename T>
std::vector<int64_t> solve_simulated(const std::vector<T>& cost, int64_t n, int64_t m, double sign, int nt,
                                     Order order, HostBlock* stats = nullptr) {
  std::vector<int64_t> out(n, -7);
  if (n == 0) return out;
  std::vector<double> buf(static_cast<size_t>(block_state_bytes(n, m)) / sizeof(double) + 2);
  std::memset(buf.data(), 0xA5, buf.size() * sizeof(double));
  BlockState s = carve_block_state(reinterpret_cast<unsigned char*>(buf.data()), n, m);
  HostBlock blk{nt, order};
  solve_block(blk, cost.data(), n, m, sign, s, out.data());
  if (stats) {
    stats->argmins = blk.argmins;
    stats->syncs = blk.syncs;
  }
  return out;
}

template <typename T>
std::vector<int64_t> solve_reference(const std::vector<T>& cost, int64_t n, int64_t m, double sign) {
  std::vector<int64_t> out(n, -7);
  solve_cpu(cost.data(), n, m, sign, out.data());
  return out;
}

// ---- checks --------------------------------------------------------------------------------------
template <typename T>
bool valid_assignment(const std::vector<int64_t>& cols, int64_t n, int64_t m) {
  if (static_cast<int64_t>(cols.size()) != n) return false;
  std::vector<char> used(m, 0);
  for (int64_t c : cols) {
    if (c < 0 || c >= m || used[c]) return false;
    used[c] = 1;
  }
  return true;
}

template <typename T>
double objective(const std::vector<T>& cost, int64_t m, const std::vector<int64_t>& cols) {
  double s = 0;
  for (size_t i = 0; i < cols.size(); ++i) s += static_cast<double>(cost[i * m + cols[i]]);
  return s;
}

// Best objective over all injective maps rows -> columns (n <= m <= 7).
template <typename T>
double brute_force(const std::vector<T>& cost, int64_t n, int64_t m, double sign) {
  double best = INFINITY;
  std::vector<char> used(m, 0);
  auto rec = [&](auto&& self, int64_t i, double acc) -> void {
    if (i == n) {
      best = std::min(best, acc);
      return;
    }
    for (int64_t j = 0; j < m; ++j) {
      if (used[j]) continue;
      used[j] = 1;
      self(self, i + 1, acc + sign * static_cast<double>(cost[i * m + j]));
      used[j] = 0;
    }
  };
  rec(rec, 0, 0.0);
  return sign * best;
}

template <typename T>
double tolerance(const std::vector<T>& cost, int64_t m, double expected) {
  double scale = 0;
  for (T c : cost) scale = std::max(scale, std::abs(static_cast<double>(c)));
  return 1e-9 * std::max(std::abs(expected), scale * static_cast<double>(m)) + 1e-300;
}

template <typename T>
std::vector<T> random_cost(std::mt19937_64& rng, int64_t n, int64_t m, int tie_range) {
  std::vector<T> c(n * m);
  if (tie_range > 0) {
    std::uniform_int_distribution<int> u(0, tie_range);
    for (auto& x : c) x = static_cast<T>(u(rng));
  } else {
    std::normal_distribution<double> g(0.0, 1.0);
    for (auto& x : c) x = static_cast<T>(g(rng));
  }
  return c;
}

const char* type_name(float) { return "float"; }
const char* type_name(double) { return "double"; }

// (a) + (b) on small problems: both solvers against brute force.
template <typename T>
void small_vs_brute_force(std::mt19937_64& rng, int trials) {
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t m = 1 + static_cast<int64_t>(rng() % 7);
    const int64_t n = 1 + static_cast<int64_t>(rng() % m);
    const int ties = static_cast<int>(rng() % 4);  // 0: gaussian; 1..3: integers in [0, ties]
    const double sign = (rng() & 1) ? -1.0 : 1.0;
    auto cost = random_cost<T>(rng, n, m, ties);
    const double want = brute_force(cost, n, m, sign);
    const double tol = tolerance(cost, m, want);
    auto cpu = solve_reference(cost, n, m, sign);
    CHECK(valid_assignment<T>(cpu, n, m) && std::abs(objective(cost, m, cpu) - want) <= tol,
          "solve_cpu<%s> n=%lld m=%lld sign=%g ties=%d: got %.17g want %.17g", type_name(T{}), (long long)n,
          (long long)m, sign, ties, objective(cost, m, cpu), want);
    for (int nt : {1, 3, 32, 128}) {
      auto sim = solve_simulated(cost, n, m, sign, nt, Order::Shuffled);
      CHECK(valid_assignment<T>(sim, n, m) && std::abs(objective(cost, m, sim) - want) <= tol,
            "block<%s> NT=%d n=%lld m=%lld sign=%g ties=%d: got %.17g want %.17g", type_name(T{}), nt, (long long)n,
            (long long)m, sign, ties, valid_assignment<T>(sim, n, m) ? objective(cost, m, sim) : NAN, want);
    }
  }
}

// (b) on larger problems: the simulated block solver against solve_cpu's objective; every thread
// count and thread order gives the very same assignment.
template <typename T>
void large_vs_cpu(std::mt19937_64& rng, int trials) {
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 200);
    const int64_t m = (trial % 3 == 0) ? n : n + static_cast<int64_t>(rng() % 60);
    const int ties = (trial % 4 == 1) ? 1 + static_cast<int>(rng() % 4) : 0;
    const double sign = (trial % 2) ? -1.0 : 1.0;
    auto cost = random_cost<T>(rng, n, m, ties);
    auto cpu = solve_reference(cost, n, m, sign);
    const double want = objective(cost, m, cpu);
    const double tol = tolerance(cost, m, want);
    std::vector<int64_t> first;
    for (int nt : {1, 3, 32, 128}) {
      for (Order order : {Order::Forward, Order::Backward, Order::Shuffled}) {
        auto sim = solve_simulated(cost, n, m, sign, nt, order);
        const bool ok = valid_assignment<T>(sim, n, m);
        CHECK(ok && std::abs(objective(cost, m, sim) - want) <= tol,
              "block<%s> NT=%d order=%d n=%lld m=%lld sign=%g ties=%d: got %.17g, solve_cpu %.17g", type_name(T{}),
              nt, static_cast<int>(order), (long long)n, (long long)m, sign, ties,
              ok ? objective(cost, m, sim) : NAN, want);
        if (first.empty()) first = sim;
        CHECK(sim == first, "block<%s> NT=%d order=%d n=%lld m=%lld: assignment differs from NT=1 forward",
              type_name(T{}), nt, static_cast<int>(order), (long long)n, (long long)m);
      }
    }
  }
}

// Maximising is minimising the negated cost; the cost scale does not matter.
void magnitudes(std::mt19937_64& rng) {
  for (double scale : {1e-30, 1e-12, 1e12, 1e30}) {
    const int64_t n = 40, m = 47;
    auto cost = random_cost<double>(rng, n, m, 0);
    for (auto& c : cost) c *= scale;
    for (double sign : {1.0, -1.0}) {
      auto cpu = solve_reference(cost, n, m, sign);
      auto sim = solve_simulated(cost, n, m, sign, 32, Order::Shuffled);
      const double want = objective(cost, m, cpu);
      CHECK(valid_assignment<double>(sim, n, m) && std::abs(objective(cost, m, sim) - want) <= tolerance(cost, m, want),
            "scale=%g sign=%g: got %.17g want %.17g", scale, sign, objective(cost, m, sim), want);
    }
  }
}

// (c) edge cases.
void edge_cases() {
  for (int nt : {1, 32}) {
    std::vector<float> none;
    CHECK(solve_simulated(none, 0, 0, 1.0, nt, Order::Forward).empty(), "n=0 m=0");
    std::vector<float> zero_rows;  // [0, 5]
    CHECK(solve_simulated(zero_rows, 0, 5, 1.0, nt, Order::Forward).empty(), "n=0 m=5");
    std::vector<double> one{3.5};
    CHECK(solve_simulated(one, 1, 1, 1.0, nt, Order::Forward) == std::vector<int64_t>{0}, "n=m=1 min");
    CHECK(solve_simulated(one, 1, 1, -1.0, nt, Order::Forward) == std::vector<int64_t>{0}, "n=m=1 max");
    std::vector<double> row{4, -2, 7, -2, 9};  // n=1 < m: the first minimum / the maximum
    CHECK(solve_simulated(row, 1, 5, 1.0, nt, Order::Shuffled) == std::vector<int64_t>{1}, "n=1<m min");
    CHECK(solve_simulated(row, 1, 5, -1.0, nt, Order::Shuffled) == std::vector<int64_t>{4}, "n=1<m max");
    std::vector<float> flat(6 * 9, 2.0f);  // all ties
    auto a = solve_simulated(flat, 6, 9, 1.0, nt, Order::Shuffled);
    CHECK(valid_assignment<float>(a, 6, 9), "all-equal costs");
    std::vector<double> perm(30 * 30, 1.0);  // a planted permutation at cost 0
    std::vector<int64_t> want(30);
    for (int i = 0; i < 30; ++i) want[i] = (7 * i + 3) % 30;
    for (int i = 0; i < 30; ++i) perm[i * 30 + want[i]] = 0.0;
    CHECK(solve_simulated(perm, 30, 30, 1.0, nt, Order::Shuffled) == want, "planted permutation");
  }
  std::vector<float> none;
  int64_t sentinel = -7;
  solve_cpu(none.data(), 0, 5, 1.0, &sentinel);
  CHECK(sentinel == -7, "solve_cpu n=0 writes nothing");
  std::vector<double> one{-1.0};
  int64_t col = -7;
  solve_cpu(one.data(), 1, 1, 1.0, &col);
  CHECK(col == 0, "solve_cpu n=m=1");
  std::vector<double> row{4, -2, 7, -2, 9};
  solve_cpu(row.data(), 1, 5, -1.0, &col);
  CHECK(col == 4, "solve_cpu n=1<m max");
  // workspace layout: arrays 16-byte aligned, disjoint, inside block_state_bytes
  for (auto [n, m] : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {5, 5}, {33, 1000}}) {
    alignas(16) static unsigned char base[1 << 16];
    BlockState s = carve_block_state(base, n, m);
    auto off = [&](const void* p) { return static_cast<int64_t>(static_cast<const unsigned char*>(p) - base); };
    bool ok = off(s.v) == 0 && off(s.d) >= off(s.v) + 8 * m && off(s.pred) >= off(s.d) + 8 * m &&
              off(s.row_of_col) >= off(s.pred) + 4 * m && off(s.col_of_row) >= off(s.row_of_col) + 4 * m &&
              off(s.scanned) >= off(s.col_of_row) + 4 * n && off(s.scanned) + m <= block_state_bytes(n, m);
    for (const void* p : {(const void*)s.v, (const void*)s.d, (const void*)s.pred, (const void*)s.row_of_col,
                          (const void*)s.col_of_row, (const void*)s.scanned})
      ok = ok && off(p) % 16 == 0;
    CHECK(ok, "carve_block_state n=%lld m=%lld", (long long)n, (long long)m);
  }
}

// Work, not time: with tied costs the block solver must end paths at free columns at once (ties go
// to free columns) instead of scanning every assigned column first (O(n^2) barrier steps).
void tie_work() {
  for (int high : {0, 3}) {
    const int64_t n = 400;
    std::mt19937_64 rng(5);
    auto cost = random_cost<float>(rng, n, n, high);
    if (high == 0) std::fill(cost.begin(), cost.end(), 1.0f);
    HostBlock blk{32, Order::Forward};
    auto cols = solve_simulated(cost, n, n, 1.0, 32, Order::Forward, &blk);
    const double want = objective(cost, n, solve_reference(cost, n, n, 1.0));
    CHECK(valid_assignment<float>(cols, n, n) && objective(cost, n, cols) == want && blk.argmins <= 3 * n,
          "ties in [0, %d], n=%lld: %lld argmin steps (want <= %lld), objective %g vs %g", high, (long long)n,
          (long long)blk.argmins, (long long)(3 * n), objective(cost, n, cols), want);
  }
}

int stats(int64_t n) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> cost(n * n);
  for (auto& c : cost) c = u(rng);
  HostBlock blk{256, Order::Forward};
  auto cols = solve_simulated(cost, n, n, 1.0, 256, Order::Forward, &blk);
  auto cpu = solve_reference(cost, n, n, 1.0);
  std::printf("n=%lld: %lld argmin steps (%.1f per row), %lld barriers; objective %.9g (solve_cpu %.9g)\n",
              (long long)n, (long long)blk.argmins, double(blk.argmins) / n, (long long)blk.syncs,
              objective(cost, n, cols), objective(cost, n, cpu));
  return 0;
}

}  // namespace

// (d) the sparse phase of solve_cpu forced on small square problems with few candidates per row, so
// that searches fail and rows get freed and finished densely: still the brute-force optimum; and on
// larger problems against the dense solver (sparse phase off).
template <typename T>
void sparse_phase_vs_brute_force(std::mt19937_64& rng, int trials) {
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t n = 2 + static_cast<int64_t>(rng() % 6);
    const int ties = static_cast<int>(rng() % 4);
    const double sign = (rng() & 1) ? -1.0 : 1.0;
    auto cost = random_cost<T>(rng, n, n, ties);
    const double want = brute_force(cost, n, n, sign);
    for (int k = 1; k < n; ++k) {
      std::vector<int64_t> got(n, -7);
      solve_cpu(cost.data(), n, n, sign, got.data(), SolveOptions{1, k});
      CHECK(valid_assignment<T>(got, n, n) && std::abs(objective(cost, n, got) - want) <= tolerance(cost, n, want),
            "sparse solve_cpu<%s> n=%lld k=%d sign=%g ties=%d: got %.17g want %.17g", type_name(T{}), (long long)n, k,
            sign, ties, valid_assignment<T>(got, n, n) ? objective(cost, n, got) : NAN, want);
    }
  }
  for (int trial = 0; trial < 18; ++trial) {
    const int64_t n = 50 + static_cast<int64_t>(rng() % 250);
    const int ties = trial % 3 == 0 ? 3 : 0;
    const double sign = (trial & 1) ? -1.0 : 1.0;
    auto cost = random_cost<T>(rng, n, n, ties);
    if (trial == 5 && std::is_same_v<T, double>) {
      // beyond float range, all at the low end: in float every reduced cost would be -inf - -inf;
      // the candidate selection (in float) must stay well defined
      for (auto& c : cost) c = static_cast<T>(-sign * (std::abs(c) + 1) * 1e300);
    }
    if (trial >= 12) {
      // a hidden permutation plus noise: column reduction leaves few rows free, so candidates are
      // selected lazily when a search reaches a row
      std::vector<int64_t> hidden(n);
      for (int64_t i = 0; i < n; ++i) hidden[i] = i;
      std::shuffle(hidden.begin(), hidden.end(), rng);
      for (int64_t i = 0; i < n; ++i) cost[i * n + hidden[i]] -= static_cast<T>(sign * (trial % 2 ? 4.0 : 5.0));
    }
    std::vector<int64_t> dense(n), sparse(n);
    solve_cpu(cost.data(), n, n, sign, dense.data(), SolveOptions{n + 1, 0});
    const double want = objective(cost, n, dense);
    for (int k : {2, 8, 32}) {
      solve_cpu(cost.data(), n, n, sign, sparse.data(), SolveOptions{1, k});
      CHECK(valid_assignment<T>(sparse, n, n) && std::abs(objective(cost, n, sparse) - want) <= tolerance(cost, n, want),
            "sparse solve_cpu<%s> n=%lld k=%d ties=%d: got %.17g, dense %.17g", type_name(T{}), (long long)n, k, ties,
            objective(cost, n, sparse), want);
    }
  }
}

// (e) large tie-heavy problems, where many sparse searches reach no free column and the budget for
// them sends the remaining rows to the dense search: a constant matrix (every permutation is
// optimal) and rows that are constant (likewise), n = 3072.
void tie_heavy_large() {
  const int64_t n = 3072;
  std::vector<float> constant(n * n, 0.25f), rows(n * n);
  for (int64_t i = 0; i < n; ++i) std::fill(rows.begin() + i * n, rows.begin() + (i + 1) * n, float(i % 7));
  for (const auto* cost : {&constant, &rows}) {
    for (double sign : {1.0, -1.0}) {
      std::vector<int64_t> got(n, -7);
      solve_cpu(cost->data(), n, n, sign, got.data());
      double want = 0;
      for (int64_t i = 0; i < n; ++i) want += (*cost)[i * n];
      CHECK(valid_assignment<float>(got, n, n) && objective(*cost, n, got) == want,
            "tie-heavy n=%lld sign=%g: got %.17g want %.17g", (long long)n, sign,
            valid_assignment<float>(got, n, n) ? objective(*cost, n, got) : NAN, want);
    }
  }
}

// ---- (f) forbidden pairs -------------------------------------------------------------------------
constexpr double kInfD = std::numeric_limits<double>::infinity();

// Marks each entry forbidden (sign * inf) with probability p.
template <typename T>
void forbid_randomly(std::mt19937_64& rng, std::vector<T>& cost, double p, double sign) {
  std::bernoulli_distribution coin(p);
  for (auto& c : cost)
    if (coin(rng)) c = static_cast<T>(sign * kInfD);
}

// max |finite entry|, for tolerances.
template <typename T>
double finite_scale(const std::vector<T>& cost) {
  double scale = 0;
  for (T c : cost)
    if (std::isfinite(static_cast<double>(c))) scale = std::max(scale, std::abs(static_cast<double>(c)));
  return scale;
}

// Does a matching of all n rows over the allowed (non-forbidden) pairs exist? Kuhn's augmenting
// paths: independent of the solvers.
template <typename T>
bool feasible(const std::vector<T>& cost, int64_t n, int64_t m, double sign) {
  std::vector<int64_t> row_of(m, -1);
  std::vector<char> seen;
  auto allowed = [&](int64_t i, int64_t j) { return sign * static_cast<double>(cost[i * m + j]) != kInfD; };
  std::function<bool(int64_t)> try_row = [&](int64_t i) {
    for (int64_t j = 0; j < m; ++j) {
      if (!allowed(i, j) || seen[j]) continue;
      seen[j] = 1;
      if (row_of[j] < 0 || try_row(row_of[j])) {
        row_of[j] = i;
        return true;
      }
    }
    return false;
  };
  for (int64_t i = 0; i < n; ++i) {
    seen.assign(m, 0);
    if (!try_row(i)) return false;
  }
  return true;
}

// The block solver (CUDA kernel's phases, simulated) on costs with forbidden pairs, as the CUDA op
// runs it: big M substituted into a float64 copy, solved, then checked for a forbidden pair.
template <typename T>
Status solve_simulated_checked(const std::vector<T>& cost, int64_t n, int64_t m, double sign, int nt, Order order,
                               std::vector<int64_t>& out) {
  const CostScan scan = scan_costs(cost.data(), n * m, sign);
  if (scan.invalid) return Status::Invalid;
  std::vector<double> work(n * m);
  substitute_forbidden(cost.data(), n * m, sign, big_m(scan.lo, scan.hi, n), work.data());
  out = solve_simulated(work, n, m, 1.0, nt, order);
  return uses_forbidden(cost.data(), n, m, sign, out.data()) ? Status::Infeasible : Status::Ok;
}

const char* status_name(Status s) {
  return s == Status::Ok ? "ok" : (s == Status::Invalid ? "invalid" : "infeasible");
}

// Small problems with random forbidden masks (feasible and not), every solver path: the dense CPU
// solver, the CPU sparse phase forced with k candidates, the block solver. Brute force over the
// allowed assignments gives the optimum, +inf (signed) when there is none.
template <typename T>
void forbidden_vs_brute_force(std::mt19937_64& rng, int trials) {
  int infeasible = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t m = 1 + static_cast<int64_t>(rng() % 7);
    const int64_t n = 1 + static_cast<int64_t>(rng() % m);
    const int ties = static_cast<int>(rng() % 4);
    const double sign = (rng() & 1) ? -1.0 : 1.0;
    const double p = std::array<double, 4>{0.15, 0.35, 0.6, 0.85}[rng() % 4];
    auto cost = random_cost<T>(rng, n, m, ties);
    forbid_randomly(rng, cost, p, sign);
    const double want = brute_force(cost, n, m, sign);  // sign * inf when infeasible
    const bool ok = std::isfinite(want);
    infeasible += !ok;
    CHECK(ok == feasible(cost, n, m, sign), "brute force and matching disagree on feasibility");
    const double tol = 1e-9 * std::max(std::abs(ok ? want : 0.0), finite_scale(cost) * m) + 1e-300;
    auto judge = [&](const char* what, int k, Status st, const std::vector<int64_t>& got) {
      const bool right = ok ? st == Status::Ok && valid_assignment<T>(got, n, m) &&
                                  std::abs(objective(cost, m, got) - want) <= tol
                            : st == Status::Infeasible;
      CHECK(right, "%s<%s> k=%d n=%lld m=%lld sign=%g p=%g ties=%d: %s, got %.17g, want %.17g", what,
            type_name(T{}), k, (long long)n, (long long)m, sign, p, ties, status_name(st),
            st == Status::Ok && valid_assignment<T>(got, n, m) ? objective(cost, m, got) : NAN, want);
    };
    std::vector<int64_t> got(n, -7);
    judge("solve_cpu_checked", 0, solve_cpu_checked(cost.data(), n, m, sign, got.data()), got);
    if (n == m)
      for (int k = 1; k < n; ++k)
        judge("sparse solve_cpu_checked", k, solve_cpu_checked(cost.data(), n, m, sign, got.data(), SolveOptions{1, k}),
              got);
    for (int nt : {1, 3, 32}) judge("block", nt, solve_simulated_checked(cost, n, m, sign, nt, Order::Shuffled, got), got);
  }
  CHECK(infeasible > trials / 10 && infeasible < trials * 9 / 10, "%d of %d infeasible: want a mix", infeasible, trials);
}

// Medium problems: the status against the matching check, the objective against the other solvers
// (dense CPU, sparse CPU, block), all forbidden-free when feasible.
template <typename T>
void forbidden_medium(std::mt19937_64& rng, int trials) {
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t n = 20 + static_cast<int64_t>(rng() % 140);
    const int64_t m = trial % 2 ? n : n + static_cast<int64_t>(rng() % 40);
    const double sign = (trial % 4 < 2) ? 1.0 : -1.0;
    auto cost = random_cost<T>(rng, n, m, trial % 3 == 0 ? 3 : 0);
    // sparse allowed sets near the feasibility threshold (about log n allowed pairs a row) or dense ones
    const double allowed = trial % 3 == 2 ? std::log(static_cast<double>(n)) / m : 0.5;
    forbid_randomly(rng, cost, 1.0 - allowed, sign);
    const bool ok = feasible(cost, n, m, sign);
    std::vector<int64_t> dense(n), sparse(n), block(n);
    const Status sd = solve_cpu_checked(cost.data(), n, m, sign, dense.data(), SolveOptions{n + 1, 0});
    CHECK(sd == (ok ? Status::Ok : Status::Infeasible), "dense n=%lld m=%lld: %s, feasible=%d", (long long)n,
          (long long)m, status_name(sd), ok);
    if (sd != Status::Ok || !valid_assignment<T>(dense, n, m)) continue;
    const double want = objective(cost, m, dense);
    const double tol = 1e-9 * std::max(std::abs(want), finite_scale(cost) * m);
    CHECK(std::isfinite(want), "dense n=%lld: uses a forbidden pair", (long long)n);
    if (n == m)
      for (int k : {2, 8}) {
        const Status ss = solve_cpu_checked(cost.data(), n, m, sign, sparse.data(), SolveOptions{1, k});
        CHECK(ss == Status::Ok && valid_assignment<T>(sparse, n, m) && std::abs(objective(cost, m, sparse) - want) <= tol,
              "sparse k=%d n=%lld: %s %.17g vs dense %.17g", k, (long long)n, status_name(ss),
              objective(cost, m, sparse), want);
      }
    const Status sb = solve_simulated_checked(cost, n, m, sign, 32, Order::Shuffled, block);
    CHECK(sb == Status::Ok && valid_assignment<T>(block, n, m) && std::abs(objective(cost, m, block) - want) <= tol,
          "block n=%lld m=%lld: %s %.17g vs dense %.17g", (long long)n, (long long)m, status_name(sb),
          objective(cost, m, block), want);
  }
}

// The sparse phase at its real size (n >= 640) with forbidden pairs: a band of allowed columns around a
// hidden permutation plus random allowed pairs, so candidate sets mix M entries and finite ones.
void forbidden_large_sparse(std::mt19937_64& rng) {
  const int64_t n = 700;
  for (double sign : {1.0, -1.0}) {
    auto cost = random_cost<float>(rng, n, n, 0);
    std::vector<int64_t> hidden(n);
    std::iota(hidden.begin(), hidden.end(), 0);
    std::shuffle(hidden.begin(), hidden.end(), rng);
    std::bernoulli_distribution keep(0.02);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t off = (j - hidden[i] + n) % n;
        if (off > 2 && !keep(rng)) cost[i * n + j] = static_cast<float>(sign * kInfD);
      }
    std::vector<int64_t> dense(n), sparse(n);
    const Status sd = solve_cpu_checked(cost.data(), n, n, sign, dense.data(), SolveOptions{n + 1, 0});
    const Status ss = solve_cpu_checked(cost.data(), n, n, sign, sparse.data());  // default options: sparse
    const double want = objective(cost, n, dense);
    CHECK(sd == Status::Ok && ss == Status::Ok && valid_assignment<float>(sparse, n, n) && std::isfinite(want) &&
              std::abs(objective(cost, n, sparse) - want) <= 1e-9 * finite_scale(cost) * n,
          "large sparse with forbidden pairs sign=%g: %s/%s %.17g vs %.17g", sign, status_name(ss), status_name(sd),
          objective(cost, n, sparse), want);
    // a forbidden row makes it infeasible
    for (int64_t j = 0; j < n; ++j) cost[123 * n + j] = static_cast<float>(sign * kInfD);
    CHECK(solve_cpu_checked(cost.data(), n, n, sign, sparse.data()) == Status::Infeasible,
          "large sparse with a forbidden row sign=%g: not infeasible", sign);
  }
}

// big_m's margin, exactly (long double has more bits than the double M): M exceeds the bound
// hi + (r - 1)(hi - lo) by at least M / 8, M and r M stay finite, and the scale is a power of two.
void big_m_margins(std::mt19937_64& rng) {
  CHECK(big_m(kInfD, -kInfD, 5).big == 1.0 && big_m(kInfD, -kInfD, 5).scale == 1.0, "no finite entry");
  CHECK(big_m(0.0, 0.0, 5).big == 1.0, "all finite costs zero");
  const double dmax = std::numeric_limits<double>::max(), tiny = std::numeric_limits<double>::denorm_min();
  std::vector<std::array<double, 2>> ranges{{-dmax, dmax}, {dmax, dmax}, {-dmax, -dmax}, {0, dmax}, {-1e300, 1e-300},
                                            {tiny, tiny}, {-tiny, tiny}, {1, 1}, {-5, -3}, {3, 5}, {-1e-20, 1e20}};
  std::uniform_real_distribution<double> expo(-300, 300);
  for (int i = 0; i < 200; ++i) {
    double a = std::pow(10.0, expo(rng)) * (rng() & 1 ? 1 : -1), b = std::pow(10.0, expo(rng)) * (rng() & 1 ? 1 : -1);
    ranges.push_back({std::min(a, b), std::max(a, b)});
  }
  for (auto [lo, hi] : ranges)
    for (int64_t rows : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{3072}, int64_t{1} << 31}) {
      const BigM bm = big_m(lo, hi, rows);
      const long double s = bm.scale, l = lo * s, h = hi * s, big = bm.big;
      const long double bound = h + static_cast<long double>(rows - 1) * (h - l);
      int e = 0;
      const bool pow2 = std::frexp(bm.scale, &e) == 0.5 && bm.scale <= 1.0;
      CHECK(pow2 && std::isfinite(bm.big) && std::isfinite(bm.big * static_cast<double>(rows) * 1e9) &&
                big - bound >= big / 8,
            "big_m(%g, %g, %lld): scale %g, big %g, bound %Lg", lo, hi, (long long)rows, bm.scale, bm.big, bound);
    }
}

// Costs near the top of the double range with forbidden pairs (big M needs the scale), and tiny ones
// (M must not swamp them): still the brute-force optimum. Objectives are compared on a copy scaled
// by a power of two, so that sums do not overflow.
void forbidden_extreme_magnitudes(std::mt19937_64& rng) {
  for (double scale : {5e307, 1e305, 1e-300, 1e-310}) {
    for (int trial = 0; trial < 60; ++trial) {
      const int64_t m = 2 + static_cast<int64_t>(rng() % 5);
      const int64_t n = 1 + static_cast<int64_t>(rng() % m);
      const double sign = (trial & 1) ? -1.0 : 1.0;
      auto cost = random_cost<double>(rng, n, m, 0);
      for (auto& c : cost) c = std::max(-1.0, std::min(1.0, c)) * scale;
      forbid_randomly(rng, cost, 0.3, sign);
      const double down = scale > 1 ? 0x1p-16 : 0x1p+16;
      std::vector<double> small(cost);
      for (auto& c : small) c *= down;
      const double want = brute_force(small, n, m, sign);
      for (int path = 0; path < 2; ++path) {
        std::vector<int64_t> got(n, -7);
        const Status st = path == 0 ? solve_cpu_checked(cost.data(), n, m, sign, got.data())
                                    : solve_simulated_checked(cost, n, m, sign, 32, Order::Shuffled, got);
        const bool right = std::isfinite(want)
                               ? st == Status::Ok && valid_assignment<double>(got, n, m) &&
                                     std::abs(objective(small, m, got) - want) <= 1e-9 * finite_scale(small) * m
                               : st == Status::Infeasible;
        CHECK(right, "%s scale=%g n=%lld m=%lld sign=%g: %s %.17g want %.17g", path ? "block" : "cpu", scale,
              (long long)n, (long long)m, sign, status_name(st),
              st == Status::Ok ? objective(small, m, got) : NAN, want);
      }
    }
  }
}

// Invalid entries: NaN anywhere; -inf when minimising, +inf when maximising; also next to forbidden
// pairs and in problems that would be infeasible. Forbidden-only edge cases.
template <typename T>
void invalid_and_infeasible_edges() {
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<int64_t> out(3, -7);
  for (double sign : {1.0, -1.0}) {
    const T forbid = static_cast<T>(sign) * inf, bad = -forbid;
    std::vector<T> c{1, 2, 3, 4, 5, 6, 7, 8, 9};
    for (int at = 0; at < 9; ++at) {
      for (T x : {nan, bad}) {
        auto d = c;
        d[at] = x;
        CHECK(solve_cpu_checked(d.data(), 3, 3, sign, out.data()) == Status::Invalid, "invalid at %d sign=%g", at, sign);
        d[(at + 4) % 9] = forbid;
        CHECK(solve_cpu_checked(d.data(), 3, 3, sign, out.data()) == Status::Invalid, "invalid + forbidden at %d", at);
        std::vector<int64_t> sim;
        CHECK(solve_simulated_checked(d, 3, 3, sign, 3, Order::Forward, sim) == Status::Invalid, "block invalid");
      }
    }
    std::vector<T> all(3 * 4, forbid);
    CHECK(solve_cpu_checked(all.data(), 3, 4, sign, out.data()) == Status::Infeasible, "all forbidden sign=%g", sign);
    std::vector<int64_t> sim;
    CHECK(solve_simulated_checked(all, 3, 4, sign, 32, Order::Shuffled, sim) == Status::Infeasible, "block all forbidden");
    all[5] = 2;  // 1 x 1 allowed pair in a 3-row problem: still infeasible
    CHECK(solve_cpu_checked(all.data(), 3, 4, sign, out.data()) == Status::Infeasible, "one allowed pair");
    std::vector<T> one{forbid};
    CHECK(solve_cpu_checked(one.data(), 1, 1, sign, out.data()) == Status::Infeasible, "1x1 forbidden");
    // scipy's case: the first column forbidden in a square problem
    std::vector<T> eye{forbid, 0, 0, forbid, 1, 0, forbid, 0, 1};
    CHECK(solve_cpu_checked(eye.data(), 3, 3, sign, out.data()) == Status::Infeasible, "forbidden column, square");
    // a forbidden column is fine when there are spare columns; the optimum avoids it
    std::vector<T> wide{forbid, 4, 1, forbid, 2, 8};
    CHECK(solve_cpu_checked(wide.data(), 2, 3, sign, out.data()) == Status::Ok && out[0] != 0 && out[1] != 0,
          "forbidden column, 2x3");
    // scipy's rectangular-variant case: only the anti-diagonal-ish pairs allowed
    std::vector<T> sc{10, forbid, forbid, forbid, forbid, 1, forbid, 7, forbid};
    for (auto& e : sc)
      if (std::isfinite(e)) e = static_cast<T>(sign) * e;
    CHECK(solve_cpu_checked(sc.data(), 3, 3, sign, out.data()) == Status::Ok && out[0] == 0 && out[1] == 2 &&
              out[2] == 1,
          "scipy's forbidden case sign=%g: %lld %lld %lld", sign, (long long)out[0], (long long)out[1],
          (long long)out[2]);
  }
  // M must exceed hi + (r - 1)(hi - lo), not just (r + 1) max|c| + 1 (= 6 here; lap.h): the identity at
  // cost 1 is the only allowed assignment, and the cycle of -1 entries closed by forbidden (0, 3)
  // would cost M - 3
  for (double sign : {1.0, -1.0}) {
    std::vector<T> cyc(16, static_cast<T>(sign) * inf);
    for (int i = 0; i < 4; ++i) cyc[i * 4 + i] = static_cast<T>(sign);
    for (int i = 1; i < 4; ++i) cyc[i * 4 + i - 1] = static_cast<T>(-sign);
    std::vector<int64_t> got(4, -7), sim;
    CHECK(solve_cpu_checked(cyc.data(), 4, 4, sign, got.data()) == Status::Ok && got == std::vector<int64_t>({0, 1, 2, 3}),
          "cycle closed by a forbidden pair, sign=%g", sign);
    CHECK(solve_simulated_checked(cyc, 4, 4, sign, 32, Order::Shuffled, sim) == Status::Ok &&
              sim == std::vector<int64_t>({0, 1, 2, 3}),
          "block: cycle closed by a forbidden pair, sign=%g", sign);
  }
  // all-finite problems take the unchanged path: the same answer as solve_cpu
  std::mt19937_64 rng(9);
  auto c = random_cost<T>(rng, 30, 41, 0);
  std::vector<int64_t> a(30), b(30);
  solve_cpu(c.data(), 30, 41, 1.0, a.data());
  CHECK(solve_cpu_checked(c.data(), 30, 41, 1.0, b.data()) == Status::Ok && a == b, "finite: same as solve_cpu");
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--stats") return stats(std::atoll(argv[2]));
  std::mt19937_64 rng(2024);
  small_vs_brute_force<double>(rng, 400);
  small_vs_brute_force<float>(rng, 400);
  large_vs_cpu<double>(rng, 16);
  large_vs_cpu<float>(rng, 16);
  sparse_phase_vs_brute_force<double>(rng, 300);
  sparse_phase_vs_brute_force<float>(rng, 300);
  magnitudes(rng);
  edge_cases();
  tie_work();
  tie_heavy_large();
  forbidden_vs_brute_force<double>(rng, 600);
  forbidden_vs_brute_force<float>(rng, 600);
  forbidden_medium<double>(rng, 24);
  forbidden_medium<float>(rng, 12);
  forbidden_large_sparse(rng);
  big_m_margins(rng);
  forbidden_extreme_magnitudes(rng);
  invalid_and_infeasible_edges<double>();
  invalid_and_infeasible_edges<float>();
  std::printf("test_lap: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
