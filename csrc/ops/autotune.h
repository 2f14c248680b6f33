// Choices by measurement: the CPU ops pick among equivalent candidates (thread schedules, GEMM backends,
// the compressed linear's paths) by timing them on the running machine, once per process and shape class,
// the way cuBLASLt's heuristics or Triton's autotuner do on GPUs.
//
// How: the first calls of a shape class are the trials. Each trial call runs one candidate, in turn
// (round robin, so a noisy neighbour hits every candidate alike), and times it; the first run of each
// candidate is a warm-up and not counted (caches, oneDNN primitive creation, page faults). Once every
// candidate has `reps` timed runs (MCSMOE_AUTOTUNE_REPS, default 3), the one with the lowest median wins
// (ties: the default) and every later call of that class runs it with no timing at all. The trials do real
// work: nothing is run twice. Nested choices settle inside out: a trial during which another trial started
// (a nested choice, e.g. the GEMM backend inside a slot schedule, still being measured) is not counted (up to
// kMaxDiscarded times per candidate, which bounds the trials), so an outer choice compares its candidates
// each with its own inner choices settled, never with their slow candidates mid-measurement.
//
// Results: every candidate computes the same function; they differ only in floating-point rounding
// (summation order, one rounding of an fp32 GEMM to bf16 instead of the GEMM's own). The tests force each
// candidate and compare it with the reference, so each stays correct on any machine.
//
// Switches (a value that means nothing raises, naming the variable): MCSMOE_AUTOTUNE=0 (1, the default, is on) or
// torch.use_deterministic_algorithms(True) turns timing off (each decision
// takes its deterministic default, the rule measured on one machine); a decision's own variable pins one candidate by label or index (e.g.
// MCSMOE_SLOT_PARALLEL=1, MCSMOE_GEMM=fp32); a pinned candidate a call cannot run falls back to the default.
// The cache is readable (snapshot, mcsmoe_fast.ops.autotune_choices()) and can be cleared (reset).
#pragma once

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace mcsmoe::ops::autotune {

// One decision: its name, the variable that pins it, its candidates' labels (at most 32).
struct Decision {
  const char* name;
  const char* env;
  std::vector<const char*> labels;
};

constexpr int kMaxDiscarded = 64;

struct Entry {
  std::vector<std::vector<double>> samples;  // seconds, per candidate
  std::vector<int> warm, discarded;
  uint32_t available = 0;
  int fallback = 0, next = 0, winner = -1;
};

struct State {
  std::mutex mutex;
  std::map<std::string, Entry> entries;  // "<decision> <shape class>"
  std::atomic<uint64_t> trials{0};       // trials started, ever (nested-trial detection)
};

inline State& state() {
  static State s;
  return s;
}

// Timing is off under MCSMOE_AUTOTUNE=0 and under torch.use_deterministic_algorithms(True): a winner chosen by
// timing can differ between runs, and so would the rounding of everything computed after it (a rerun or a
// resumed training run would not end bit for bit where the first one did).
inline bool enabled() {
  const char* env = std::getenv("MCSMOE_AUTOTUNE");
  return !(env && std::strcmp(env, "0") == 0) && !at::globalContext().deterministicAlgorithms();
}

// MCSMOE_AUTOTUNE_REPS: timed runs per candidate, a whole number from 1 to 50 (3 when unset); -1 for anything else.
inline int parse_reps() {
  const char* env = std::getenv("MCSMOE_AUTOTUNE_REPS");
  if (env == nullptr || env[0] == '\0') return 3;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  return *end == '\0' && n >= 1 && n <= 50 ? static_cast<int>(n) : -1;
}

inline int reps() { return std::max(1, parse_reps()); }

// Refuses a value of MCSMOE_AUTOTUNE or MCSMOE_AUTOTUNE_REPS that means nothing (e.g. MCSMOE_AUTOTUNE=off would leave
// timing on). Called where a choice starts, never from a destructor.
inline void check_switches() {
  const char* on = std::getenv("MCSMOE_AUTOTUNE");
  TORCH_CHECK_VALUE(on == nullptr || on[0] == '\0' || std::strcmp(on, "0") == 0 || std::strcmp(on, "1") == 0,
                    "MCSMOE_AUTOTUNE=", on, " is not 0 or 1 (0 turns the timing of the CPU ops' choices off)");
  TORCH_CHECK_VALUE(parse_reps() > 0, "MCSMOE_AUTOTUNE_REPS=", std::getenv("MCSMOE_AUTOTUNE_REPS"),
                    " is not a whole number from 1 to 50 (the timed runs per candidate)");
}

// The candidate a decision's variable pins, or -1 when it is unset. A label or an index; anything else raises.
inline int pinned(const Decision& d) {
  const char* env = std::getenv(d.env);
  if (env == nullptr || env[0] == '\0') return -1;
  for (size_t i = 0; i < d.labels.size(); ++i)
    if (std::strcmp(env, d.labels[i]) == 0 || std::to_string(i) == env) return static_cast<int>(i);
  std::string names;
  for (size_t i = 0; i < d.labels.size(); ++i) names += (i ? ", " : "") + std::to_string(i) + "/" + d.labels[i];
  TORCH_CHECK_VALUE(false, d.env, "=", env, " names no candidate of ", d.name, "; expected one of ", names);
}

inline double median(std::vector<double> v) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Sets e.winner once every available candidate has its timed runs: the lowest median (ties: the default).
inline void decide(Entry& e) {
  const int n = static_cast<int>(e.samples.size()), want = reps();
  int best = -1;
  double best_time = 0;
  for (int c = 0; c < n; ++c) {
    if (!(e.available >> c & 1u)) continue;
    if (static_cast<int>(e.samples[c].size()) < want) return;  // still measuring
    const double m = median(e.samples[c]);
    if (best < 0 || m < best_time || (m == best_time && c == e.fallback)) best = c, best_time = m;
  }
  e.winner = best;
}

// The candidate to run (RAII: a trial records its time when it goes out of scope without an exception).
class Choice {
 public:
  // fallback: the deterministic default; available: the candidates this call can run (bit c = candidate c);
  // measure = false: no timing for this call (nothing to choose here), though a pin still applies.
  Choice(const Decision& d, const std::string& shape, int fallback, uint32_t available, bool measure = true)
      : index(fallback) {
    check_switches();
    available &= (d.labels.size() >= 32 ? ~uint32_t{0} : (uint32_t{1} << d.labels.size()) - 1);
    if (!(available >> fallback & 1u)) available |= uint32_t{1} << fallback;  // the default always runs
    const int pin = pinned(d);
    if (pin >= 0) {
      index = (available >> pin & 1u) ? pin : fallback;
      return;
    }
    if (!measure || !enabled() || (available & (available - 1)) == 0) return;  // off, or one candidate
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    Entry& e = st.entries[std::string(d.name) + " " + shape];
    if (e.samples.empty()) {
      const size_t n = d.labels.size();
      e.samples.resize(n);
      e.warm.assign(n, 0);
      e.discarded.assign(n, 0);
      e.available = available;
      e.fallback = fallback;
    }
    if (e.winner >= 0) {
      index = (available >> e.winner & 1u) ? e.winner : fallback;
      return;
    }
    e.available &= available;  // a candidate found unusable since (e.g. a backend refusing the dtype) drops out
    // the next candidate in turn that still needs runs
    const int n = static_cast<int>(e.samples.size()), want = reps();
    for (int step = 0; step < n; ++step) {
      const int c = (e.next + step) % n;
      if ((e.available >> c & 1u) && static_cast<int>(e.samples[c].size()) < want) {
        index = c;
        e.next = (c + 1) % n;
        entry_ = &e;
        started_ = ++st.trials;
        start_ = std::chrono::steady_clock::now();
        exceptions_ = std::uncaught_exceptions();
        return;
      }
    }
    decide(e);  // every candidate left has its runs (one dropped out since)
    if (e.winner >= 0) index = e.winner;
  }
  ~Choice() {
    if (entry_ == nullptr || std::uncaught_exceptions() > exceptions_) return;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    State& st = state();
    const bool clean = st.trials.load() == started_;
    std::lock_guard<std::mutex> lock(st.mutex);
    Entry& e = *entry_;  // std::map nodes are stable; reset() waits for no trial, so check it is still there
    if (e.winner >= 0 || e.samples.empty()) return;
    if (e.warm[index] < 1) {
      ++e.warm[index];
    } else if (!clean && e.discarded[index] < kMaxDiscarded) {
      ++e.discarded[index];
    } else {
      e.samples[index].push_back(seconds);
    }
    decide(e);
  }
  Choice(const Choice&) = delete;
  Choice& operator=(const Choice&) = delete;

  int index;  // the candidate to run

 private:
  Entry* entry_ = nullptr;
  uint64_t started_ = 0;
  int exceptions_ = 0;
  std::chrono::steady_clock::time_point start_;
};

// The decisions the CPU ops make (labels in candidate order; index 0 of the first two is today's "0").
inline const Decision kSlotParallel{"slot_parallel", "MCSMOE_SLOT_PARALLEL", {"sequential", "parallel", "balanced"}};
inline const Decision kSlrRowParallel{"slr_row_parallel", "MCSMOE_SLR_ROW_PARALLEL", {"one_block", "row_blocks"}};
inline const Decision kSlrPath{"slr_path", "MCSMOE_SLR_PATH", {"two_gemms", "stacked"}};
inline const Decision kGemm{"gemm", "MCSMOE_GEMM", {"aten", "onednn", "fp32"}};
inline const std::vector<const Decision*>& decisions() {
  static const std::vector<const Decision*> all{&kSlotParallel, &kSlrRowParallel, &kSlrPath, &kGemm};
  return all;
}

// (decision, shape class, winner's label or "" while measuring, each candidate's median in ms or -1).
using Row = std::tuple<std::string, std::string, std::string, std::vector<double>>;
inline std::vector<Row> snapshot() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  std::vector<Row> rows;
  for (const auto& [key, e] : st.entries) {
    if (e.samples.empty()) continue;
    std::vector<double> ms;
    for (const auto& s : e.samples) ms.push_back(s.empty() ? -1.0 : median(s) * 1e3);
    const std::string name = key.substr(0, key.find(' '));
    std::string winner;
    for (const Decision* d : decisions())
      if (name == d->name && e.winner >= 0) winner = d->labels[e.winner];
    rows.emplace_back(name, key.substr(key.find(' ') + 1), winner, ms);
  }
  return rows;
}

// Forgets every measurement (tests; a trial in flight still holds its entry: entries are emptied, not erased).
inline void reset() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  for (auto& [key, e] : st.entries) e = Entry{};
}

// Shape classes: a row count in powers of two (1, 2, 4, ... : "rows<=N").
inline int64_t bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) b <<= 1;
  return b;
}

}  // namespace mcsmoe::ops::autotune
