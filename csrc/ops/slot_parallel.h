// How the CPU grouped-FFN ops (forward and backward) spread slots over threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

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

// run_slot(s) for every slot with rows, spread over threads by the rule above.
template <typename F>
void for_each_slot(const std::vector<int64_t>& slot_rows, F&& run_slot) {
  const int64_t active = std::count_if(slot_rows.begin(), slot_rows.end(), [](int64_t n) { return n > 0; });
  const int64_t threads = at::get_num_threads();
  if (!slot_rows.empty() && use_slot_parallelism(*std::max_element(slot_rows.begin(), slot_rows.end()), active, threads)) {
    const auto work = deal_slots(slot_rows, threads);
    const bool inference = c10::InferenceMode::is_enabled();  // thread-local: carry it into the workers
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard(inference);
      for (int64_t t = begin; t < end; ++t)
        for (int64_t s : work[t]) run_slot(s);
    });
  } else {
    for (int64_t s = 0; s < static_cast<int64_t>(slot_rows.size()); ++s)
      if (slot_rows[s] > 0) run_slot(s);
  }
}

}  // namespace mcsmoe::ops
