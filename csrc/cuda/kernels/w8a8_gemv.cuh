// w8a8_gemm for M <= 16 (decode): weight-bandwidth bound, so GEMV-shaped, in one launch.
//
// int8 tensor cores (mma.sync m16n8k32) without shared memory tiles: each warp streams its weight
// rows straight from global memory with 16-byte loads (UNROLL x NT x 2 in flight per thread) and uses
// x (M <= 16 rows, the rest zero) as the A operand. The k order inside each 128-byte window is
// permuted so that both operands come from contiguous loads: in mma step j thread (g, t) supplies the
// bytes 128w + 32t + 8j + {0..3} as logical k 4t..4t+3 and + {4..7} as logical k 16+4t..16+4t+3, for
// x and w alike (an integer dot product does not care about the order of its k). The 8 warps of a CTA
// share the CTA's 8*NT output columns and split K; shared memory adds their int32 sums (exact), and
// warp 0 applies the epilogue of kernels/w8a8_gemm.cuh.
#pragma once

#include "w8a8_gemm.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kW8A8GemvWarps = 8;

// The GEMV's end: add the warps' partial sums (int32: exact in any order); warp 0 applies the epilogue.
template <typename OutT, int NT>
__device__ __forceinline__ void w8a8_gemv_finish(int (&acc)[NT][4], int warp, int lane, int n0,
                                                 const W8A8Epilogue& epi, OutT* __restrict__ out, int M, int N) {
  if (!sum_over_warps<int, kW8A8GemvWarps>(acc, warp, lane)) return;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (g + 8 * h < M) store_w8a8_pair<OutT>(out, epi, acc[i][2 * h], acc[i][2 * h + 1], g + 8 * h, n0 + i * 8 + 2 * t, N);
}

// grid: ceil(N / (8 * NT)); block: 32 * kW8A8GemvWarps. K % 16 == 0, x and w 16-byte aligned.
template <typename OutT, int NT, int UNROLL>
__global__ void __launch_bounds__(kW8A8GemvWarps * kWarp) w8a8_gemv_kernel(const int8_t* __restrict__ x,
                                                                           const int8_t* __restrict__ w,
                                                                           W8A8Epilogue epi, OutT* __restrict__ out,
                                                                           int M, int N, int K) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * (8 * NT);
  const int windows = ceil_div(K, 128);

  int acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[i][r] = 0;

  for (int w0 = warp; w0 < windows; w0 += kW8A8GemvWarps * UNROLL) {
    uint4 wq[UNROLL][NT][2];
    int64_t kk[UNROLL];
    // All weight loads of the UNROLL windows go out before any is used: that hides DRAM latency.
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int win = w0 + u * kW8A8GemvWarps;
      kk[u] = int64_t(win) * 128 + 32 * t;  // this thread's 32 bytes of the window
      const bool ok = win < windows;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const int n = n0 + i * 8 + g;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t k = kk[u] + 16 * h;
          wq[u][i][h] = (ok && n < N && k < K) ? __ldg(reinterpret_cast<const uint4*>(w + int64_t(n) * K + k))
                                               : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      // Warp-uniform test only: mma.sync needs all 32 lanes, so a lane past K feeds zeros.
      if (w0 + u * kW8A8GemvWarps >= windows) break;
      uint32_t xa[8], xb[8];  // 32 bytes of rows g and g + 8
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t k = kk[u] + 16 * h;
        const uint4 a = (g < M && k < K) ? *reinterpret_cast<const uint4*>(x + int64_t(g) * K + k) : make_uint4(0u, 0u, 0u, 0u);
        const uint4 b = (g + 8 < M && k < K) ? *reinterpret_cast<const uint4*>(x + int64_t(g + 8) * K + k)
                                             : make_uint4(0u, 0u, 0u, 0u);
        xa[4 * h] = a.x; xa[4 * h + 1] = a.y; xa[4 * h + 2] = a.z; xa[4 * h + 3] = a.w;
        xb[4 * h] = b.x; xb[4 * h + 1] = b.y; xb[4 * h + 2] = b.z; xb[4 * h + 3] = b.w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // bytes 8j .. 8j+3 are logical k 4t..4t+3, bytes 8j+4 .. 8j+7 logical k 16+4t..16+4t+3
        const uint32_t a[4] = {xa[2 * j], xb[2 * j], xa[2 * j + 1], xb[2 * j + 1]};
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const uint4& q = wq[u][i][j >> 1];
          const uint32_t b0 = (j & 1) ? q.z : q.x;
          const uint32_t b1 = (j & 1) ? q.w : q.y;
          mma_s8_16832(acc[i], a, b0, b1);
        }
      }
    }
  }

  w8a8_gemv_finish<OutT, NT>(acc, warp, lane, n0, epi, out, M, N);
}

}  // namespace cuda
}  // namespace ptqrt
