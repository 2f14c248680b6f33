// The grouped expert FFN's CPU combine (kernels/grouped_ffn.h: combine_token_rows, which the forward runs with
// the routing weights and the backward with unit weights to sum each token's dX rows) without torch: against
// a plain loop over each token's rows in double, with float and double rows (half types go through the same
// template in the op), tokens without rows, entries after a token's first -1 ignored, d = 0, T = 0, any split
// of the tokens into chunks (the op's parallel loop), unit weights equal to weights of one, and rows routed
// by align_cpu (kernels/moe_align.h) as the op routes them. Run under AddressSanitizer/UBSan by the sanitizer
// configuration. Exit status 1 on any failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/grouped_ffn.h"
#include "kernels/moe_align.h"

using mcsmoe::moe::align_cpu;
using mcsmoe::moe::combine_token_rows;

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const char* what, double a = 0, double b = 0) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::fprintf(stderr, "FAIL: %s (%g, %g)\n", what, a, b);
  }
}

// out[t] in double: the sum over token t's rows (until its first -1) of weight * row (weight 1 when none).
template <typename T>
std::vector<double> reference(const std::vector<T>& y, const std::vector<double>* w, const std::vector<int64_t>& rows,
                              int64_t T_tokens, int64_t k, int64_t d) {
  std::vector<double> out(T_tokens * d, 0.0);
  for (int64_t t = 0; t < T_tokens; ++t)
    for (int64_t j = 0; j < k && rows[t * k + j] >= 0; ++j)
      for (int64_t x = 0; x < d; ++x)
        out[t * d + x] += (w ? (*w)[rows[t * k + j]] : 1.0) * static_cast<double>(y[rows[t * k + j] * d + x]);
  return out;
}

// Runs combine_token_rows over the tokens in random chunks; out starts as garbage (every entry is written).
template <typename T, typename Acc>
std::vector<T> combine(const std::vector<T>& y, const std::vector<Acc>* w, const std::vector<int64_t>& rows,
                       int64_t T_tokens, int64_t k, int64_t d, std::mt19937_64& gen) {
  std::vector<T> out(T_tokens * d, T(-12345));
  for (int64_t t = 0; t < T_tokens;) {
    const int64_t end = std::min<int64_t>(T_tokens, t + std::uniform_int_distribution<int64_t>(1, 5)(gen));
    combine_token_rows<T, Acc>(y.data(), w ? w->data() : nullptr, rows.data(), t, end, k, d, out.data());
    t = end;
  }
  return out;
}

template <typename T, typename Acc>
void random_trial(std::mt19937_64& gen, double tol) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); };
  const int64_t T_tokens = uniform(0, 30), k = uniform(1, 4), d = uniform(0, 9), n = uniform(1, 60);
  std::vector<T> y(n * d);
  for (auto& v : y) v = static_cast<T>(std::normal_distribution<double>(0.0, 1.0)(gen));
  std::vector<double> w(n);
  for (auto& v : w) v = std::uniform_real_distribution<double>(0.0, 1.0)(gen);
  std::vector<Acc> w_acc(w.begin(), w.end());
  for (int64_t r = 0; r < n; ++r) w[r] = static_cast<double>(w_acc[r]);  // the weights the kernel sees
  std::vector<int64_t> rows(T_tokens * k);
  for (int64_t t = 0; t < T_tokens; ++t) {
    const int64_t used = uniform(0, k);  // then -1, then garbage the combine must not read
    for (int64_t j = 0; j < k; ++j)
      rows[t * k + j] = j < used ? uniform(0, n - 1) : (j == used ? -1 : uniform(-1, n - 1));
  }
  const auto want = reference(y, &w, rows, T_tokens, k, d), want_sum = reference<T>(y, nullptr, rows, T_tokens, k, d);
  const auto got = combine<T, Acc>(y, &w_acc, rows, T_tokens, k, d, gen);
  const auto got_sum = combine<T, Acc>(y, nullptr, rows, T_tokens, k, d, gen);
  const std::vector<Acc> ones(n, Acc(1));
  const auto got_ones = combine<T, Acc>(y, &ones, rows, T_tokens, k, d, gen);
  for (int64_t i = 0; i < T_tokens * d; ++i) {
    check(std::fabs(got[i] - want[i]) <= tol * (1 + std::fabs(want[i])), "weighted combine", got[i], want[i]);
    check(std::fabs(got_sum[i] - want_sum[i]) <= tol * (1 + std::fabs(want_sum[i])), "unit combine", got_sum[i],
          want_sum[i]);
    check(got_sum[i] == got_ones[i], "unit weights equal weights of one", got_sum[i], got_ones[i]);
  }
}

// Routing by align_cpu as the op does: out[t] = sum over token t's distinct slots of the summed weight times
// the slot's row for t; rows y[row] = (slot + 1) * (x + 1) so each term is checkable.
void routed_trial(std::mt19937_64& gen) {
  const int64_t T_tokens = 25, k = 3, E = 6, S = 3, d = 4;
  std::vector<int64_t> emap = {0, 1, 2, 0, 1, 2}, idx(T_tokens * k), sorted(T_tokens * k), offsets(S + 1),
                       rows(T_tokens * k);
  std::vector<double> w(T_tokens * k), sorted_w(T_tokens * k);
  for (auto& e : idx) e = std::uniform_int_distribution<int64_t>(-1, E - 1)(gen);
  for (auto& v : w) v = std::uniform_real_distribution<double>(0.0, 1.0)(gen);
  const auto st = align_cpu<double, double>(idx.data(), w.data(), emap.data(), T_tokens, k, E, S, sorted.data(),
                                            offsets.data(), sorted_w.data(), rows.data());
  check(st.code == 0, "align_cpu ok", st.code);
  std::vector<double> y(T_tokens * k * d);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = offsets[s]; r < offsets[s + 1]; ++r)
      for (int64_t x = 0; x < d; ++x) y[r * d + x] = static_cast<double>((s + 1) * (x + 1));
  const auto got = combine<double, double>(y, &sorted_w, rows, T_tokens, k, d, gen);
  for (int64_t t = 0; t < T_tokens; ++t)
    for (int64_t x = 0; x < d; ++x) {
      double want = 0;
      for (int64_t j = 0; j < k; ++j)
        if (idx[t * k + j] >= 0) want += w[t * k + j] * static_cast<double>((emap[idx[t * k + j]] + 1) * (x + 1));
      check(std::fabs(got[t * d + x] - want) <= 1e-12 * (1 + std::fabs(want)), "routed combine", got[t * d + x], want);
    }
}

}  // namespace

int main() {
  std::mt19937_64 gen(11);
  for (int trial = 0; trial < 300; ++trial) {
    random_trial<float, float>(gen, 1e-5);
    random_trial<double, double>(gen, 1e-12);
    random_trial<float, double>(gen, 1e-6);
  }
  for (int trial = 0; trial < 20; ++trial) routed_trial(gen);
  std::printf("test_grouped_ffn: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
