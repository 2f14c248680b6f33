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

#include "lap_phases.h"

namespace mcsmoe::lap {

// True when every one of the `count` entries is finite (no NaN, no inf).
template <typename T>
bool all_finite(const T* data, int64_t count);

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
// Writes col4row[n]. Inputs must be finite (checked by the caller).
template <typename T>
void solve_cpu(const T* cost, int64_t n, int64_t m, double sign, int64_t* col4row, SolveOptions options = {});

#ifdef MCSMOE_WITH_CUDA
// Solves `batch` problems of shape [n, m] (contiguous), one thread block per problem.
// workspace: lap_cuda_workspace_bytes(batch, n, m) bytes of device memory.
size_t lap_cuda_workspace_bytes(int64_t batch, int64_t n, int64_t m);
template <typename T>
void solve_cuda(const T* cost, int64_t batch, int64_t n, int64_t m, double sign, int64_t* col4row,
                void* workspace, void* stream);
#endif

}  // namespace mcsmoe::lap
