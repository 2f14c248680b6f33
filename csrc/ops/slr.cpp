// sparse_lowrank_linear on the CPU: y = x (U V + S)^T + bias without forming W.
//
// Per block of rows of x: z = x V^T [n, r] and y = z U^T (+ bias) (GEMMs), then zs = x S_rows^T [n, K]
// (a GEMM over the kept rows only) added into the kept columns of y (kernels/slr.h). Nothing of size
// [out, in] is built, and the only temporaries are [n, r] and [n, K].
// Threads: blocks of rows in parallel with single-threaded GEMMs (layers no wider than their input, 64 to
// 512 rows per thread), one block with threaded GEMMs otherwise (see use_row_parallelism): the default;
// with timing on (autotune.h) both are measured per shape class ("slr_row_parallel"), and so are the two
// paths of a block ("slr_path"): two GEMMs (x V^T and x S_rows^T) or one over the stacked [V; S_rows]
// (x read once, one wider GEMM; the stacking copies r + K rows of `in` per call).
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/slr.h"
#include "ops/autotune.h"
#include "ops/ops.h"

namespace mcsmoe::ops {

void check_slr_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& S_rows,
                    const at::Tensor& row_idx, const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., in], got a scalar");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && S_rows.dim() == 2, op,
              ": U must be [out, r], V [r, in] and S_rows [K, in], got shapes ", U.sizes(), ", ", V.sizes(), " and ",
              S_rows.sizes());
  const int64_t in = x.size(-1), out = U.size(0), r = U.size(1);
  TORCH_CHECK(V.size(0) == r, op, ": U [out, r] has r = ", r, " but V [r, in] has ", V.size(0), " rows");
  TORCH_CHECK(V.size(1) == in, op, ": V [r, in] has in = ", V.size(1), " but x has ", in, " features");
  TORCH_CHECK(S_rows.size(1) == in, op, ": S_rows [K, in] has in = ", S_rows.size(1), " but x has ", in, " features");
  TORCH_CHECK(row_idx.dim() == 1 && row_idx.scalar_type() == at::kLong, op,
              ": row_idx must be an int64 tensor [K], got ", row_idx.scalar_type(), " of shape ", row_idx.sizes());
  TORCH_CHECK(row_idx.size(0) == S_rows.size(0), op, ": row_idx has ", row_idx.size(0), " entries but S_rows has ",
              S_rows.size(0), " rows");
  const auto dt = x.scalar_type();
  TORCH_CHECK(U.scalar_type() == dt && V.scalar_type() == dt && S_rows.scalar_type() == dt, op,
              ": x, U, V and S_rows must have one dtype, got ", dt, ", ", U.scalar_type(), ", ", V.scalar_type(),
              " and ", S_rows.scalar_type());
  const auto dev = x.device();
  TORCH_CHECK(U.device() == dev && V.device() == dev && S_rows.device() == dev && row_idx.device() == dev, op,
              ": all tensors must be on one device, got x on ", dev, ", U on ", U.device(), ", V on ", V.device(),
              ", S_rows on ", S_rows.device(), ", row_idx on ", row_idx.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must be [out] = [", out, "], got shape ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt && bias->device() == dev, op, ": bias must be ", dt, " on ", dev,
                ", got ", bias->scalar_type(), " on ", bias->device());
  }
}

void check_row_idx_cpu(const int64_t* row_idx, int64_t K, int64_t out, const char* op, const char* what,
                       int64_t slot, std::vector<unsigned char>& seen) {
  seen.resize(static_cast<size_t>(out));
  const auto st = slr::check_row_idx(row_idx, K, out, seen.data());
  if (st.code == 0) return;
  // "row_idx[j]" for the linear, "w_in row_idx of slot s, entry [j]" for a bank's slot
  const std::string where = slot < 0 ? std::string(what)
                                     : std::string(what) + " row_idx of slot " + std::to_string(slot) + ", entry ";
  TORCH_CHECK_INDEX(st.code != 1, op, ": ", where, "[", st.where, "] = ", st.value, " is not an output row in [0, ",
                    out, ")");
  TORCH_CHECK_VALUE(false, op, ": ", where, "[", st.where, "] = ", st.value,
                    " repeats an earlier row (kept rows must be distinct)");
}

// The U product z U^T (+ bias), written into `out` when given. Inside a parallel region (one thread
// per GEMM) at::mm writes it in place: MKL runs these inner-dimension-r products single-threaded within
// a few percent of oneDNN, and oneDNN's fresh result would cost a copy of the whole [n, out] output.
// Threaded, oneDNN stays (MKL is up to 2x slower there on [T, 32] x [32, 3584]).
static at::Tensor lowrank_product(const at::Tensor& z, const at::Tensor& U, const std::optional<at::Tensor>& bias,
                                  std::optional<at::Tensor> out) {
  if (out && at::in_parallel_region() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble))
    return bias ? at::addmm_out(*out, *bias, z, U.t()) : at::mm_out(*out, z, U.t());
  return linear_nt(z, U, out, bias);
}

at::Tensor slr_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& S_rows,
                          const int64_t* row_idx, const std::optional<at::Tensor>& bias, std::optional<at::Tensor> out) {
  const int64_t K = S_rows.size(0), r = V.size(0), n = x.size(0), in = x.size(1);
  const bool two = K > 0 && r > 0 && n > 0 && in > 0;  // both products exist: stacking them is a choice
  const std::string shape = two ? std::string(c10::toString(x.scalar_type())) + " n<=" +
                                      std::to_string(autotune::bucket(n)) + " in=" + std::to_string(in) + " out=" +
                                      std::to_string(U.size(0)) + " r=" + std::to_string(r) + " K<=" +
                                      std::to_string(autotune::bucket(K)) +
                                      (at::in_parallel_region() ? " in_parallel" : "")
                                : std::string();
  autotune::Choice path(autotune::kSlrPath, shape, 0, two ? 0b11u : 1u, two);
  at::Tensor z, zs;  // [n, r] and [n, K]
  if (path.index == 1) {
    const at::Tensor zz = linear_nt(x, at::cat({V, S_rows}));  // [n, r + K]
    z = zz.narrow(1, 0, r);
    zs = zz.narrow(1, r, K);
  } else {
    z = linear_nt(x, V);
  }
  at::Tensor y = lowrank_product(z, U, bias, out);
  if (K == 0 || n == 0) return y;
  if (!zs.defined()) zs = linear_nt(x, S_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sparse_lowrank_add_kept_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* zp = zs.data_ptr<scalar_t>();
    const int64_t ldy = y.stride(0), ldz = zs.stride(0);
    // Rows in parallel unless already inside a parallel region (then inline).
    at::parallel_for(0, x.size(0), std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) {
      slr::add_kept_rows_cpu<scalar_t, acc_t>(yp + b * ldy, ldy, zp + b * ldz, ldz, row_idx, e - b, K);
    });
  });
  return y;
}

// Threads over blocks of rows, each running its own single-threaded GEMMs (one parallel region), or one
// block of threaded GEMMs (four parallel regions). Measured here (2 threads, fp32, rank 32 / keep 10%,
// interleaved runs on a quiet machine): layers narrower than their input (3072->768, 3584->1024) run
// up to 1.3x faster in row blocks from 64 to 256 rows per thread (oneDNN splits [T, 3072] x [3072, 32|76]
// badly across threads) and equal from 256 up; wider layers (768->3072, 1024->3584) run 3-7% faster as
// one block at every T. Row blocks also hold up better when other processes compete for the cores
// (every extra barrier then waits for a descheduled thread).
// MCSMOE_SLR_ROW_PARALLEL=0/1 forces one or the other (for measurements).
static bool use_row_parallelism(int64_t T, int64_t in, int64_t out, int64_t threads, int64_t min_rows) {
  return threads > 1 && out <= in && T >= threads * min_rows && T < threads * 512;
}

at::Tensor sparse_lowrank_linear_cpu(const at::Tensor& x_arg, const at::Tensor& U_arg, const at::Tensor& V_arg,
                                     const at::Tensor& S_arg, const at::Tensor& row_idx_arg,
                                     const std::optional<at::Tensor>& bias_arg) {
  const char* op = "sparse_lowrank_linear";
  check_slr_args(x_arg, U_arg, V_arg, S_arg, row_idx_arg, bias_arg, op);
  TORCH_CHECK(x_arg.device().is_cpu(), op, ": expected CPU tensors, got ", x_arg.device());
  // Autograd is registered in Python around this kernel: detach so the inner GEMMs record nothing.
  const at::Tensor U = U_arg.detach().contiguous(), V = V_arg.detach().contiguous(),
                   S_rows = S_arg.detach().contiguous();
  const at::Tensor row_idx = row_idx_arg.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_arg) bias = bias_arg->detach();
  const int64_t in = x_arg.size(-1), out = U.size(0);
  std::vector<unsigned char> seen;
  check_row_idx_cpu(row_idx.data_ptr<int64_t>(), row_idx.numel(), out, op, "row_idx", -1, seen);
  // Rows as the product of the leading sizes: reshape({-1, in}) is ambiguous when in = 0.
  const int64_t T = c10::multiply_integers(x_arg.sizes().begin(), x_arg.sizes().end() - 1);
  const at::Tensor x = x_arg.detach().reshape({T, in}).contiguous();
  auto out_shape = x_arg.sizes().vec();
  out_shape.back() = out;
  // Row blocks: at least kMinRows rows per thread keep the GEMMs efficient; each thread walks its rows
  // in tiles of kTile, so the [tile, out] slice of y is still in cache when the kept rows are added and
  // the temporaries stay [tile, r] and [tile, K].
  constexpr int64_t kMinRows = 64, kTile = 256;
  const int64_t threads = at::get_num_threads();
  // Timed where both schedules split the work: two threads or more with kMinRows rows each.
  const bool measure = threads > 1 && T >= threads * kMinRows;
  const std::string shape = measure ? std::string(c10::toString(x.scalar_type())) + " threads=" +
                                          std::to_string(threads) + " T<=" + std::to_string(autotune::bucket(T)) +
                                          " in=" + std::to_string(in) + " out=" + std::to_string(out) + " r=" +
                                          std::to_string(U.size(1)) + " K<=" +
                                          std::to_string(autotune::bucket(S_rows.size(0)))
                                    : std::string();
  autotune::Choice rows(autotune::kSlrRowParallel, shape,
                        use_row_parallelism(T, in, out, threads, kMinRows) ? 1 : 0, 0b11u, measure);
  if (T == 0 || rows.index == 0 && (threads > 1 || T <= 4 * kTile))
    return slr_linear_cpu(x, U, V, S_rows, row_idx.data_ptr<int64_t>(), bias, std::nullopt).view(out_shape);
  at::Tensor y = at::empty({T, out}, x.options());
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: carry it into the workers
  at::parallel_for(0, T, kMinRows, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    for (int64_t r = begin; r < end; r += kTile) {
      const int64_t n = std::min(kTile, end - r);
      slr_linear_cpu(x.narrow(0, r, n), U, V, S_rows, row_idx.data_ptr<int64_t>(), bias, y.narrow(0, r, n));
    }
  });
  return y.view(out_shape);
}

}  // namespace mcsmoe::ops
