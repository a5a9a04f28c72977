// w8a8_gemm for Hopper (sm_90a): TMA tile loads, warpgroup MMA (wgmma m64n256k32 s8), same math and
// epilogue as the mma.sync kernel (kernels/w8a8_gemm.cuh):
//
//   acc = x[M, K] . w[N, K]^T (exact int32);  y = (float(acc) * x_scale[m]) * w_scale[n] + bias[n]
//
// CTA tile 128 x 256 x 128 bytes of K, STAGES-deep ring of shared-memory stages, three warpgroups:
//   warpgroup 0  producer: one thread waits for a free stage ("empty" barrier), announces the stage's
//                bytes on its "full" barrier and issues two TMA box loads (x rows, w rows). TMA writes
//                128-byte swizzled rows and zero-fills whatever lies past M, N or K.
//   warpgroups 1, 2  consumers, rows 0-63 and 64-127 of the tile: wait "full", issue four wgmma (one per
//                32 bytes of K) into 128 int32 accumulators per thread, keep one wgmma group in flight,
//                and release the previous stage on "empty" once its group has completed.
// setmaxnreg moves registers from the producer (which needs few) to the consumers (128 accumulators).
// Split-K over grid z, as in the mma.sync kernel (raw int32 partials, reduced in a fixed order).
#pragma once

#include "sm90.cuh"
#include "w8a8_gemm.cuh"

namespace ptqrt {
namespace cuda {
namespace sm90 {

constexpr int kBM = 128, kBN = 256, kBK = 128, kStages = 4;
constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK, kStageBytes = kABytes + kBBytes;
// Stages, then 2 * kStages barriers, plus slack to align the stages to 1024 bytes (the swizzle atom).
constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;
constexpr int kGroupM = 8;

template <typename OutT>
__global__ void __launch_bounds__(kThreads, 1) w8a8_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tma_x,
                                                                     const __grid_constant__ CUtensorMap tma_w,
                                                                     W8A8Epilogue epi, OutT* __restrict__ out,
                                                                     int32_t* __restrict__ partial, int M, int N, int K) {
#ifdef PTQRT_SM90A
  PTQRT_DYNAMIC_SMEM(uint8_t, smem_raw);
  // The swizzle pattern is a function of the shared-memory address: stages must start 1024-aligned.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;

  const int tiles_m = ceil_div(M, kBM), tiles_n = ceil_div(N, kBN);
  int tm, tn;
  grouped_tile(blockIdx.x, tiles_m, tiles_n, kGroupM, tm, tn);
  const int m0 = tm * kBM, n0 = tn * kBN;
  const int kt_total = ceil_div(K, kBK);
  const int kt_per = ceil_div(kt_total, gridDim.z);
  const int kt_begin = blockIdx.z * kt_per;
  const int nk = max(0, min(kt_total, kt_begin + kt_per) - kt_begin);

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    prefetch_tensormap(&tma_x);
    prefetch_tensormap(&tma_w);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);      // the producer's arrive.expect_tx, then the TMA bytes
      mbar_init(&empty[s], 256);   // every consumer thread, once its wgmma reads of the stage are done
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      for (int it = 0; it < nk; ++it) {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        while (!mbar_try_wait(&empty[s], phase ^ 1)) {
        }
        uint8_t* a = smem + s * kStageBytes;
        mbar_arrive_expect_tx(&full[s], kStageBytes);
        const int k = (kt_begin + it) * kBK;
        tma_load_2d(a, &tma_x, k, m0, &full[s]);
        tma_load_2d(a + kABytes, &tma_w, k, n0, &full[s]);
      }
    }
    return;
  }

  setmaxnreg_inc<232>();
  const int c = wg - 1;  // rows 64c .. 64c + 63 of the tile
  int acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0;

  for (int it = 0; it < nk; ++it) {
    const int s = it % kStages;
    while (!mbar_try_wait(&full[s], (it / kStages) & 1)) {
    }
    const uint32_t a = smem_addr(smem + s * kStageBytes + c * 64 * kBK);
    const uint32_t b = smem_addr(smem + s * kStageBytes + kABytes);
    fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) wgmma_m64n256k32_s8(acc, make_desc(a + 32 * kk), make_desc(b + 32 * kk), 1);
    wgmma_commit();
    // Keep this stage's group in flight; the previous one is complete, so its stage can be refilled.
    wgmma_wait<1>();
    fence_operands(acc);
    if (it > 0) mbar_arrive(&empty[(it - 1) % kStages]);
  }
  wgmma_wait<0>();
  fence_operands(acc);

  const int lane = threadIdx.x % kWarp, warp = (threadIdx.x % 128) / kWarp;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int n = n0 + 8 * j + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + 64 * c + 16 * warp + g + 8 * h;
      if (m >= M) continue;
      if (partial != nullptr)
        store_w8a8_pair<int32_t>(partial + int64_t(blockIdx.z) * M * N, epi, acc[4 * j + 2 * h],
                                 acc[4 * j + 2 * h + 1], m, n, N);
      else
        store_w8a8_pair<OutT>(out, epi, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], m, n, N);
    }
  }
#else
  // Built for another architecture: this kernel must never be launched there (the host checks).
  __trap();
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ptqrt
