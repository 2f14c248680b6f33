// The sparse-plus-low-rank pieces that are not GEMMs (kernels/slr.h) without torch: add_kept_rows_cpu
// against a brute-force loop (float and double, row strides wider than the rows, K = 0, T = 0);
// add_kept_entry run as the CUDA kernel runs it, one (t, j) element at a time in a shuffled order, to
// show that with distinct row indices the order does not matter; and check_row_idx on valid
// permutations, out-of-range and repeated entries, K = 0 and out = 0. Run under AddressSanitizer/UBSan
// by the sanitizer configuration. Exit status 1 on any failure.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/slr.h"

using mcsmoe::slr::add_kept_entry;
using mcsmoe::slr::add_kept_rows_cpu;
using mcsmoe::slr::check_row_idx;
using mcsmoe::slr::RowIdxStatus;

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

std::mt19937_64 gen(11);
int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }

// K distinct rows of [0, out) in random order.
std::vector<int64_t> distinct_rows(int64_t K, int64_t out) {
  std::vector<int64_t> rows(out);
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), gen);
  rows.resize(K);
  return rows;
}

struct Problem {
  int64_t T, K, out, ldy, ldz;
  std::vector<int64_t> rows;
};

Problem random_problem() {
  Problem p;
  p.T = uniform(0, 9);
  p.out = uniform(0, 40);
  p.K = uniform(0, p.out);
  p.ldy = p.out + uniform(0, 5);  // padding past each row must stay untouched
  p.ldz = p.K + uniform(0, 5);
  p.rows = distinct_rows(p.K, p.out);
  return p;
}

// Brute force: for each output row, find the kept row (if any) that names it and add.
template <typename T>
std::vector<T> brute_force(const Problem& p, const std::vector<T>& y, const std::vector<T>& z) {
  std::vector<T> want = y;
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t o = 0; o < p.out; ++o)
      for (int64_t j = 0; j < p.K; ++j)
        if (p.rows[j] == o) want[t * p.ldy + o] = y[t * p.ldy + o] + z[t * p.ldz + j];
  return want;
}

// Exact comparison: each element gets one addition of the same two values however it is computed.
template <typename T>
void check_add_kept_rows(const char* name) {
  for (int trial = 0; trial < 300; ++trial) {
    const Problem p = random_problem();
    std::uniform_real_distribution<double> value(-2.0, 2.0);
    std::vector<T> y(p.T * p.ldy), z(p.T * p.ldz);
    for (auto& v : y) v = static_cast<T>(value(gen));
    for (auto& v : z) v = static_cast<T>(value(gen));
    const std::vector<T> want = brute_force(p, y, z);

    std::vector<T> got = y;
    add_kept_rows_cpu<T, T>(got.data(), p.ldy, z.data(), p.ldz, p.rows.data(), p.T, p.K);
    check(got == want, name, p.T, p.K);

    // The CUDA kernel's view: one (t, j) per thread, any order.
    std::vector<int64_t> order(p.T * p.K);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), gen);
    std::vector<T> shuffled = y;
    for (const int64_t i : order) {
      const int64_t t = i / p.K, j = i % p.K;
      add_kept_entry<T, T>(shuffled.data() + t * p.ldy, z.data() + t * p.ldz, p.rows.data(), j);
    }
    check(shuffled == want, "per-element adds in a shuffled order", p.T, p.K);
  }
}

void check_status(const RowIdxStatus& st, int code, int64_t where, int64_t value, const char* what) {
  check(st.code == code, what, st.code, code);
  if (code != 0) {
    check(st.where == where, what, st.where, where);
    check(st.value == value, what, st.value, value);
  }
}

void check_row_indices() {
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t out = uniform(1, 50), K = uniform(1, out);
    std::vector<int64_t> rows = distinct_rows(K, out);
    std::vector<unsigned char> seen(out, 1);  // dirty scratch: the check must clear it
    check_status(check_row_idx(rows.data(), K, out, seen.data()), 0, 0, 0, "distinct rows accepted");

    std::vector<int64_t> bad = rows;
    const int64_t at = uniform(0, K - 1);
    const int64_t value = uniform(0, 1) ? out + uniform(0, 3) : -1 - uniform(0, 3);
    bad[at] = value;
    check_status(check_row_idx(bad.data(), K, out, seen.data()), 1, at, value, "out-of-range row reported");

    if (K >= 2) {  // repeat an earlier entry: reported at the later position
      std::vector<int64_t> dup = rows;
      const int64_t later = uniform(1, K - 1), earlier = uniform(0, later - 1);
      dup[later] = dup[earlier];
      check_status(check_row_idx(dup.data(), K, out, seen.data()), 2, later, dup[earlier], "repeat reported");
    }
  }
  // The first offending entry wins, whichever kind it is.
  std::vector<unsigned char> seen(8);
  const std::vector<int64_t> dup_first = {3, 1, 3, 9}, range_first = {3, 9, 3};
  check_status(check_row_idx(dup_first.data(), 4, 8, seen.data()), 2, 2, 3, "repeat before out-of-range");
  check_status(check_row_idx(range_first.data(), 3, 8, seen.data()), 1, 1, 9, "out-of-range before repeat");
  // K = 0 (any out, null pointers) is fine; out = 0 rejects every entry.
  check_status(check_row_idx(nullptr, 0, 0, nullptr), 0, 0, 0, "K = 0, out = 0");
  check_status(check_row_idx(nullptr, 0, 8, seen.data()), 0, 0, 0, "K = 0");
  const std::vector<int64_t> zero = {0};
  check_status(check_row_idx(zero.data(), 1, 0, nullptr), 1, 0, 0, "out = 0 rejects row 0");
}

}  // namespace

int main() {
  check_add_kept_rows<float>("add_kept_rows_cpu float");
  check_add_kept_rows<double>("add_kept_rows_cpu double");
  check_row_indices();
  std::printf("test_slr: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
