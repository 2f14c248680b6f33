// Native dequantization of the released weight formats on the CPU, for reading quantized checkpoints
// (quant/fp8.py, quant/mxfp4.py call these on CPU tensors; the plain-PyTorch path stays for other devices
// and as the reference). Not dispatcher ops: plain functions of the extension module, writing into `out`.
//
// block-FP8: e4m3fn bytes [N, rows, cols], float32 scales [N, ceil(rows/br), ceil(cols/bc)]; each value is
//   decoded by a 256-entry table, multiplied by its block's scale in float32 and rounded once to out's dtype
//   (what the PyTorch path computes: an exact float32 widening, one float32 product, one cast).
// MXFP4: blocks [N, rows, G, 16] (two e2m1 codes a byte, the low nibble first), e8m0 scales [N, rows, G];
//   value = ldexp(code, scale - 127) in float32 (as torch.ldexp: the byte 255 gives 2^127 for 0.5, inf above), then
//   out's dtype. out is [N, rows, cols] or, transposed, [N, cols, rows] (GPT-OSS's banks are read transposed),
//   with (G - 1) * 32 < cols <= G * 32 (the padding of a ragged last block dropped).
// One pass over the bytes, no float32 temporary of the whole matrix; rows split over torch's thread pool.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "float_dispatch.h"
#include "ops.h"

namespace mcsmoe::ops {
namespace {

constexpr int64_t kElementsPerTask = 1 << 15;  // parallel_for grain, in output elements

std::array<float, 256> e4m3fn_values() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int exponent = (b >> 3) & 0xF, mantissa = b & 7;
    float v;
    if (exponent == 0xF && mantissa == 7) {
      v = std::numeric_limits<float>::quiet_NaN();  // e4m3fn has no infinities: S.1111.111 is NaN
    } else if (exponent == 0) {
      v = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: mantissa / 8 * 2^-6
    } else {
      v = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
    }
    t[b] = (b & 0x80) ? -v : v;
  }
  return t;
}

constexpr std::array<float, 16> kE2M1 = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};


template <typename O>
void fp8_rows(const uint8_t* w, const float* scale, O* out, int64_t n, int64_t rows, int64_t cols, int64_t br,
              int64_t bc) {
  static const std::array<float, 256> table = e4m3fn_values();
  const int64_t nr = (rows + br - 1) / br, nc = (cols + bc - 1) / bc;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
  at::parallel_for(0, n * rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = i / rows, r = i % rows;
      const uint8_t* src = w + i * cols;
      const float* s = scale + (k * nr + r / br) * nc;
      O* dst = out + i * cols;
      for (int64_t j = 0; j < nc; ++j) {
        const float sj = s[j];
        const int64_t c1 = std::min(cols, (j + 1) * bc);
        for (int64_t c = j * bc; c < c1; ++c) dst[c] = static_cast<O>(table[src[c]] * sj);
      }
    }
  });
}

// Row i of the MXFP4 matrix (its G groups) into dst[0 .. cols), in float32.
inline void mxfp4_row(const uint8_t* blocks, const uint8_t* scales, int64_t groups, int64_t cols, float* dst) {
  for (int64_t g = 0; g < groups; ++g) {
    const int exponent = static_cast<int>(scales[g]) - 127;
    const uint8_t* b = blocks + g * 16;
    const int64_t c0 = g * 32, n = std::min<int64_t>(32, cols - c0);
    if (exponent == 128) {  // 2^128 is no float32: ldexp itself (0.5 * 2^128 is finite, 0 stays 0), as torch.ldexp
      for (int64_t j = 0; j < n; ++j)
        dst[c0 + j] = std::ldexp(kE2M1[(j & 1) ? (b[j >> 1] >> 4) : (b[j >> 1] & 0xF)], exponent);
      continue;
    }
    const float s = std::ldexp(1.0f, exponent);  // exact down to 2^-127 (subnormal); code * s is exact too
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t byte = b[j >> 1];
      dst[c0 + j] = kE2M1[(j & 1) ? (byte >> 4) : (byte & 0xF)] * s;
    }
  }
}

template <typename O>
void mxfp4_rows(const uint8_t* blocks, const uint8_t* scales, O* out, int64_t n, int64_t rows, int64_t groups,
                int64_t cols, bool transpose) {
  if (!transpose) {
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
    at::parallel_for(0, n * rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> row(cols);
      for (int64_t i = begin; i < end; ++i) {
        mxfp4_row(blocks + i * groups * 16, scales + i * groups, groups, cols, row.data());
        O* dst = out + i * cols;
        for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<O>(row[c]);
      }
    });
    return;
  }
  constexpr int64_t kTile = 16;  // rows decoded together, then written as runs of kTile along out's rows
  const int64_t tiles = (rows + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kTile * cols);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = t / tiles, r0 = (t % tiles) * kTile, m = std::min(kTile, rows - r0);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = k * rows + r0 + r;
        mxfp4_row(blocks + i * groups * 16, scales + i * groups, groups, cols, tile.data() + r * cols);
      }
      O* base = out + k * cols * rows + r0;
      for (int64_t c = 0; c < cols; ++c) {
        O* dst = base + c * rows;
        for (int64_t r = 0; r < m; ++r) dst[r] = static_cast<O>(tile[r * cols + c]);
      }
    }
  });
}

void check_cpu_contiguous(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), what, ": ", name,
                    " must be a contiguous CPU tensor");
}

}  // namespace

at::Tensor dequantize_fp8_into(const at::Tensor& weight, const at::Tensor& scale, int64_t block_rows,
                               int64_t block_cols, at::Tensor out) {
  constexpr const char* what = "dequantize_fp8_into";
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, {&scale, "scale"}, {&out, "out"}})
    check_cpu_contiguous(*t, what, name);
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kByte && weight.dim() == 3, what,
                    ": weight must be [N, rows, cols] uint8 (e4m3fn bytes), got ", weight.scalar_type(), " ",
                    weight.sizes());
  TORCH_CHECK_VALUE(block_rows > 0 && block_cols > 0, what, ": block sizes must be positive, got ", block_rows,
                    " x ", block_cols);
  const int64_t n = weight.size(0), rows = weight.size(1), cols = weight.size(2);
  const std::vector<int64_t> grid = {n, (rows + block_rows - 1) / block_rows, (cols + block_cols - 1) / block_cols};
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.sizes() == at::IntArrayRef(grid), what,
                    ": scale must be float32 ", at::IntArrayRef(grid), ", got ", scale.scalar_type(), " ",
                    scale.sizes());
  TORCH_CHECK_VALUE(out.sizes() == weight.sizes(), what, ": out must be ", weight.sizes(), ", got ", out.sizes());
  dispatch_float(out, what, "out", [&](auto* o) {
    fp8_rows(weight.data_ptr<uint8_t>(), scale.data_ptr<float>(), o, n, rows, cols, block_rows, block_cols);
  });
  return out;
}

at::Tensor dequantize_mxfp4_into(const at::Tensor& blocks, const at::Tensor& scales, bool transpose,
                                 at::Tensor out) {
  constexpr const char* what = "dequantize_mxfp4_into";
  for (const auto& [t, name] : {std::pair{&blocks, "blocks"}, {&scales, "scales"}, {&out, "out"}})
    check_cpu_contiguous(*t, what, name);
  TORCH_CHECK_VALUE(blocks.scalar_type() == at::kByte && blocks.dim() == 4 && blocks.size(3) == 16, what,
                    ": blocks must be [N, rows, G, 16] uint8, got ", blocks.scalar_type(), " ", blocks.sizes());
  const int64_t n = blocks.size(0), rows = blocks.size(1), groups = blocks.size(2);
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kByte && scales.sizes() == blocks.sizes().slice(0, 3), what,
                    ": scales must be [N, rows, G] = ", blocks.sizes().slice(0, 3), " uint8, got ",
                    scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == n && out.size(transpose ? 2 : 1) == rows, what, ": out must be ",
                    transpose ? "[N, cols, rows]" : "[N, rows, cols]", " with N = ", n, ", rows = ", rows, ", got ",
                    out.sizes());
  const int64_t cols = out.size(transpose ? 1 : 2);
  TORCH_CHECK_VALUE(cols <= groups * 32 && cols > (groups - 1) * 32, what, ": ", groups, " groups of 32 hold ",
                    (groups - 1) * 32 + 1, "..", groups * 32, " columns, out has ", cols);
  dispatch_float(out, what, "out", [&](auto* o) {
    mxfp4_rows(blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), o, n, rows, groups, cols, transpose);
  });
  return out;
}

}  // namespace mcsmoe::ops
