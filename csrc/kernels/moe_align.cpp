// CPU routing alignment: one pass to deduplicate each token's slots and count pairs per slot, a
// prefix sum, a stable placement pass, then each token's rows in ascending slot order. O(T*k^2 + S);
// serial, as it is a small fraction of the FFN it feeds.
#include "kernels/moe_align.h"

#include <vector>

namespace mcsmoe::moe {

template <typename IW, typename W>
AlignStatus align_cpu(const int64_t* top_k_index, const IW* top_k_weights, const int64_t* expert_map,
                      int64_t T, int64_t k, int64_t E, int64_t S, int64_t* sorted_tokens, int64_t* offsets,
                      W* sorted_weights, int64_t* token_rows) {
  AlignStatus st;
  for (int64_t e = 0; e < E; ++e) {
    if (expert_map[e] < 0 || expert_map[e] >= S) return {2, e, expert_map[e]};
  }
  const int64_t n = T * k;
  std::vector<int64_t> pair_slot(n, -1);  // slot of (t, j) on its first occurrence in row t, else -1
  std::vector<W> pair_weight(n, W(0));
  std::vector<int64_t> count(S + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j, e = top_k_index[i];
      if (e == -1) continue;
      if (e < -1 || e >= E) return {1, i, e};
      const int64_t s = expert_map[e];
      int64_t first = -1;
      for (int64_t jj = 0; jj < j && first < 0; ++jj) {
        if (pair_slot[t * k + jj] == s) first = t * k + jj;
      }
      if (first >= 0) {
        pair_weight[first] += static_cast<W>(top_k_weights[i]);
      } else {
        pair_slot[i] = s;
        pair_weight[i] = static_cast<W>(top_k_weights[i]);
        ++count[s];
      }
    }
  }
  offsets[0] = 0;
  for (int64_t s = 0; s < S; ++s) offsets[s + 1] = offsets[s] + count[s];
  std::vector<int64_t> cursor(offsets, offsets + S);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = pair_slot[i];
    if (s < 0) continue;
    const int64_t row = cursor[s]++;
    sorted_tokens[row] = i / k;
    sorted_weights[row] = pair_weight[i];
  }
  for (int64_t row = offsets[S]; row < n; ++row) {
    sorted_tokens[row] = -1;
    sorted_weights[row] = W(0);
  }
  // Rows are in slot order, so walking them fills each token's list in ascending slot order.
  std::vector<int64_t> filled(T, 0);
  for (int64_t i = 0; i < n; ++i) token_rows[i] = -1;
  for (int64_t row = 0; row < offsets[S]; ++row) {
    const int64_t t = sorted_tokens[row];
    token_rows[t * k + filled[t]++] = row;
  }
  return st;
}

#define MCSMOE_ALIGN_CPU(IW, W)                                                                              \
  template AlignStatus align_cpu<IW, W>(const int64_t*, const IW*, const int64_t*, int64_t, int64_t, int64_t, \
                                        int64_t, int64_t*, int64_t*, W*, int64_t*);
MCSMOE_ALIGN_CPU(float, float)
MCSMOE_ALIGN_CPU(double, double)
MCSMOE_ALIGN_CPU(float, double)
MCSMOE_ALIGN_CPU(double, float)
#undef MCSMOE_ALIGN_CPU

}  // namespace mcsmoe::moe
