// The grouped expert FFN's pieces that are not GEMMs (torch-free; the GEMMs go through ATen): the combine
// of each token's slot rows (CPU template, shared by the forward and the backward's sum of dX rows), and
// on the GPU the fused gated activation and the same combine.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/activation.h"
#include "kernels/dtype.h"

namespace mcsmoe::moe {

// For tokens t in [t_begin, t_end): out[t] [d] = sum_j weights[row] * y[row] over row = token_rows[t, j]
// until the first -1 (0 if none), summed in Acc and rounded to T once. weights == nullptr: unit weights,
// the plain sum (the backward's gradient of each token from its slots' dX rows). y [rows, d] and out [*, d]
// are contiguous rows; token_rows [*, k]. The CPU ops call it per chunk of tokens from a parallel loop.
template <typename T, typename Acc>
void combine_token_rows(const T* y, const Acc* weights, const int64_t* token_rows, int64_t t_begin, int64_t t_end,
                        int64_t k, int64_t d, T* out) {
  std::vector<Acc> acc(d);
  for (int64_t t = t_begin; t < t_end; ++t) {
    std::fill(acc.begin(), acc.end(), Acc(0));
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = token_rows[t * k + j];
      if (row < 0) break;
      const T* yr = y + row * d;
      if (weights != nullptr) {
        const Acc w = weights[row];
        for (int64_t x = 0; x < d; ++x) acc[x] += static_cast<Acc>(yr[x]) * w;
      } else {
        for (int64_t x = 0; x < d; ++x) acc[x] += static_cast<Acc>(yr[x]);
      }
    }
    for (int64_t x = 0; x < d; ++x) out[t * d + x] = static_cast<T>(acc[x]);
  }
}

#ifdef MCSMOE_WITH_CUDA
// a[r, j] = act(h[r, j]) * h[r, ff + j] for h [n, 2*ff] (row stride ldh) -> a [n, ff] contiguous; float math.
// fn = clamped_swiglu: a[r, j] = clamped_swiglu(h[r, j], h[r, ff + j], alpha, limit) (activation.h).
void gated_act_cuda(const void* h, int64_t ldh, void* a, int64_t n, int64_t ff, ActFn fn, float alpha, float limit,
                    Dtype dtype, void* stream);
// combine_token_rows on the GPU for every token t < T (float accumulation; weights must not be null).
void combine_cuda(const void* y, const float* weights, const int64_t* token_rows, int64_t T, int64_t k, int64_t d,
                  void* out, Dtype dtype, void* stream);
#endif

}  // namespace mcsmoe::moe
