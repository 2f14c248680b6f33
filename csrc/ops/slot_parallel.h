// How the CPU grouped-FFN ops (forward and backward) spread slots over threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <vector>

namespace mcsmoe::ops {

// Measured here (2 threads, Mixtral-shaped fp32, T = 1..1024): one single-threaded GEMM per thread
// beats threaded GEMMs whenever there are at least as many busy slots as threads (no barriers, and
// small-M GEMMs scale badly across threads), up to 1.6x at T = 16; threaded GEMMs win only with
// fewer busy slots than threads or very large, few slots (G = 2, T = 1024: within 4%). Measured again
// with the oneDNN GEMMs (G = 8, 4, 2; T = 16, 128, 1024): the same choices hold (slot parallelism up to
// 15% faster where it is chosen, equal within noise at G = 2, T = 1024).
inline bool use_slot_parallelism(int64_t max_rows, int64_t active_slots, int64_t threads) {
  if (const char* env = std::getenv("MCSMOE_SLOT_PARALLEL")) return env[0] == '1';
  return threads > 1 && active_slots >= threads && (max_rows <= 512 || active_slots >= 2 * threads);
}

// Slots dealt to threads largest first, each to the least loaded thread (rows as the cost).
inline std::vector<std::vector<int64_t>> deal_slots(const std::vector<int64_t>& rows, int64_t threads) {
  std::vector<int64_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rows[a] > rows[b]; });
  std::vector<std::vector<int64_t>> work(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t s : order) {
    if (rows[s] == 0) continue;
    const auto t = std::min_element(load.begin(), load.end()) - load.begin();
    work[t].push_back(s);
    load[t] += rows[s];
  }
  return work;
}

}  // namespace mcsmoe::ops
