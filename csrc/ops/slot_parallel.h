// How the CPU grouped-FFN ops (forward and backward) spread their work over threads: slots in parallel or
// one after another (for_each_slot), each slot's rows in blocks (for_each_row_block), small calls on the
// calling thread alone (SingleThreadIf); the forward may also cut a slot's rows between threads (balanced).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "ops/autotune.h"

namespace mcsmoe::ops {

// Measured here (2 threads, Mixtral-shaped fp32, T = 1..1024): one single-threaded GEMM per thread
// beats threaded GEMMs whenever there are at least as many busy slots as threads (no barriers, and
// small-M GEMMs scale badly across threads), up to 1.6x at T = 16; threaded GEMMs win only with
// fewer busy slots than threads or very large, few slots (G = 2, T = 1024: within 4%). Measured again
// with the oneDNN GEMMs (G = 8, 4, 2; T = 16, 128, 1024): the same choices hold (slot parallelism up to
// 15% faster where it is chosen, equal within noise at G = 2, T = 1024). Many small experts, Qwen3-shaped
// (E 128, ff 768, top-8; G = 128 and 32, T = 1..1024): chosen everywhere, 1.03-1.42x faster than threaded
// GEMMs, and as fast as the op's GEMMs timed alone on threaded oneDNN (-9% to +3%); at T = 128 and 1024
// 9-10% above half their single-thread time (gather, activation, combine; T <= 16 is bound by memory
// bandwidth, which two threads do not double). The time goes to oneDNN's small-M GEMMs (about 8 rows a
// slot at T = 128: 40 GFLOP/s a thread against 90 at 64 rows), not to the schedule.
// This rule is the default (MCSMOE_AUTOTUNE=0); otherwise for_each_slot times both schedules per shape class
// (autotune.h; MCSMOE_SLOT_PARALLEL=0/1 or sequential/parallel pins one).
inline bool use_slot_parallelism(int64_t max_rows, int64_t active_slots, int64_t threads) {
  return threads > 1 && active_slots >= threads && (max_rows <= 512 || active_slots >= 2 * threads);
}

// Busy slots, largest first (rows as the cost; ties in slot order).
inline std::vector<int64_t> slots_largest_first(const std::vector<int64_t>& rows) {
  std::vector<int64_t> order;
  for (int64_t s = 0; s < static_cast<int64_t>(rows.size()); ++s)
    if (rows[s] > 0) order.push_back(s);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rows[a] > rows[b]; });
  return order;
}

// Where thread t's share of the "balanced" schedule starts: t R / P of all R rows (slots in order), moved to
// the slot boundary before or after it when the cut would leave a piece of fewer than kMinPiece rows (each
// piece streams its slot's weights once: measured here, a 9-row piece cost as much as the balance gained).
constexpr int64_t kMinPiece = 32;
inline int64_t balanced_cut(const std::vector<int64_t>& slot_rows, int64_t total, int64_t t, int64_t threads) {
  const int64_t cut = total * t / threads;
  int64_t start = 0;
  for (const int64_t n : slot_rows) {
    if (cut < start + n) {
      if (cut - start < kMinPiece) return start;
      return start + n - cut < kMinPiece ? start + n : cut;
    }
    start += n;
  }
  return total;
}

// Thread t's share: rows [cut(t), cut(t + 1)) as run(s, begin, end), rows [begin, end) counted from slot s's
// first row (at most two slots cut).
template <typename F>
void balanced_share(const std::vector<int64_t>& slot_rows, int64_t total, int64_t t, int64_t threads, F&& run) {
  const int64_t lo = balanced_cut(slot_rows, total, t, threads), hi = balanced_cut(slot_rows, total, t + 1, threads);
  int64_t start = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(slot_rows.size()) && start < hi; start += slot_rows[s++]) {
    const int64_t begin = std::max(lo, start), end = std::min(hi, start + slot_rows[s]);
    if (begin < end) run(s, begin - start, end - start);
  }
}

// The slots' rows spread over threads, as run(s, begin, end) (rows [begin, end) of slot s, counted from its
// first row). Three schedules (decision slot_parallel):
// - sequential: slots in turn, each whole, threaded GEMMs;
// - parallel: each thread takes the next whole slot, largest first, from a shared counter (longest-processing-
//   time order), single-threaded GEMMs; not a list dealt in advance: a thread the OS deschedules on a busy
//   machine no longer holds back the slots dealt to it. Measured here (2 threads, fp32, one competing CPU-bound
//   process): Qwen3-shaped (E 128, ff 768) 1.02-1.29x faster at G = 128 and 1.01-1.45x at G = 32, Mixtral-
//   shaped G = 8 1.02-1.30x, T = 16..1024; on an idle machine equal within noise (0.99-1.03x);
// - balanced (only where a slot's rows may be cut, `splittable`: the forward, not the backward, whose weight
//   gradients sum over a slot's rows): every thread about the same number of rows (balanced_share), single-
//   threaded GEMMs. Few merged slots on many threads, or slots of uneven sizes, leave no thread idle.
// The default is the rule above (use_slot_parallelism: sequential or parallel); with timing on, the three are
// timed per shape class. `shape`: the op and its widths (dtype, d, F, ...); the shape class adds threads, busy
// slots and the largest slot's rows (powers of two).
template <typename F>
void schedule_slots(const std::vector<int64_t>& slot_rows, const std::string& shape, bool splittable, F&& run) {
  if (slot_rows.empty()) return;
  const int64_t active = std::count_if(slot_rows.begin(), slot_rows.end(), [](int64_t n) { return n > 0; });
  const int64_t threads = at::get_num_threads();
  const int64_t max_rows = *std::max_element(slot_rows.begin(), slot_rows.end());
  const std::string key = shape + " threads=" + std::to_string(threads) + " busy<=" +
                          std::to_string(autotune::bucket(active)) + " rows<=" +
                          std::to_string(autotune::bucket(max_rows));
  const bool balance = splittable && threads > 1;
  // Timed only where the schedules differ: two threads or more, and two busy slots or more (or a slot to cut).
  autotune::Choice choice(autotune::kSlotParallel, key, use_slot_parallelism(max_rows, active, threads) ? 1 : 0,
                          balance ? 0b111 : 0b11, threads > 1 && (active > 1 || balance));
  if (choice.index == 0) {
    for (int64_t s = 0; s < static_cast<int64_t>(slot_rows.size()); ++s)
      if (slot_rows[s] > 0) run(s, int64_t{0}, slot_rows[s]);
    return;
  }
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: carry it into the workers
  const auto order = slots_largest_first(slot_rows);
  const int64_t total = std::accumulate(slot_rows.begin(), slot_rows.end(), int64_t{0});
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    if (choice.index == 2) {
      for (int64_t t = begin; t < end; ++t) balanced_share(slot_rows, total, t, threads, run);
      return;
    }
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < order.size();)
      run(order[i], int64_t{0}, slot_rows[order[i]]);
  });
}

// run_slot(s) for every slot with rows, each slot whole on one thread (sequential or parallel).
template <typename F>
void for_each_slot(const std::vector<int64_t>& slot_rows, const std::string& shape, F&& run_slot) {
  schedule_slots(slot_rows, shape, /*splittable=*/false, [&](int64_t s, int64_t, int64_t) { run_slot(s); });
}

// Rows of every slot: rows[s] = offsets[s + 1] - offsets[s] (offsets [S + 1] from the alignment).
inline std::vector<int64_t> rows_per_slot(const int64_t* offsets, int64_t S) {
  std::vector<int64_t> rows(S);
  for (int64_t s = 0; s < S; ++s) rows[s] = offsets[s + 1] - offsets[s];
  return rows;
}

// f(r, n) over rows [begin, end) of one slot in even blocks of at most kRowBlock rows, which bound the
// [rows, F] intermediates (29 MB for Mixtral's F = 7168). Measured here, Mixtral-shaped, 1608 rows: blocks
// of 1024 or more run at full speed, 512-row blocks cost 5-8% on the first GEMM, and a small remainder
// block costs more again.
constexpr int64_t kRowBlock = 1024;
template <typename F>
void for_each_row_block(int64_t begin, int64_t end, F&& f) {
  const int64_t rows = end - begin;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t block = blocks > 0 ? (rows + blocks - 1) / blocks : 0;
  for (int64_t r = begin; r < end; r += block) f(r, std::min(block, end - r));
}

// Calls below kSmallCallMacs multiply-adds run on the calling thread alone (SingleThreadIf): measured here,
// a 32 x 64 expert FFN on 64 tokens takes 0.068 ms on one thread and 0.078 ms on two, and on a busy
// machine a thread the OS has descheduled stalls every barrier of a call that had no work to share.
constexpr int64_t kSmallCallMacs = int64_t{1} << 20;
// While alive, OpenMP parallel regions started by this thread (ATen's, oneDNN's) use one thread.
class SingleThreadIf {
 public:
  explicit SingleThreadIf(bool on) {
#ifdef _OPENMP
    if (on && omp_get_max_threads() > 1) {
      saved_ = omp_get_max_threads();
      omp_set_num_threads(1);
    }
#endif
  }
  ~SingleThreadIf() {
#ifdef _OPENMP
    if (saved_ > 0) omp_set_num_threads(saved_);
#endif
  }
  SingleThreadIf(const SingleThreadIf&) = delete;
  SingleThreadIf& operator=(const SingleThreadIf&) = delete;

 private:
  int saved_ = 0;
};

}  // namespace mcsmoe::ops
