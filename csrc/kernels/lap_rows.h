// The row kernels of the CPU assignment solver: one pass over a cost row each, vectorized, built
// for AVX2 and for the baseline ISA. Internal to lap.cpp (included by it and by its other parts).
#pragma once
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mcsmoe::lap::cpu {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// The hot loop of the shortest augmenting path, built for AVX2 and for the baseline ISA; the loader
// picks the clone the processor supports (GCC function multiversioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define LAP_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LAP_ISA_CLONES
#endif

template <typename T>
inline double relax_row_impl(const T* row, const double* w, double sign, double h, int64_t i, int64_t m,
                             double* d, int64_t* pred) {
  double best = kInf;
#pragma omp simd reduction(min : best)
  for (int64_t j = 0; j < m; ++j) {
    const double dj = sign * static_cast<double>(row[j]) - w[j] - h;
    const bool shorter = dj < d[j];
    d[j] = shorter ? dj : d[j];
    pred[j] = shorter ? i : pred[j];
    best = d[j] < best ? d[j] : best;
  }
  return best;
}

LAP_ISA_CLONES static double relax_row(const float* row, const double* w, double sign, double h, int64_t i, int64_t m,
                                double* d, int64_t* pred) {
  return relax_row_impl(row, w, sign, h, i, m, d, pred);
}

LAP_ISA_CLONES static double relax_row(const double* row, const double* w, double sign, double h, int64_t i, int64_t m,
                                double* d, int64_t* pred) {
  return relax_row_impl(row, w, sign, h, i, m, d, pred);
}

template <typename T>
inline void reduce_row_impl(const T* row, const double* v, double sign, int64_t m, double* out) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) out[j] = sign * static_cast<double>(row[j]) - v[j];
}

LAP_ISA_CLONES static void reduce_row(const float* row, const double* v, double sign, int64_t m, double* out) {
  reduce_row_impl(row, v, sign, m, out);
}

LAP_ISA_CLONES static void reduce_row(const double* row, const double* v, double sign, int64_t m, double* out) {
  reduce_row_impl(row, v, sign, m, out);
}

// A double as a float, clamped to the finite range (costs and prices beyond it must not become inf:
// inf - inf would make the selection compare NaNs).
inline float to_finite_float(double x) {
  constexpr double kMax = std::numeric_limits<float>::max();
  return static_cast<float>(x < -kMax ? -kMax : (x > kMax ? kMax : x));
}

// Reduced costs in float, for choosing candidate columns (which needs no exactness). With v finite
// floats, every entry is a float or +-inf, never NaN.
template <typename T>
inline void reduce_row_float_impl(const T* row, const float* v, float sign, int64_t m, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    if constexpr (std::is_same_v<T, float>)
      out[j] = sign * row[j] - v[j];
    else
      out[j] = sign * to_finite_float(row[j]) - v[j];
  }
}

LAP_ISA_CLONES static void reduce_row_float(const float* row, const float* v, float sign, int64_t m, float* out) {
  reduce_row_float_impl(row, v, sign, m, out);
}

LAP_ISA_CLONES static void reduce_row_float(const double* row, const float* v, float sign, int64_t m, float* out) {
  reduce_row_float_impl(row, v, sign, m, out);
}

// min_j sign * row[j] - v[j], in the same arithmetic as reduce_row.
template <typename T>
inline double min_reduced_impl(const T* row, const double* v, double sign, int64_t m) {
  double best = kInf;
#pragma omp simd reduction(min : best)
  for (int64_t j = 0; j < m; ++j) {
    const double r = sign * static_cast<double>(row[j]) - v[j];
    best = r < best ? r : best;
  }
  return best;
}

LAP_ISA_CLONES static double min_reduced(const float* row, const double* v, double sign, int64_t m) {
  return min_reduced_impl(row, v, sign, m);
}

LAP_ISA_CLONES static double min_reduced(const double* row, const double* v, double sign, int64_t m) {
  return min_reduced_impl(row, v, sign, m);
}

// One row of the column reduction: colmin[j] = min(colmin[j], sign * row[j]), argrow[j] = i where it
// falls. Both arrays have the element width of T, so the loop vectorizes without conversions.
template <typename T, typename I>
inline void column_min_step_impl(const T* row, T sign, I i, int64_t m, T* colmin, I* argrow) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const T c = sign * row[j];
    const bool lower = c < colmin[j];
    colmin[j] = lower ? c : colmin[j];
    argrow[j] = lower ? i : argrow[j];
  }
}

LAP_ISA_CLONES static void column_min_step(const float* row, float sign, int32_t i, int64_t m, float* colmin, int32_t* argrow) {
  column_min_step_impl(row, sign, i, m, colmin, argrow);
}

LAP_ISA_CLONES static void column_min_step(const double* row, double sign, int64_t i, int64_t m, double* colmin,
                                    int64_t* argrow) {
  column_min_step_impl(row, sign, i, m, colmin, argrow);
}

}  // namespace mcsmoe::lap::cpu
