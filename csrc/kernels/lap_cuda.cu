// Batched linear assignment on the GPU: one thread block per problem. The block's threads split the
// columns (thread t owns j = t, t + NT, ...); every phase between two barriers is a function of
// lap_phases.h and their order is solve_block in lap_block.h, the same code the C++ tests run on the
// CPU with simulated threads. Here a Block is a real thread block: barriers are __syncthreads() and
// the argmin is a warp shuffle reduction followed by a shared-memory combine of the warps' results.
//
// A problem's working arrays (about 29 bytes per column) live in shared memory when they fit and
// in the caller's global workspace otherwise.
#include <stdexcept>
#include <string>

#include "kernels/cuda_dispatch.cuh"
#include "kernels/lap.h"
#include "kernels/lap_block.h"

namespace mcsmoe::lap {
namespace {

constexpr const char* kOp = "linear_assignment (CUDA)";

template <int NT>
struct DeviceBlock {
  static_assert(NT % 32 == 0 && NT <= 1024, "whole warps only");
  static constexpr int kWarps = NT / 32;
  ArgMin* warp_best;  // shared, [2][kWarps]: two buffers, so one barrier per argmin suffices
  int parity;

  __device__ __forceinline__ int nthreads() const { return NT; }

  template <class F>
  __device__ __forceinline__ void each(F&& f) { f(static_cast<int>(threadIdx.x)); }

  template <class F>
  __device__ __forceinline__ void single(F&& f) {
    if (threadIdx.x == 0) f();
  }

  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ void finish() {}

  // Pull this thread's part of cost row i towards L1 so relax_slice does not wait on DRAM once per
  // column (its loop issues one dependent load per iteration).
  template <typename T>
  __device__ __forceinline__ void before_row_scan(const T* cost, int64_t m, int64_t i) {
    const T* row = cost + i * m;
    for (int64_t j = threadIdx.x; j < m; j += NT) asm volatile("prefetch.global.L1 [%0];" ::"l"(row + j));
  }

  // Buffer (parity) k is written in call k and read after its barrier; call k + 2 writes it again only
  // after the barrier of call k + 1, which every thread reaches after it finished reading call k.
  template <class F>
  __device__ __forceinline__ ArgMin argmin(F&& f) {
    ArgMin a = f(static_cast<int>(threadIdx.x));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      ArgMin o;
      o.value = __shfl_xor_sync(0xffffffffu, a.value, offset);
      o.index = __shfl_xor_sync(0xffffffffu, a.index, offset);
      o.assigned = __shfl_xor_sync(0xffffffffu, a.assigned, offset);
      a = argmin_combine(a, o);
    }
    ArgMin* buf = warp_best + parity * kWarps;
    parity ^= 1;
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = a;
    __syncthreads();
    ArgMin r = buf[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = argmin_combine(r, buf[w]);
    return r;
  }
};

template <typename T, int NT>
__global__ void __launch_bounds__(NT) lap_kernel(const T* __restrict__ cost, int64_t n, int64_t m, double sign,
                                                 int64_t* __restrict__ col4row, unsigned char* workspace,
                                                 bool state_in_shared) {
  __shared__ ArgMin warp_best[2 * (NT / 32)];
  extern __shared__ __align__(16) unsigned char dynamic_smem[];  // block_state_bytes(n, m) when used
  const int64_t b = blockIdx.x;
  unsigned char* base = state_in_shared ? dynamic_smem : workspace + b * block_state_bytes(n, m);
  const BlockState s = carve_block_state(base, n, m);
  DeviceBlock<NT> blk{warp_best, 0};
  solve_block(blk, cost + b * n * m, n, m, sign, s, col4row + b * n);
}

template <typename T, int NT>
void launch(const T* cost, int64_t batch, int64_t n, int64_t m, double sign, int64_t* col4row, void* workspace,
            cudaStream_t stream) {
  auto kernel = lap_kernel<T, NT>;
  const int64_t state = block_state_bytes(n, m);
  int device = 0, optin = 0;
  cuda_check(cudaGetDevice(&device), kOp, "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), kOp,
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  cudaFuncAttributes attr{};
  cuda_check(cudaFuncGetAttributes(&attr, kernel), kOp, "cudaFuncGetAttributes");
  const bool in_shared = state + static_cast<int64_t>(attr.sharedSizeBytes) <= optin;
  size_t dynamic = 0;
  if (in_shared) {
    dynamic = static_cast<size_t>(state);
    if (dynamic > 48 * 1024)
      cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic)),
                 kOp, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  } else if (workspace == nullptr) {
    throw std::invalid_argument("linear_assignment (CUDA): workspace is null but the problem needs one");
  }
  kernel<<<static_cast<unsigned>(batch), NT, dynamic, stream>>>(cost, n, m, sign, col4row,
                                                               static_cast<unsigned char*>(workspace), in_shared);
  cuda_check(cudaGetLastError(), kOp, "kernel launch");
}

void check_sizes(int64_t batch, int64_t n, int64_t m) {
  if (batch < 0 || n < 0 || m < 0 || n > m)
    throw std::invalid_argument("linear_assignment (CUDA): need 0 <= n <= m and batch >= 0, got batch=" +
                                std::to_string(batch) + " n=" + std::to_string(n) + " m=" + std::to_string(m));
  if (m >= (int64_t{1} << 31) || batch >= (int64_t{1} << 31))
    throw std::invalid_argument("linear_assignment (CUDA): batch and m must be below 2^31 (int32 indices), got batch=" +
                                std::to_string(batch) + " m=" + std::to_string(m));
}

}  // namespace

size_t lap_cuda_workspace_bytes(int64_t batch, int64_t n, int64_t m) {
  check_sizes(batch, n, m);
  if (batch == 0 || n == 0) return 0;
  return static_cast<size_t>(batch) * static_cast<size_t>(block_state_bytes(n, m));
}

template <typename T>
void solve_cuda(const T* cost, int64_t batch, int64_t n, int64_t m, double sign, int64_t* col4row, void* workspace,
                void* stream) {
  check_sizes(batch, n, m);
  if (batch == 0 || n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  // Enough threads that each owns a few columns; few enough that barriers stay cheap.
  if (m <= 128)
    launch<T, 32>(cost, batch, n, m, sign, col4row, workspace, s);
  else if (m <= 1024)
    launch<T, 128>(cost, batch, n, m, sign, col4row, workspace, s);
  else
    launch<T, 256>(cost, batch, n, m, sign, col4row, workspace, s);
}

template void solve_cuda<float>(const float*, int64_t, int64_t, int64_t, double, int64_t*, void*, void*);
template void solve_cuda<double>(const double*, int64_t, int64_t, int64_t, double, int64_t*, void*, void*);

}  // namespace mcsmoe::lap
