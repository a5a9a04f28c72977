// w8a8_gemm on int8 tensor cores: mma.sync m16n8k32 s8·s8 -> s32 (sm_80 and newer).
//
//   acc[m, n] = sum_k x[m, k] * w[n, k]                       exact int32
//   y[m, n]   = (float(acc) * x_scale[m]) * w_scale[n] + bias[n]   fp32, in this order, then cast
//
// x [M, K] and w [N, K] are both K-contiguous, which is exactly the row.col operand layout of the
// int8 mma, so neither needs a transpose. Tiles: BM x BN x 128 bytes of K, STAGES-deep cp.async
// pipeline, operands read with ldmatrix from an XOR-swizzled shared layout (16-byte chunk c of row r
// lives at chunk c ^ (r % 8), so the 8 rows one ldmatrix phase reads hit 8 different bank groups).
// Tails: rows past M / N and K chunks past K are zero-filled by cp.async (K must be a multiple of 16;
// the host pads otherwise), so the int32 sums are unchanged.
//
// Split-K (grid z): each split writes its raw int32 partial tile to `partial`, and
// w8a8_split_reduce_kernel adds the splits in a fixed order (int32 adds are exact, so the result
// is bit-identical to the unsplit GEMM) and applies the epilogue.
#pragma once

#include "common.cuh"

namespace ptqrt {
namespace cuda {

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int GROUP_M_>
struct W8A8Tile {
  static constexpr int BM = BM_, BN = BN_, BK = 128;  // BK in bytes == int8 elements
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_, GROUP_M = GROUP_M_;
  static constexpr int THREADS = WARPS_M * WARPS_N * kWarp;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
  static constexpr int STAGE_BYTES = (BM + BN) * BK;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be whole m16 / pairs of n8 tiles");
  static_assert((BM * 8) % THREADS == 0 && (BN * 8) % THREADS == 0, "whole 16-byte chunks per thread");
};

// Byte offset of 16-byte chunk `ch` (0..7) of tile row `row` (rows are 128 bytes).
__device__ __forceinline__ int swz128(int row, int ch) { return row * 128 + ((ch ^ (row & 7)) << 4); }

struct W8A8Epilogue {
  const float* x_scale;
  int x_scale_stride;
  const float* w_scale;
  const float* bias;

  // __fmul_rn / __fadd_rn are never fused into an FMA: the reference rounds after each step.
  __device__ __forceinline__ float operator()(int32_t acc, int m, int n) const {
    return apply(acc, row_scale(m), col_scale(n), col_bias(n));
  }
  // The same with the scales already loaded. The loads are read-only (__ldg: ld.global.nc), so the
  // compiler may issue them ahead of the output stores (plain loads through these pointers could alias
  // `out`: each one waited for the store before it).
  __device__ __forceinline__ float row_scale(int m) const { return __ldg(x_scale + int64_t(m) * x_scale_stride); }
  __device__ __forceinline__ float col_scale(int n) const { return __ldg(w_scale + n); }
  __device__ __forceinline__ float col_bias(int n) const { return bias != nullptr ? __ldg(bias + n) : 0.f; }
  __device__ __forceinline__ float apply(int32_t acc, float xs, float ws, float b) const {
    float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), xs), ws);
    if (bias != nullptr) y = __fadd_rn(y, b);  // (no "+ 0": -0 + 0 is +0)
    return y;
  }
};

// Stores the two adjacent outputs (m, n) and (m, n + 1); n is even.
template <typename OutT, typename V>
__device__ __forceinline__ void store_pair(OutT* out, V y0, V y1, int m, int n, int N) {
  OutT* p = out + int64_t(m) * N + n;
  if constexpr (std::is_same<OutT, int32_t>::value) {
    if (n + 1 < N && (N & 1) == 0) {
      *reinterpret_cast<int2*>(p) = make_int2(y0, y1);
    } else {
      if (n < N) p[0] = y0;
      if (n + 1 < N) p[1] = y1;
    }
  } else {
    if (n + 1 < N && (N & 1) == 0) {
      *reinterpret_cast<typename Pair<OutT>::type*>(p) = make_pair2<OutT>(y0, y1);
    } else {
      if (n < N) p[0] = from_float<OutT>(y0);
      if (n + 1 < N) p[1] = from_float<OutT>(y1);
    }
  }
}

// Stores the two adjacent accumulators (m, n) and (m, n + 1) through the epilogue (raw for int32).
template <typename OutT>
__device__ __forceinline__ void store_w8a8_pair(OutT* out, const W8A8Epilogue& epi, int32_t a0, int32_t a1, int m,
                                                int n, int N) {
  if constexpr (std::is_same<OutT, int32_t>::value) {
    store_pair<OutT>(out, a0, a1, m, n, N);
  } else {
    store_pair<OutT>(out, n < N ? epi(a0, m, n) : 0.f, n + 1 < N ? epi(a1, m, n + 1) : 0.f, m, n, N);
  }
}

template <class C>
__device__ __forceinline__ void w8a8_load_tile(uint8_t* sA, uint8_t* sB, const int8_t* __restrict__ x,
                                               const int8_t* __restrict__ w, int M, int N, int K, int m0, int n0,
                                               int k0) {
#pragma unroll
  for (int i = 0; i < C::BM * 8 / C::THREADS; ++i) {
    const int c = threadIdx.x + i * C::THREADS;
    const int row = c >> 3, ch = c & 7;
    const int gm = m0 + row, gk = k0 + ch * 16;
    const bool p = gm < M && gk < K;
    cp_async16(sA + swz128(row, ch), p ? x + int64_t(gm) * K + gk : x, p);
  }
#pragma unroll
  for (int i = 0; i < C::BN * 8 / C::THREADS; ++i) {
    const int c = threadIdx.x + i * C::THREADS;
    const int row = c >> 3, ch = c & 7;
    const int gn = n0 + row, gk = k0 + ch * 16;
    const bool p = gn < N && gk < K;
    cp_async16(sB + swz128(row, ch), p ? w + int64_t(gn) * K + gk : w, p);
  }
}

// grid: (tiles_m * tiles_n, 1, splits); block: C::THREADS; dynamic smem: C::SMEM_BYTES.
template <class C, typename OutT>
__global__ void __launch_bounds__(C::THREADS) w8a8_gemm_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                                                               W8A8Epilogue epi, OutT* __restrict__ out,
                                                               int32_t* __restrict__ partial, int M, int N, int K) {
  PTQRT_DYNAMIC_SMEM(uint8_t, smem);
  const int tiles_m = ceil_div(M, C::BM), tiles_n = ceil_div(N, C::BN);
  int tm, tn;
  grouped_tile(blockIdx.x, tiles_m, tiles_n, C::GROUP_M, tm, tn);
  const int m0 = tm * C::BM, n0 = tn * C::BN;

  int kt_begin, nk;
  split_k_tiles(K, C::BK, kt_begin, nk);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;

  int acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  auto stage_a = [&](int s) { return smem + s * C::STAGE_BYTES; };
  auto stage_b = [&](int s) { return smem + s * C::STAGE_BYTES + C::BM * C::BK; };

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nk) w8a8_load_tile<C>(stage_a(s), stage_b(s), x, w, M, N, K, m0, n0, (kt_begin + s) * C::BK);
    cp_async_commit();  // empty groups keep the group count in step with the tile index
  }

  for (int it = 0; it < nk; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile `it` visible to all; everyone is done with the stage refilled below
    const int nxt = it + C::STAGES - 1;
    if (nxt < nk)
      w8a8_load_tile<C>(stage_a(nxt % C::STAGES), stage_b(nxt % C::STAGES), x, w, M, N, K, m0, n0,
                        (kt_begin + nxt) * C::BK);
    cp_async_commit();

    const uint8_t* sA = stage_a(it % C::STAGES);
    const uint8_t* sB = stage_b(it % C::STAGES);
#pragma unroll
    for (int ks = 0; ks < C::BK / 32; ++ks) {
      uint32_t a[C::MI][4];
      uint32_t b[C::NI][2];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
        // matrices: (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31)
        const int row = wm * C::WTM + mi * 16 + (lane & 15);
        ldmatrix_x4(a[mi], sA + swz128(row, ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int nj = 0; nj < C::NI / 2; ++nj) {
        // matrices: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
        const int row = wn * C::WTN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        ldmatrix_x4(r, sB + swz128(row, ks * 2 + ((lane >> 3) & 1)));
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) mma_s8_16832(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Accumulator fragment: c0, c1 at (row g, cols 2t, 2t+1); c2, c3 at (row g + 8, same cols).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int n = n0 + wn * C::WTN + ni * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * C::WTM + mi * 16 + g + 8 * h;
        if (m >= M) continue;
        if (partial != nullptr)
          store_w8a8_pair<int32_t>(partial + int64_t(blockIdx.z) * M * N, epi, acc[mi][ni][2 * h],
                                   acc[mi][ni][2 * h + 1], m, n, N);
        else
          store_w8a8_pair<OutT>(out, epi, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], m, n, N);
      }
    }
  }
}

// out[m, n] = epilogue(sum over splits of partial[s, m, n]); the sum order is fixed (deterministic).
template <typename OutT>
__global__ void __launch_bounds__(256) w8a8_split_reduce_kernel(const int32_t* __restrict__ partial, W8A8Epilogue epi,
                                                                OutT* __restrict__ out, int M, int N, int splits) {
  const int64_t total = int64_t(M) * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int32_t s = 0;
    for (int z = 0; z < splits; ++z) s += partial[z * total + i];
    if constexpr (std::is_same<OutT, int32_t>::value) {
      out[i] = s;
    } else {
      out[i] = from_float<OutT>(epi(s, static_cast<int>(i / N), static_cast<int>(i % N)));
    }
  }
}

}  // namespace cuda
}  // namespace ptqrt
