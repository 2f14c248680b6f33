// Native block-FP8 quantization on the CPU, for writing merged experts back in a block-FP8 checkpoint's format
// (quant/fp8.py's quantize_fp8 calls these on CPU tensors; the plain-PyTorch path stays for other devices and as the
// reference). Not dispatcher ops: plain functions of the extension module, writing into `out`.
//
// fp8_block_amax_into: max |w| over each block of w [N, rows, cols] (float32 / bfloat16 / float16), into out
//   [N, ceil(rows/br), ceil(cols/bc)] float32; a NaN in a block makes its amax NaN, as torch's amax does.
// quantize_fp8_into: the e4m3fn bytes of clamp(float(w) / scale, -448, 448), the float32 quotient rounded to nearest
//   even by c10's conversion (the one torch's cast to float8_e4m3fn uses; NaN stays NaN).
// One pass over w each, rows split over torch's thread pool; no float32 copy of the matrix.
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "float_dispatch.h"
#include "ops.h"

namespace mcsmoe::ops {
namespace {

constexpr int64_t kElementsPerTask = 1 << 15;  // parallel_for grain, in elements
constexpr float kE4M3Max = 448.0f;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_w(const at::Tensor& w, const char* what) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.is_contiguous() && w.dim() == 3, what,
                    ": w must be a contiguous CPU tensor [N, rows, cols], got ", w.sizes());
}

void check_grid(const at::Tensor& t, const at::Tensor& w, int64_t br, int64_t bc, const char* what, const char* name) {
  TORCH_CHECK_VALUE(br > 0 && bc > 0, what, ": block sizes must be positive, got ", br, " x ", bc);
  const std::vector<int64_t> grid = {w.size(0), cdiv(w.size(1), br), cdiv(w.size(2), bc)};
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat &&
                        t.sizes() == at::IntArrayRef(grid),
                    what, ": ", name, " must be a contiguous CPU float32 tensor ", at::IntArrayRef(grid), ", got ",
                    t.scalar_type(), " ", t.sizes());
}

// Row-block `rb` of expert k: its blocks' amax, one block row of w at a time (max and the NaN flag kept apart, so the
// inner loop has no branch and vectorizes).
template <typename T>
void amax_rows(const T* w, float* out, int64_t rows, int64_t cols, int64_t br, int64_t bc, int64_t k, int64_t rb) {
  const int64_t nc = cdiv(cols, bc), r1 = std::min(rows, (rb + 1) * br);
  float* m = out + (k * cdiv(rows, br) + rb) * nc;
  std::vector<float> best(nc, 0.0f);
  std::vector<char> nan(nc, 0);
  for (int64_t r = rb * br; r < r1; ++r) {
    const T* src = w + (k * rows + r) * cols;
    for (int64_t j = 0; j < nc; ++j) {
      float b = best[j];
      bool any_nan = false;
      const int64_t c1 = std::min(cols, (j + 1) * bc);
      for (int64_t c = j * bc; c < c1; ++c) {
        const float a = std::fabs(static_cast<float>(src[c]));
        b = a > b ? a : b;
        any_nan |= a != a;
      }
      best[j] = b;
      nan[j] |= any_nan;
    }
  }
  for (int64_t j = 0; j < nc; ++j) m[j] = nan[j] ? std::numeric_limits<float>::quiet_NaN() : best[j];
}

}  // namespace

at::Tensor fp8_block_amax_into(const at::Tensor& w, int64_t block_rows, int64_t block_cols, at::Tensor out) {
  constexpr const char* what = "fp8_block_amax_into";
  check_w(w, what);
  check_grid(out, w, block_rows, block_cols, what, "out");
  const int64_t n = w.size(0), rows = w.size(1), cols = w.size(2), nr = cdiv(rows, block_rows);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(block_rows * cols, 1));
  dispatch_float(w, what, "w", [&](const auto* src) {
    at::parallel_for(0, n * nr, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        amax_rows(src, out.data_ptr<float>(), rows, cols, block_rows, block_cols, t / nr, t % nr);
    });
  });
  return out;
}

at::Tensor quantize_fp8_into(const at::Tensor& w, const at::Tensor& scale, int64_t block_rows, int64_t block_cols,
                             at::Tensor out) {
  constexpr const char* what = "quantize_fp8_into";
  check_w(w, what);
  check_grid(scale, w, block_rows, block_cols, what, "scale");
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kByte &&
                        out.sizes() == w.sizes(),
                    what, ": out must be contiguous CPU uint8 (e4m3fn bytes) ", w.sizes(), ", got ", out.scalar_type(),
                    " ", out.sizes());
  const int64_t n = w.size(0), rows = w.size(1), cols = w.size(2);
  const int64_t nr = cdiv(rows, block_rows), nc = cdiv(cols, block_cols);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
  const float* s = scale.data_ptr<float>();
  uint8_t* q = out.data_ptr<uint8_t>();
  dispatch_float(w, what, "w", [&](const auto* src) {
    at::parallel_for(0, n * rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> quotient(block_cols);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = i / rows, r = i % rows;
        const float* sr = s + (k * nr + r / block_rows) * nc;
        for (int64_t j = 0; j < nc; ++j) {  // the quotients first (a loop that vectorizes), then the conversion
          const float sj = sr[j];
          const int64_t c0 = j * block_cols, n = std::min(cols, c0 + block_cols) - c0;
          const auto* x = src + i * cols + c0;
          for (int64_t c = 0; c < n; ++c) {
            const float v = static_cast<float>(x[c]) / sj;
            quotient[c] = v > kE4M3Max ? kE4M3Max : (v < -kE4M3Max ? -kE4M3Max : v);  // NaN passes through
          }
          uint8_t* y = q + i * cols + c0;
          for (int64_t c = 0; c < n; ++c) y[c] = c10::detail::fp8e4m3fn_from_fp32_value(quotient[c]);
        }
      }
    });
  });
  return out;
}

}  // namespace mcsmoe::ops
