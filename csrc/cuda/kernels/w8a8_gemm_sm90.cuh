// w8a8_gemm for Hopper (sm_90a): TMA tile loads, warpgroup MMA (wgmma m64n256k32 s8), same math and
// epilogue as the mma.sync kernel (kernels/w8a8_gemm.cuh):
//
//   acc = x[M, K] . w[N, K]^T (exact int32);  y = (float(acc) * x_scale[m]) * w_scale[n] + bias[n]
//
// CTA tile 128 x BN x 128 bytes of K (BN 256, or 128 when 256-wide tiles leave SMs idle), a ring of
// shared-memory stages, three warpgroups:
//   warpgroup 0  producer: one thread waits for a free stage ("empty" barrier), announces the stage's
//                bytes on its "full" barrier and issues two TMA box loads (x rows, w rows). TMA writes
//                128-byte swizzled rows and zero-fills whatever lies past M, N or K.
//   warpgroups 1, 2  consumers, rows 0-63 and 64-127 of the tile: wait "full", issue four wgmma (one per
//                32 bytes of K) into BN / 2 int32 accumulators per thread, keep one wgmma group in flight,
//                and release the previous stage on "empty" once its group has completed.
// setmaxnreg moves registers from the producer (which needs few) to the consumers (128 accumulators).
// A CTA runs tiles blockIdx.x, blockIdx.x + gridDim.x, ...: one each on the default grid (a CTA per
// tile), several on a persistent grid (a CTA per SM: the default; PTQRT_CUDA_SM90_PERSISTENT=0), where the producer
// fills the next tile's stages while the consumers store this one.
// The epilogue loads its scales with __ldg ahead of the stores (w8a8_gemm.cuh's W8A8Epilogue).
// Split-K over grid z, as in the mma.sync kernel (raw int32 partials, reduced in a fixed order).
// (Pairs of CTAs sharing the w tile by TMA multicast ran 0.66-1.01x this kernel on an H100 and were
// removed: bench/NOTES.md.)
#pragma once

#include "sm90_wgmma.cuh"
#include "w8a8_gemm.cuh"

namespace ptqrt {
namespace cuda {
namespace sm90 {

template <int BN_>
struct W8A8Sm90 {
  static constexpr int kBM = 128, kBN = BN_, kBK = 128;
  static constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK, kStageBytes = kABytes + kBBytes;
  static constexpr int kStages = kBN == 256 ? 4 : 6;  // 192 KB of stages either way
  static constexpr int kEpiBytes = 8 * 16 * 256;      // the epilogue's buffer: 16 rows x 256 bytes a consumer warp
  // Stages, the epilogue's buffer, then 2 * kStages barriers, plus slack to align the stages to 1024
  // bytes (the swizzle atom): 230,464 / 230,496 bytes of the H100's 232,448.
  static constexpr int kSmemBytes = kStages * kStageBytes + kEpiBytes + 2 * kStages * 8 + 1024;
  static constexpr int kGroupM = 8;
  static_assert(kBN == 128 || kBN == 256, "wgmma N of the generated wrappers");
};

// The epilogue of one consumer warp's 16 rows (row0 ..) x BN columns (n0 ..) through its 4 KB shared
// buffer `buf`: CW = 256 bytes' worth of columns at a time are written there in the accumulator layout
// (accumulator 4j + 2h + i is row g + 8h, column 8j + 2t + i; the 16-byte chunk index XORed with
// stage_swizzle(row), so neither the 4-byte writes of a warp nor the 8-byte writes of a half-warp
// share a bank), then read back a 16-byte vector a lane, two whole rows a warp instruction, and
// stored: 512 contiguous bytes of two rows a store (whole 128-byte lines where rows are multiples
// of 128 bytes) instead of the accumulator layout's 8 rows x 16 bytes (a warp's direct stores of
// 16 x 256 fp16 take 64 pair stores of 8 lines each; these take 16 of 4).
// Needs N * sizeof(OutT) % 16 == 0 and a 16-byte aligned `out`.
// Scales (float outputs): the two row scales once, column scales and bias 8 column pairs at a time,
// all read-only loads issued before their values are used.
// A permutation of 0..7: rows 0-3 (the first half-warp of an 8-byte write) get the even values, rows 4-7
// the odd ones, so (2j + t / 2) ^ stage_swizzle(row) is distinct over a half-warp's 4 rows x 2 chunks.
__device__ __forceinline__ int stage_swizzle(int r) { return ((r & 3) << 1) | ((r >> 2) & 1); }

template <typename OutT, int BN>
__device__ __forceinline__ void store_rows_staged(const int (&acc)[BN / 2], const W8A8Epilogue& epi, OutT* out,
                                                  uint8_t* buf, int row0, int n0, int M, int N, int lane) {
  constexpr bool kRaw = std::is_same<OutT, int32_t>::value;
  constexpr int kCW = 256 / int(sizeof(OutT)), kVE = 16 / int(sizeof(OutT)), kJ = 8;
  using PairT = typename Pair<OutT>::type;
  const int g = lane >> 2, t = lane & 3;
  float xs[2] = {0.f, 0.f};
  if constexpr (!kRaw) {
    xs[0] = row0 + g < M ? epi.row_scale(row0 + g) : 0.f;
    xs[1] = row0 + g + 8 < M ? epi.row_scale(row0 + g + 8) : 0.f;
  }
#pragma unroll
  for (int cc = 0; cc < BN; cc += kCW) {
#pragma unroll
    for (int j0 = cc / 8; j0 < (cc + kCW) / 8; j0 += kJ) {
      float ws[kJ][2] = {}, bs[kJ][2] = {};
      if constexpr (!kRaw) {
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int n = n0 + 8 * (j0 + j) + 2 * t + i;
            ws[j][i] = n < N ? epi.col_scale(n) : 0.f;
            bs[j][i] = n < N ? epi.col_bias(n) : 0.f;
          }
      }
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int a = 4 * (j0 + j) + 2 * h, r = g + 8 * h;
          const int byte = (8 * (j0 + j) + 2 * t - cc) * int(sizeof(OutT));
          PairT* p = reinterpret_cast<PairT*>(buf + r * 256 + (((byte >> 4) ^ stage_swizzle(r & 7)) << 4) + (byte & 15));
          if constexpr (kRaw)
            *p = make_int2(acc[a], acc[a + 1]);
          else
            *p = make_pair2<OutT>(epi.apply(acc[a], xs[h], ws[j][0], bs[j][0]),
                                  epi.apply(acc[a + 1], xs[h], ws[j][1], bs[j][1]));
        }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = 2 * i + (lane >> 4), v = lane & 15;
      const int m = row0 + r, n = n0 + cc + v * kVE;
      // N is a multiple of kVE here: a vector is either wholly inside N or wholly past it.
      if (m < M && n < N)
        *reinterpret_cast<uint4*>(out + int64_t(m) * N + n) =
            *reinterpret_cast<const uint4*>(buf + r * 256 + ((v ^ stage_swizzle(r & 7)) << 4));
    }
    __syncwarp();  // the buffer is rewritten by the next pass
  }
}

// A consumer warp's 16 rows (row0 ..) x BN columns (n0 ..) of output: through its shared buffer where
// rows are a multiple of 16 bytes and `out` is 16-byte aligned (store_rows_staged), else pair by pair
// from the accumulator layout (accumulator 4j + 2h + i: row g + 8h, column 8j + 2t + i), int32 raw,
// floats through the epilogue with read-only scale loads. OutT int32: raw accumulators, no epilogue.
template <typename OutT, int BN>
__device__ __forceinline__ void store_tile(const int (&acc)[BN / 2], const W8A8Epilogue& epi, OutT* out,
                                           uint8_t* buf, int row0, int n0, int M, int N, int lane) {
  if ((int64_t(N) * int64_t(sizeof(OutT))) % 16 == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    store_rows_staged<OutT, BN>(acc, epi, out, buf, row0, n0, M, N, lane);
    return;
  }
  const int r0 = row0 + (lane >> 2), t = lane & 3;
  float xs[2] = {0.f, 0.f};
  if constexpr (!std::is_same<OutT, int32_t>::value) {
    xs[0] = r0 < M ? epi.row_scale(r0) : 0.f;
    xs[1] = r0 + 8 < M ? epi.row_scale(r0 + 8) : 0.f;
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int n = n0 + 8 * j + 2 * t;
    float ws[2] = {0.f, 0.f}, bs[2] = {0.f, 0.f};
    if constexpr (!std::is_same<OutT, int32_t>::value) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ws[i] = n + i < N ? epi.col_scale(n + i) : 0.f;
        bs[i] = n + i < N ? epi.col_bias(n + i) : 0.f;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (r0 + 8 * h >= M) continue;
      const int a0 = acc[4 * j + 2 * h], a1 = acc[4 * j + 2 * h + 1];
      if constexpr (std::is_same<OutT, int32_t>::value)
        store_pair<int32_t>(out, a0, a1, r0 + 8 * h, n, N);
      else
        store_pair<OutT>(out, epi.apply(a0, xs[h], ws[0], bs[0]), epi.apply(a1, xs[h], ws[1], bs[1]), r0 + 8 * h, n, N);
    }
  }
}

template <typename OutT, int BN>
__global__ void __launch_bounds__(384, 1) w8a8_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tma_x,
                                                                const __grid_constant__ CUtensorMap tma_w,
                                                                W8A8Epilogue epi, OutT* __restrict__ out,
                                                                int32_t* __restrict__ partial, int M, int N, int K) {
#ifdef PTQRT_SM90A
  using C = W8A8Sm90<BN>;
  constexpr int kBM = C::kBM, kBN = C::kBN, kBK = C::kBK, kStages = C::kStages, kABytes = C::kABytes,
                kStageBytes = C::kStageBytes, kGroupM = C::kGroupM;
  PTQRT_DYNAMIC_SMEM(uint8_t, smem_raw);
  // The swizzle pattern is a function of the shared-memory address: stages must start 1024-aligned.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* ebuf = smem + kStages * kStageBytes;  // 4 KB a consumer warp, its own: no CTA barrier needed
  uint64_t* full = reinterpret_cast<uint64_t*>(ebuf + C::kEpiBytes);
  uint64_t* empty = full + kStages;

  // Tiles blockIdx.x, blockIdx.x + gridDim.x, ...: one per CTA (grid = tiles), or several for a
  // persistent grid (grid = SMs), whose producer then loads the next tile's stages while the
  // consumers run this tile's epilogue. The ring's fill count `it` runs on across tiles.
  const int tiles_m = ceil_div(M, kBM), tiles_n = ceil_div(N, kBN), tiles = tiles_m * tiles_n;
  int kt_begin, nk;
  split_k_tiles(K, kBK, kt_begin, nk);

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) init_pipeline(&tma_x, &tma_w, full, empty, kStages, 256);
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int it0 = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, it0 += nk) {
        int tm, tn;
        grouped_tile(tile, tiles_m, tiles_n, kGroupM, tm, tn);
        produce(it0, nk, kStages, smem, kStageBytes, full, empty, [&](uint8_t* st, int i, uint64_t* bar) {
          const int k = (kt_begin + i) * kBK;
          tma_load_2d(st, &tma_x, k, tm * kBM, bar);
          tma_load_2d(st + kABytes, &tma_w, k, tn * kBN, bar);
        });
      }
    }
    return;
  }

  setmaxnreg_inc<232>();
  const int c = wg - 1;  // rows 64c .. 64c + 63 of the tile
  int it0 = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, it0 += nk) {
    int tm, tn;
    grouped_tile(tile, tiles_m, tiles_n, kGroupM, tm, tn);
    const int m0 = tm * kBM, n0 = tn * kBN;
    int acc[kBN / 2];
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) acc[i] = 0;

    for (int i = 0; i < nk; ++i) {
      const int it = it0 + i, s = it % kStages;
      while (!mbar_try_wait(&full[s], (it / kStages) & 1)) {
      }
      const uint32_t a = smem_addr(smem + s * kStageBytes + c * 64 * kBK);
      const uint32_t b = smem_addr(smem + s * kStageBytes + kABytes);
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 32; ++kk) wgmma_s8<kBN>(acc, make_desc(a + 32 * kk), make_desc(b + 32 * kk), 1);
      wgmma_commit();
      // Keep this stage's group in flight; the previous one is complete, so its stage can be refilled.
      wgmma_wait<1>();
      fence_operands(acc);
      if (i > 0) mbar_arrive(&empty[(it - 1) % kStages]);
    }
    wgmma_wait<0>();
    fence_operands(acc);
    if (nk > 0) mbar_arrive(&empty[(it0 + nk - 1) % kStages]);  // the tile's last stage, for the next tile

    // Epilogue: split-K's raw int32 partials, or the output (store_tile).
    const int row0 = m0 + 64 * c + 16 * ((threadIdx.x % 128) / kWarp), lane = threadIdx.x % kWarp;
    uint8_t* wbuf = ebuf + (threadIdx.x / kWarp - 4) * 4096;  // this consumer warp's 4 KB
    if (partial != nullptr)
      store_tile<int32_t, kBN>(acc, epi, partial + int64_t(blockIdx.z) * M * N, wbuf, row0, n0, M, N, lane);
    else
      store_tile<OutT, kBN>(acc, epi, out, wbuf, row0, n0, M, N, lane);
  }  // tiles
#else
  // Built for another architecture: this kernel must never be launched there (the host checks).
  __trap();
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ptqrt
