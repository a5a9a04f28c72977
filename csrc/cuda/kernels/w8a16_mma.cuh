// w8a16_gemm for M > 16 with fp16 / bf16 activations: mma.sync m16n8k16, fp32 accumulation,
// weights dequantized in registers.
//
//   y[m, n] = sum_k x[m, k] * (w[n, k] * s[n, k / g]) + bias[n]   (s[n] when group_size == 0)
//
// Per channel (group_size 0) the weights enter the mma as exact integers (|q| <= 127 is exact in
// fp16 and bf16) and s[n] is applied to the fp32 sum in the epilogue. Per group (group_size a
// multiple of 16, so each k16 step lies in one group) q * s is rounded to the activation dtype.
//
// Tiles: BM x BN x 64 (k), STAGES-deep cp.async pipeline. x tiles are 128-byte rows, w tiles (int8)
// 64-byte rows, both XOR-swizzled by 16-byte chunk. The k order inside each k16 step is permuted so
// that a thread's four weight bytes come from one ldmatrix (int8 read as b16 pairs: thread (g, t) gets
// bytes 4t..4t+3 of row g) and its x values from one 8-byte load: logical k 2t, 2t+1 -> 4t, 4t+1 and
// logical 2t+8, 2t+9 -> 4t+2, 4t+3 for both operands.
//
// Split-K (grid z) writes fp32 partial tiles (before bias; per channel also before the scale) and
// w8a16_split_reduce_kernel finishes them in a fixed order.
#pragma once

#include "dequant.cuh"

namespace ptqrt {
namespace cuda {

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int GROUP_M_>
struct W8A16Tile {
  static constexpr int BM = BM_, BN = BN_, BK = 64;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_, GROUP_M = GROUP_M_;
  static constexpr int THREADS = WARPS_M * WARPS_N * kWarp;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
  static constexpr int MI = WTM / 16, NI = WTN / 8;
  static constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
  static_assert(WTM % 16 == 0 && WTN % 32 == 0, "whole m16 tiles; n8 tiles in groups of 4 (one ldmatrix.x4)");
  static_assert((BM * 8) % THREADS == 0 && (BN * 4) % THREADS == 0, "whole 16-byte chunks per thread");
};

// x tile rows: 64 values of 2 bytes = 8 chunks; w tile rows: 64 bytes = 4 chunks.
__device__ __forceinline__ int swz_x(int row, int ch) { return row * 128 + ((ch ^ (row & 7)) << 4); }
__device__ __forceinline__ int swz_w(int row, int ch) { return row * 64 + ((ch ^ ((row >> 1) & 3)) << 4); }

template <class C, typename T>
__device__ __forceinline__ void w8a16_load_tile(uint8_t* sA, uint8_t* sB, const T* __restrict__ x,
                                                const int8_t* __restrict__ w, int M, int N, int K, int m0, int n0,
                                                int k0) {
#pragma unroll
  for (int i = 0; i < C::BM * 8 / C::THREADS; ++i) {
    const int c = threadIdx.x + i * C::THREADS;
    const int row = c >> 3, ch = c & 7;
    const int gm = m0 + row, gk = k0 + ch * 8;
    const bool p = gm < M && gk < K;
    cp_async16(sA + swz_x(row, ch), p ? x + int64_t(gm) * K + gk : x, p);
  }
#pragma unroll
  for (int i = 0; i < C::BN * 4 / C::THREADS; ++i) {
    const int c = threadIdx.x + i * C::THREADS;
    const int row = c >> 2, ch = c & 3;
    const int gn = n0 + row, gk = k0 + ch * 16;
    const bool p = gn < N && gk < K;
    cp_async16(sB + swz_w(row, ch), p ? w + int64_t(gn) * K + gk : w, p);
  }
}

// grid: (tiles_m * tiles_n, 1, splits); block C::THREADS; dynamic smem C::SMEM_BYTES.
// K % 16 == 0 (so a 16-byte chunk is all in or all out of range); group_size 0 or a multiple of 16.
template <class C, typename T>
__global__ void __launch_bounds__(C::THREADS) w8a16_mma_kernel(const T* __restrict__ x, const int8_t* __restrict__ w,
                                                               const float* __restrict__ w_scale,
                                                               const float* __restrict__ bias, T* __restrict__ out,
                                                               float* __restrict__ partial, int M, int N, int K,
                                                               int group_size) {
  PTQRT_DYNAMIC_SMEM(uint8_t, smem);
  const int tiles_m = ceil_div(M, C::BM), tiles_n = ceil_div(N, C::BN);
  int tm, tn;
  grouped_tile(blockIdx.x, tiles_m, tiles_n, C::GROUP_M, tm, tn);
  const int m0 = tm * C::BM, n0 = tn * C::BN;

  int kt_begin, nk;
  split_k_tiles(K, C::BK, kt_begin, nk);
  const int groups = group_size > 0 ? K / group_size : 1;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
  const int g = lane >> 2, t = lane & 3;

  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  // Per-group scales of this thread's weight rows (n = column g of each n8 tile), reloaded on group change.
  float s[C::NI];
  int cur_group = -1;
#pragma unroll
  for (int ni = 0; ni < C::NI; ++ni) s[ni] = 1.f;

  auto stage_a = [&](int st) { return smem + st * C::STAGE_BYTES; };
  auto stage_b = [&](int st) { return smem + st * C::STAGE_BYTES + C::A_BYTES; };

#pragma unroll
  for (int st = 0; st < C::STAGES - 1; ++st) {
    if (st < nk) w8a16_load_tile<C, T>(stage_a(st), stage_b(st), x, w, M, N, K, m0, n0, (kt_begin + st) * C::BK);
    cp_async_commit();
  }

  for (int it = 0; it < nk; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int nxt = it + C::STAGES - 1;
    if (nxt < nk)
      w8a16_load_tile<C, T>(stage_a(nxt % C::STAGES), stage_b(nxt % C::STAGES), x, w, M, N, K, m0, n0,
                            (kt_begin + nxt) * C::BK);
    cp_async_commit();

    const uint8_t* sA = stage_a(it % C::STAGES);
    const uint8_t* sB = stage_b(it % C::STAGES);
    const int k0 = (kt_begin + it) * C::BK;
#pragma unroll
    for (int kk = 0; kk < C::BK / 16; ++kk) {
      if (group_size > 0) {
        const int grp = (k0 + kk * 16) / group_size;
        if (grp != cur_group && k0 + kk * 16 < K) {
          cur_group = grp;
#pragma unroll
          for (int ni = 0; ni < C::NI; ++ni) {
            const int n = n0 + wn * C::WTN + ni * 8 + g;
            s[ni] = n < N ? w_scale[int64_t(n) * groups + grp] : 0.f;
          }
        }
      }
      // x: thread (g, t) reads values kk*16 + 4t .. +3 (8 bytes) of rows g and g + 8.
      uint32_t a[C::MI][4];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
        const int row = wm * C::WTM + mi * 16 + g;
        const int byte = (kk * 16 + 4 * t) * 2;  // within the 128-byte row
        const uint2 lo = *reinterpret_cast<const uint2*>(sA + swz_x(row, byte >> 4) + (byte & 15));
        const uint2 hi = *reinterpret_cast<const uint2*>(sA + swz_x(row + 8, byte >> 4) + (byte & 15));
        a[mi][0] = lo.x;  // row g,     logical k 2t, 2t+1
        a[mi][1] = hi.x;  // row g + 8, logical k 2t, 2t+1
        a[mi][2] = lo.y;  // row g,     logical k 2t+8, 2t+9
        a[mi][3] = hi.y;  // row g + 8, logical k 2t+8, 2t+9
      }
      // w: one ldmatrix.x4 covers four n8 tiles (lanes 0-31 address rows 0-31 of the group, chunk kk).
      uint32_t b[C::NI][2];
#pragma unroll
      for (int nj = 0; nj < C::NI / 4; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, sB + swz_w(wn * C::WTN + nj * 32 + lane, kk));
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (group_size > 0)
            int8x4_scaled_pairs<T>(r[q], s[nj * 4 + q], b[nj * 4 + q][0], b[nj * 4 + q][1]);
          else
            int8x4_to_pairs<T>(r[q], b[nj * 4 + q][0], b[nj * 4 + q][1]);
        }
      }
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int n = n0 + wn * C::WTN + ni * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * C::WTM + mi * 16 + g + 8 * h;
        if (m >= M) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int nn = n + e;
          if (nn >= N) continue;
          float v = acc[mi][ni][2 * h + e];
          if (partial != nullptr) {
            partial[int64_t(blockIdx.z) * M * N + int64_t(m) * N + nn] = v;
          } else {
            if (group_size == 0) v *= w_scale[nn];
            if (bias != nullptr) v += bias[nn];
            out[int64_t(m) * N + nn] = from_float<T>(v);
          }
        }
      }
    }
  }
}

// out[m, n] = (sum over splits of partial[s, m, n]) (* w_scale[n] per channel) + bias[n], fixed order.
template <typename T>
__global__ void __launch_bounds__(256) w8a16_split_reduce_kernel(const float* __restrict__ partial,
                                                                 const float* __restrict__ w_scale,
                                                                 const float* __restrict__ bias, T* __restrict__ out,
                                                                 int M, int N, int splits, int group_size) {
  const int64_t total = int64_t(M) * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < splits; ++z) v += partial[z * total + i];
    const int n = static_cast<int>(i % N);
    if (group_size == 0) v *= w_scale[n];
    if (bias != nullptr) v += bias[n];
    out[i] = from_float<T>(v);
  }
}

}  // namespace cuda
}  // namespace ptqrt
