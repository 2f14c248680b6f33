// Linear assignment (rectangular, n <= m): minimise sum_i sign * cost[i][col[i]] over injective col.
// Torch-free. The CPU solver is Jonker-Volgenant: column reduction and reduction transfer (square
// problems), augmenting row reduction, then shortest augmenting paths, all with float64 column
// prices v[j]. Invariants the phases keep (see lap.cpp):
//   (I) an assigned row's column minimises its reduced cost c(i, j) - v[j];
//   (R) for n < m, v[j] <= 0 everywhere and v[j] == 0 on unassigned columns
//       (the dual conditions of the rectangular problem).
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>

#include "lap_phases.h"

namespace mcsmoe::lap {

// True when every one of the `count` entries is finite (no NaN, no inf).
template <typename T>
bool all_finite(const T* data, int64_t count);

// ---- forbidden pairs (scipy's contract) ---------------------------------------------------------
// In the signed cost sign * c(i, j), +inf marks a forbidden pair (c = +inf when minimising, -inf when
// maximising); NaN and -inf (c = -inf when minimising, +inf when maximising) are invalid. A problem
// is infeasible when every assignment uses a forbidden pair.
//
// Forbidden pairs are solved exactly with a finite "big M": each forbidden entry becomes M, chosen
// per problem so that every assignment that uses a forbidden pair costs more than every assignment
// that does not. Then the optimum of the substituted problem is an optimum of the original one when
// the original is feasible, and uses a forbidden pair exactly when it is infeasible. Proof, for r
// rows (r <= columns; every assignment has r entries) and finite signed costs in [lo, hi]:
//   an assignment without forbidden pairs costs at most r * hi;
//   one with at least one costs at least M + (r - 1) * lo (its other entries are finite >= lo or M >= lo);
//   so M > hi + (r - 1) * (hi - lo) suffices. (It does not follow from M > r * max|c|: with r = 4,
//   the identity at cost 1 the only allowed assignment, and a cycle of -1 entries closed by one
//   forbidden pair, that cycle costs M - 3 < 4 for M = (r + 1) max|c| + 1 = 6.) big_m takes, with
//   a = max(|lo|, |hi|) > 0,
//     M = hi + (r + 1) * ((hi - lo) + a),
//   which exceeds that bound by 2 (hi - lo) + (r + 1) a >= M / 4 (as M <= (3r + 4) a): a margin far
//   above the rounding of computing M (a few ulps of M) and of the float64 duals, so floating point
//   cannot make a forbidden pair look cheaper than a feasible assignment. (a = 0: all finite costs are
//   0 and M = 1 suffices; no finite entry at all: every assignment is forbidden, M = 1.)
// Overflow: M and the duals must remain finite, so when (3r + 4) a exceeds 2^960 every finite cost is
// first multiplied by scale = 2^-e, which keeps M below 2^960 and leaves the duals a factor 2^63 of
// headroom. The scaling is exact but for costs below 2^(e - 1022), which lose bits to underflow;
// next to a > 2^900 they are far below the duals' precision anyway.
// Precision: with M in play the duals can reach magnitudes of about r * a instead of a, which costs up
// to log2(3r + 4) of float64's 53 bits in the objective (1e-12 relative at r = 3000). float32 costs
// become float64 values exactly.
struct BigM {
  double scale = 1.0;  // a power of two; substituted cost = sign * c * scale
  double big = 1.0;    // substituted cost of a forbidden pair
};
BigM big_m(double lo, double hi, int64_t rows);

// One problem's entries classified: invalid (NaN or signed -inf), forbidden (signed +inf) count, and
// the range [lo, hi] of the finite signed costs (lo = +inf, hi = -inf when there is none).
struct CostScan {
  bool invalid = false;
  int64_t forbidden = 0;
  double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
};
template <typename T>
CostScan scan_costs(const T* cost, int64_t count, double sign);

// out[k] = sign * cost[k] * bm.scale, or bm.big where that is a forbidden pair (signed +inf); a
// problem to minimise (sign +1). Needs no invalid entry (scan_costs first).
template <typename T>
void substitute_forbidden(const T* cost, int64_t count, double sign, BigM bm, double* out);

// True when row i's column in col4row[n] is a forbidden pair of cost [n, m].
template <typename T>
bool uses_forbidden(const T* cost, int64_t n, int64_t m, double sign, const int64_t* col4row);

// Square problems of at least sparse_min_size rows first work on each row's sparse_k best columns
// (selected once, in float): augmenting row reduction, then heap-based Dijkstra searches, O(k log m)
// per step instead of O(m). A dense check then finds every row whose column no longer minimises its
// reduced cost; those rows get fresh candidates and one more round of sparse searches, and whatever
// still fails is finished by the dense solver. The result is exactly optimal either way.
struct SolveOptions {
  int64_t sparse_min_size = 640;  // measured crossover (random and weight-matching costs): 512-768
  int sparse_k = 32;
};

// Solves one problem. cost is row-major [n, m] with n <= m; sign is +1 (minimise) or -1 (maximise).
// Writes col4row[n]. Inputs must be finite (solve_cpu_checked takes any).
template <typename T>
void solve_cpu(const T* cost, int64_t n, int64_t m, double sign, int64_t* col4row, SolveOptions options = {});

enum class Status : uint8_t { Ok = 0, Invalid = 1, Infeasible = 2 };

// solve_cpu for costs that may hold forbidden pairs and invalid entries (see BigM). All-finite costs
// take solve_cpu directly after one vectorized check; others are solved on a float64 copy with big
// M. col4row is meaningful for Ok only.
template <typename T>
Status solve_cpu_checked(const T* cost, int64_t n, int64_t m, double sign, int64_t* col4row,
                         SolveOptions options = {});

#ifdef MCSMOE_WITH_CUDA
// Solves `batch` problems of shape [n, m] (contiguous), one thread block per problem.
// workspace: lap_cuda_workspace_bytes(batch, n, m) bytes of device memory.
size_t lap_cuda_workspace_bytes(int64_t batch, int64_t n, int64_t m);
template <typename T>
void solve_cuda(const T* cost, int64_t batch, int64_t n, int64_t m, double sign, int64_t* col4row,
                void* workspace, void* stream);
#endif

}  // namespace mcsmoe::lap
