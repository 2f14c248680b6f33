// Routing alignment (kernels/moe_align.h) without torch: align_cpu against a brute-force construction
// of the same outputs on random routings (duplicate experts per token, shared slots, dropped tokens,
// empty slots, T = 0), and the error statuses for out-of-range ids and expert_map entries. Run under
// AddressSanitizer/UBSan by the sanitizer configuration. Exit status 1 on any failure.
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <vector>

#include "kernels/moe_align.h"

using mcsmoe::moe::align_cpu;
using mcsmoe::moe::AlignStatus;

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const char* what, int64_t a = 0, int64_t b = 0) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::fprintf(stderr, "FAIL: %s (%lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b));
  }
}

struct Outputs {
  std::vector<int64_t> tokens, offsets, token_rows;
  std::vector<double> weights;
};

Outputs run(const std::vector<int64_t>& idx, const std::vector<double>& w, const std::vector<int64_t>& emap,
            int64_t T, int64_t k, int64_t S, AlignStatus* status) {
  Outputs o{std::vector<int64_t>(T * k, 7), std::vector<int64_t>(S + 1, 7), std::vector<int64_t>(T * k, 7),
            std::vector<double>(T * k, 7.0)};
  *status = align_cpu<double, double>(idx.data(), w.data(), emap.data(), T, k, static_cast<int64_t>(emap.size()), S,
                                      o.tokens.data(), o.offsets.data(), o.weights.data(), o.token_rows.data());
  return o;
}

// Brute force: each token's distinct slots with summed weights, pairs ordered by (slot, token).
void check_against_brute_force(const std::vector<int64_t>& idx, const std::vector<double>& w,
                               const std::vector<int64_t>& emap, int64_t T, int64_t k, int64_t S) {
  AlignStatus st;
  Outputs o = run(idx, w, emap, T, k, S, &st);
  check(st.code == 0, "status ok", st.code, st.where);
  std::map<std::pair<int64_t, int64_t>, double> pairs;  // (slot, token) -> summed weight
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j)
      if (idx[t * k + j] >= 0) pairs[{emap[idx[t * k + j]], t}] += w[t * k + j];
  const int64_t n = static_cast<int64_t>(pairs.size());
  check(o.offsets[0] == 0 && o.offsets[S] == n, "offsets span every pair", o.offsets[S], n);
  int64_t row = 0;
  std::vector<std::vector<int64_t>> rows_of(T);
  for (const auto& [key, weight] : pairs) {
    const auto [slot, token] = key;
    check(o.offsets[slot] <= row && row < o.offsets[slot + 1], "row inside its slot's range", row, slot);
    check(o.tokens[row] == token, "token order within the slot", o.tokens[row], token);
    check(std::fabs(o.weights[row] - weight) <= 1e-12, "summed routing weight", row, slot);
    rows_of[token].push_back(row);
    ++row;
  }
  for (int64_t r = n; r < T * k; ++r) check(o.tokens[r] == -1 && o.weights[r] == 0.0, "padding past the pairs", r);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t expected = j < static_cast<int64_t>(rows_of[t].size()) ? rows_of[t][j] : -1;
      check(o.token_rows[t * k + j] == expected, "token_rows in ascending slot order", t, j);
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 gen(7);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); };
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t T = uniform(0, 40), k = uniform(1, 4), E = uniform(1, 9), S = uniform(1, E);
    std::vector<int64_t> emap(E), idx(T * k);
    std::vector<double> w(T * k);
    for (auto& s : emap) s = trial % 5 == 0 ? 0 : uniform(0, S - 1);  // every fifth: all experts share slot 0
    for (auto& e : idx) e = uniform(-1, E - 1);                          // -1: dropped; repeats allowed
    for (auto& x : w) x = std::uniform_real_distribution<double>(0.0, 1.0)(gen);
    check_against_brute_force(idx, w, emap, T, k, S);
  }
  // errors: an id out of [-1, E), a map entry out of [0, S)
  AlignStatus st;
  run({0, 4, 1, 2}, {1, 1, 1, 1}, {0, 1, 0, 1}, 2, 2, 2, &st);
  check(st.code == 1 && st.where == 1 && st.value == 4, "id past E reported", st.code, st.where);
  run({0, -2}, {1, 1}, {0, 1, 0, 1}, 1, 2, 2, &st);
  check(st.code == 1 && st.where == 1 && st.value == -2, "id below -1 reported", st.code, st.value);
  run({0, 1}, {1, 1}, {0, 2, 0}, 1, 2, 2, &st);
  check(st.code == 2 && st.where == 1 && st.value == 2, "map entry past S reported", st.code, st.where);
  run({0, 1}, {1, 1}, {-1, 0}, 1, 2, 2, &st);
  check(st.code == 2 && st.where == 0 && st.value == -1, "negative map entry reported", st.code, st.where);
  std::printf("test_moe_align: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
