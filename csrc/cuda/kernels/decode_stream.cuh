// int8_kv_decode_attention, streaming form (one pass, online softmax), for 1 or 2 query heads per
// CTA with D in {64, 128, 256} (16 columns a lane), or 4 (GQA groups of 3-4) with D in {64, 128} (8
// columns a lane, to keep q' and the accumulators of 4 heads in registers); 16-byte aligned caches.
// Same contract, grid, split-KV partials and combine kernel as decode_attention.cuh; the default for
// every group it serves (measured on an H100: 1.3-1.9x decode_attention.cuh without GQA, 1.00-1.13x
// with groups of 4; PTQRT_CUDA_DECODE_STREAM=0 turns it off).
//
// Why a second form. decode_attention.cuh gives each thread a whole K row (a warp's 16-byte load
// touches 32 rows, 32 cache lines) and runs its three phases (scores, softmax, P.V) one after the
// other, each with few bytes in flight; it reached 46-61% of copy bandwidth on an H100. Here:
//   * the D / COLS lanes of a row group read one row's COLS-byte slices side by side (a warp-wide copy
//     covers 32 / (D / COLS) whole rows); lane (grp, sl) owns columns [COLS sl, COLS sl + COLS);
//   * each warp streams its own tiles of TILE = (32 / LPR) * U tokens through a kStreamStages-deep
//     cp.async ring in shared memory (K, V and their dynamic scales), so two tiles are in flight
//     while one is computed. Each lane reads back only the bytes it copied itself, so the ring needs
//     no barrier: the thread's own cp.async.wait_group makes them visible to it;
//   * every warp keeps its own running max, sum and accumulator (flash-decoding inside the CTA),
//     rescaled once per tile; the warps' (m, l, acc) meet in shared memory at the end.
// (Registers alone do not keep the loads in flight: ptxas sinks each 16-byte load next to its first
// use to save registers, one K load at a time -- seen in the sm_90a SASS of the register version.)
#pragma once

#include "../launch.h"
#include "dequant.cuh"

namespace ptqrt {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr int kStreamStages = 3;  // tiles per warp in the ring: one computed, two in flight
constexpr int kStreamRows = 4;    // U: rows per lane per tile

// Columns a lane owns for `gt` query heads per CTA (0: the streaming kernel does not serve them).
__host__ __device__ constexpr int decode_stream_cols(int gt) { return gt <= 2 ? 16 : gt == 4 ? 8 : 0; }

// Whether the streaming kernel serves these arguments (the launcher's choice).
__host__ __device__ inline bool decode_stream_fits(const DecodeArgs& a, int gt) {
  const int cols = decode_stream_cols(gt);
  const bool d_ok = cols == 16 ? (a.D == 64 || a.D == 128 || a.D == 256) : cols == 8 && (a.D == 64 || a.D == 128);
  return a.stream && a.vec && d_ok && a.num_blocks > 0 && a.block_size > 0;
}

// Ring bytes per warp and stage: K and V slices [U][32 lanes][COLS B], then k and v scales [U][32 lanes].
__host__ __device__ constexpr int stream_stage_bytes(int cols) { return kStreamRows * kWarp * (2 * cols + 4 + 4); }
__host__ __device__ constexpr size_t decode_stream_smem_bytes(int cols) {
  return size_t(kDecodeWarps) * kStreamStages * stream_stage_bytes(cols);
}

// COLS int8 (one slice of a row, 16 or 8 bytes of shared memory) -> exact floats.
template <int COLS>
__device__ __forceinline__ void int8_slice_to_float(const unsigned char* p, float (&f)[COLS]) {
  uint32_t words[COLS / 4];
  if constexpr (COLS == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    words[0] = raw.x, words[1] = raw.y, words[2] = raw.z, words[3] = raw.w;
  } else {
    static_assert(COLS == 8, "16- or 8-byte slices");
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    words[0] = raw.x, words[1] = raw.y;
  }
#pragma unroll
  for (int j = 0; j < COLS / 4; ++j) {
    float t[4];
    int8x4_to_float(words[j], t);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[4 * j + i] = t[i];
  }
}

// The tiles of TILE tokens one warp of a streaming kernel's CTA takes from its split: tile i starts at
// token first + i * stride of the split (the warps take turns), and there are `tiles` of them (the
// count is warp-uniform, so every shuffle has all 32 lanes). start: the split's first token; n: its
// tokens (0 past the sequence's end).
struct DecodeWarpTiles {
  int start, n, first, stride, tiles;
};
__device__ __forceinline__ DecodeWarpTiles decode_warp_tiles(const DecodeArgs& a, int b, int split, int warp, int tile) {
  int len = a.seq_lens[b];
  len = max(0, min(len, a.max_blocks * a.block_size));
  DecodeWarpTiles w;
  w.start = split * a.chunk;
  w.n = max(0, min(len - w.start, a.chunk));
  w.first = warp * tile;
  w.stride = kDecodeWarps * tile;
  w.tiles = w.n > w.first ? (w.n - w.first + w.stride - 1) / w.stride : 0;
  return w;
}

// The end of a CTA of the streaming kernels: merge the warps' (m, l, acc) of `rows` query heads --
// s_ml[(w * 2 + 0 or 1) * rows + g] the max (base 2) and the sum, s_acc[at(w, g, d)] the unnormalized
// output -- into M = the largest max of the warps that saw a token (a nonzero sum: NaN counts, so it
// reaches the output), each rescaled to M; then write the
// normalized output (one split) or the split's partials (base e) for the combine kernel. After a
// __syncthreads that made every warp's values visible.
template <typename T, typename At>
__device__ __forceinline__ void decode_merge_warps(const DecodeArgs& a, const float* s_acc, At at, const float* s_ml,
                                                   int rows, int gcount, int b, int h, int G, int g0, int split) {
  const int D = a.D;
  const int64_t part = (int64_t(b) * a.Hq + int64_t(h) * G + g0) * a.splits + split;  // (b, head g0, split)
  for (int i = threadIdx.x; i < gcount * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w)
      if (s_ml[(w * 2 + 1) * rows + g] != 0.f) M = fmaxf(M, s_ml[(w * 2) * rows + g]);
    float L = 0.f, v = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w)
      if (s_ml[(w * 2 + 1) * rows + g] != 0.f) {
        const float e = exp2f(s_ml[(w * 2) * rows + g] - M);
        L += s_ml[(w * 2 + 1) * rows + g] * e;
        v += s_acc[at(w, g, d)] * e;
      }
    if (!a.v_dynamic) v *= a.v_scale[int64_t(h) * D + d];
    if (a.splits == 1) {
      T* o = static_cast<T*>(a.out);
      o[(int64_t(b) * a.Hq + int64_t(h) * G + g0 + g) * D + d] = from_float<T>(L != 0.f ? v / L : 0.f);
    } else {
      a.part_acc[(part + int64_t(g) * a.splits) * D + d] = v;
      if (d == 0) {
        a.part_ml[(part + int64_t(g) * a.splits) * 2] = M * kLn2;  // the combine kernel's base e
        a.part_ml[(part + int64_t(g) * a.splits) * 2 + 1] = L;
      }
    }
  }
}

// grid: (splits, Hkv * ceil(G / GT), B); block: kDecodeThreads; dynamic smem: decode_stream_smem_bytes(COLS).
template <typename T, int GT, int LPR, int COLS = decode_stream_cols(GT)>
__global__ void __launch_bounds__(kDecodeThreads) decode_stream_kernel(DecodeArgs a) {
  constexpr int D = COLS * LPR;                 // head dim
  constexpr int kStageBytes = stream_stage_bytes(COLS);
  constexpr int RPW = kWarp / LPR;              // rows one warp-wide copy covers (row groups)
  constexpr int U = kStreamRows;
  constexpr int TILE = RPW * U;                 // tokens per warp tile
  static_assert(TILE <= kWarp, "one lane looks up each row of a tile");
  PTQRT_DYNAMIC_SMEM(unsigned char, ring_all);
  __shared__ float s_acc[kDecodeWarps][GT][D];
  __shared__ float s_ml[kDecodeWarps][2][GT];

  const DecodeCta cta = decode_cta(a, GT);
  const int G = cta.G, split = cta.split, h = cta.h, g0 = cta.g0, b = cta.b, gcount = cta.count;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int grp = lane / LPR, c0 = (lane % LPR) * COLS;  // row group, first column
  unsigned char* ring = ring_all + size_t(warp) * kStreamStages * kStageBytes;

  const DecodeWarpTiles wt = decode_warp_tiles(a, b, split, warp, TILE);
  const int start = wt.start, n = wt.n, first = wt.first, stride = wt.stride, tiles = wt.tiles;

  // Copy tile i of this warp into ring stage i % kStreamStages (one cp.async group, possibly empty);
  // returns the lane's live-row bits (bit u: row u of its group holds a token of a readable block).
  // Dead rows copy row 0 (the cache is not empty: decode_stream_fits), which then gets no weight.
  auto issue = [&](int i) -> uint32_t {
    uint32_t live = 0;
    if (i < tiles) {
      const int t0 = first + i * stride;
      // Lane j looks up token t0 + j's cache row once; the row groups take theirs by shuffle.
      const int64_t mine = lane < TILE && t0 + lane < n ? kv_row(a, b, start + t0 + lane) : -1;
      unsigned char* st = ring + (i % kStreamStages) * kStageBytes;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int src = u * RPW + grp;
        const int64_t row = shfl_row(mine, src);
        if (row >= 0) live |= 1u << u;
        const int64_t th = (row >= 0 ? row : 0) * a.Hkv + h;  // token-head index
        const int slot = u * kWarp + lane;
        if constexpr (COLS == 16) {
          cp_async16(st + COLS * slot, a.k_cache + th * D + c0, true);
          cp_async16(st + COLS * (U * kWarp + slot), a.v_cache + th * D + c0, true);
        } else {
          cp_async8(st + COLS * slot, a.k_cache + th * D + c0);
          cp_async8(st + COLS * (U * kWarp + slot), a.v_cache + th * D + c0);
        }
        float* sc = reinterpret_cast<float*>(st + 2 * COLS * U * kWarp);
        if (a.k_dynamic) cp_async4(sc + slot, a.k_scale + th);
        if (a.v_dynamic) cp_async4(sc + U * kWarp + slot, a.v_scale + th);
      }
    }
    cp_async_commit();
    return live;
  };

  static_assert(kStreamStages == 3, "the live-bit rotation below holds three tiles");
  uint32_t live_cur = issue(0), live_next = issue(1);  // in flight while q is read

  // q' = q * sm_scale (* static k scale) for this lane's COLS columns; heads past gcount are zero.
  float qf[GT][COLS];
  const T* q = static_cast<const T*>(a.q) + (int64_t(b) * a.Hq + int64_t(h) * G + g0) * D;
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
      // log2(e) folded in: scores are in base 2 (exp2f: one MUFU.EX2), turned back at the end.
      float v = g < gcount ? to_float(q[g * D + c0 + i]) * (a.sm_scale * kLog2e) : 0.f;
      if (!a.k_dynamic) v *= a.k_scale[int64_t(h) * D + c0 + i];
      qf[g][i] = v;
    }

  float m[GT], l[GT], acc[GT][COLS];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < COLS; ++i) acc[g][i] = 0.f;
  }

  for (int i = 0; i < tiles; ++i) {
    cp_async_wait<1>();  // tile i has landed (tile i + 1 may still be in flight)
    const uint32_t live_new = issue(i + 2);  // into the stage tile i - 1 left
    const unsigned char* st = ring + (i % kStreamStages) * kStageBytes;
    const float* sc = reinterpret_cast<const float*>(st + 2 * COLS * U * kWarp);

    // Scores: partial dots over 16 columns, summed over the group's LPR lanes.
    float s[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[COLS];
      int8_slice_to_float<COLS>(st + COLS * (u * kWarp + lane), kf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float d = 0.f;
#pragma unroll
        for (int j = 0; j < COLS; ++j) d = fmaf(qf[g][j], kf[j], d);
        s[u][g] = d;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float ks = a.k_dynamic ? sc[u * kWarp + lane] : 1.f;
#pragma unroll
      for (int g = 0; g < GT; ++g) {
#pragma unroll
        for (int o = 1; o < LPR; o <<= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
        s[u][g] = (live_cur >> u) & 1u ? s[u][g] * ks : -INFINITY;
      }
    }

    // Online softmax: the warp's max over the tile (all groups), then rescale what came before.
    float p[U][GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mt = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mt = fmaxf(mt, s[u][g]);
#pragma unroll
      for (int o = LPR; o < kWarp; o <<= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
      const float mn = fmaxf(m[g], mt);
      float ps = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        p[u][g] = mn == -INFINITY ? nan_or_zero(s[u][g]) : exp2f(s[u][g] - mn);
        ps += p[u][g];
      }
#pragma unroll
      for (int o = LPR; o < kWarp; o <<= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
      if (mn > m[g]) {  // warp-uniform; once the max settles most tiles skip the rescale
        const float alpha = exp2f(m[g] - mn);  // 0 while m is still -inf
        l[g] *= alpha;
#pragma unroll
        for (int j = 0; j < COLS; ++j) acc[g][j] *= alpha;
        m[g] = mn;
      }
      l[g] += ps;
    }

    // P.V: each lane adds its rows' 16 columns (dynamic V scales ride on p; dead rows add 0 x V).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[COLS];
      int8_slice_to_float<COLS>(st + COLS * ((U + u) * kWarp + lane), vf);
      const float vs = !((live_cur >> u) & 1u) ? 0.f : a.v_dynamic ? sc[(U + u) * kWarp + lane] : 1.f;
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float pv = p[u][g] * vs;
#pragma unroll
        for (int j = 0; j < COLS; ++j) acc[g][j] = fmaf(pv, vf[j], acc[g][j]);
      }
    }
    live_cur = live_next;
    live_next = live_new;
  }
  cp_async_wait<0>();  // nothing may land after the CTA exits

  // The row groups of a warp hold the same columns for different rows: add them up.
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int j = 0; j < COLS; ++j)
#pragma unroll
      for (int o = LPR; o < kWarp; o <<= 1) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
  if (grp == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int j = 0; j < COLS; ++j) s_acc[warp][g][c0 + j] = acc[g][j];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      s_ml[warp][0][g] = m[g];
      s_ml[warp][1][g] = l[g];
    }
  }
  __syncthreads();

  auto at = [](int w, int g, int d) { return (w * GT + g) * D + d; };
  decode_merge_warps<T>(a, &s_acc[0][0][0], at, &s_ml[0][0][0], GT, gcount, b, h, G, g0, split);
}

}  // namespace cuda
}  // namespace ptqrt
