// int8_kv_decode_attention on tensor cores (mma.sync m16n8k16, fp32 accumulation) for fp16 / bf16
// queries, D in {64, 128}, dynamic K and V scales and 16-byte aligned caches: up to 16 query heads of
// one kv head a CTA, as the 16 rows of the A operand (a group of 1 fills one row; the rest are zeros).
// Opt-in (PTQRT_CUDA_DECODE_MMA=1) until measured on a GPU. Same grid, split-KV partials and combine
// kernel as decode_stream.cuh, whose structure it follows: each warp streams its own 16-token tiles of
// K, V and their scales through a 3-stage cp.async ring and keeps its own online softmax; the warps
// meet in shared memory at the end (decode_merge_warps).
//
// Why. The streaming kernel converts and multiplies every K and V value on the CUDA cores, 4 query
// heads at most, ~6.7 instructions a byte: on an H100 it issued from 42% of its slots at 65% of DRAM
// bandwidth (Nsight Compute), and on an H200 it fell behind Triton. Here a tile costs 2 x D/16 MMAs for
// S = Q K^T and D/8 for O += P V whatever the group size, and a value's int8 -> half conversion
// 1.25 instructions (bf16: through floats).
//
// Both contraction orders are free, so each thread's operand bytes are contiguous in a row:
//   * S: thread (g, t) = (lane / 4, lane % 4) supplies K rows g and g + 8 (tokens) at bytes
//     [D/4 t, D/4 (t + 1)); k-step s takes their bytes 4s..4s+3 as the fragment's k = 2t, 2t+1, 2t+8,
//     2t+9; Q's A fragments (rows = query heads) are loaded once in the same order.
//   * O: column c of output n-tile j is head dim D/8 c + j, so thread (g, t) reads V rows (tokens) 2t,
//     2t+1, 2t+8, 2t+9 at bytes [D/8 g, D/8 (g + 1)) and pairs them byte by byte (PRMT).
//   * P: the S accumulators of the two n-tiles are, in registers, the A fragment of P V (times each
//     token's V scale, rounded to T as Triton's dot path rounds P).
// The ring's rows are 16-byte chunks, chunk c of row r stored at c ^ (r % chunks): the 8 threads of
// a quarter warp read different banks (at D = 64 the 8-byte V reads of rows r and r + 4 still share
// banks: 2-way). P x V scale in fp16 turns subnormal below ~6e-5 (bf16 does not). Lanes read bytes other lanes copied, so every stage is fenced
// by __syncwarp after its cp.async wait (and before it is refilled).
#pragma once

#include "../launch.h"
#include "decode_attention.cuh"
#include "decode_stream.cuh"
#include "dequant.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kMmaStages = 3;  // tiles per warp in the ring: one computed, two in flight
constexpr int kMmaTile = 16;   // tokens a warp tile
constexpr int kMmaRows = 16;   // query heads a CTA (the A operand's rows)
// The factor P V carries in fp16 (see the A fragment below), and its inverse; 1 in bf16 (its exponent
// range has no subnormal problem).
template <typename T> constexpr float kPvScale = 1.f;
template <> constexpr float kPvScale<__half> = 64.f;
template <typename T> constexpr float kPvUnscale = 1.f / kPvScale<T>;

// Ring bytes a warp and stage: K rows, V rows [kMmaTile][D], then k and v scales [kMmaTile] each.
__host__ __device__ constexpr int decode_mma_stage_bytes(int d) { return kMmaTile * (2 * d + 8); }
// Dynamic shared memory: the ring, which holds the warps' partial outputs at the end.
__host__ __device__ constexpr size_t decode_mma_smem_bytes(int d) {
  return size_t(kDecodeWarps) * kMmaStages * decode_mma_stage_bytes(d);
}
__host__ __device__ constexpr size_t decode_mma_merge_bytes(int d) {
  return sizeof(float) * size_t(kDecodeWarps) * kMmaRows * (d + 2);
}
static_assert(decode_mma_merge_bytes(64) <= decode_mma_smem_bytes(64) &&
                  decode_mma_merge_bytes(128) <= decode_mma_smem_bytes(128),
              "the warps' partial outputs fit in the ring");

// Whether the MMA kernel serves these arguments: a.mma (the switch, and q's dtype fp16 / bf16: the host's
// part), 16-byte aligned caches, dynamic scales, D of 64 or 128, a non-empty cache (dead tokens copy row
// 0), q 4-byte aligned (read in pairs). The one statement of the rule: the host's split count asks it too
// (decode_cta_rows).
__host__ __device__ inline bool decode_mma_fits(const DecodeArgs& a) {
  return a.mma && a.vec && a.k_dynamic && a.v_dynamic && (a.D == 64 || a.D == 128) && a.num_blocks > 0 &&
         a.block_size > 0 && reinterpret_cast<uintptr_t>(a.q) % 4 == 0;
}

// grid: (splits, Hkv * ceil(G / 16), B); block: kDecodeThreads; dynamic smem: decode_mma_smem_bytes(D).
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_mma_kernel(DecodeArgs a) {
  constexpr int C = D / 16;       // 16-byte chunks a row
  constexpr int STEPS = D / 16;   // k-steps of S = Q K^T
  constexpr int NT = D / 8;       // n-tiles of O = P V
  constexpr int KB = D / 4;       // bytes of a K row a thread reads (its k run)
  constexpr int VB = D / 8;       // bytes of a V row a thread reads (its output columns)
  constexpr int kStage = decode_mma_stage_bytes(D);
  constexpr unsigned kFull = 0xffffffffu;
  static_assert(KB % 16 == 0 && (VB == 16 || VB == 8), "D = 64 or 128");
  PTQRT_DYNAMIC_SMEM(unsigned char, smem);

  const DecodeCta cta = decode_cta(a, kMmaRows);
  const int G = cta.G, split = cta.split, h = cta.h, g0 = cta.g0, b = cta.b, gcount = cta.count;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  unsigned char* ring = smem + size_t(warp) * kMmaStages * kStage;

  const DecodeWarpTiles wt = decode_warp_tiles(a, b, split, warp, kMmaTile);
  const int start = wt.start, n = wt.n, first = wt.first, stride = wt.stride, tiles = wt.tiles;

  // Copy tile i of this warp into stage i % kMmaStages (one cp.async group, possibly empty); returns its
  // live-token bits (warp-uniform). Dead tokens copy row 0 (the cache is not empty) and get no weight.
  auto issue = [&](int i) -> uint32_t {
    uint32_t live = 0;
    if (i < tiles) {
      const int t0 = first + i * stride;
      const int64_t mine = lane < kMmaTile && t0 + lane < n ? kv_row(a, b, start + t0 + lane) : -1;
      live = __ballot_sync(kFull, lane < kMmaTile && mine >= 0) & 0xffffu;
      unsigned char* st = ring + (i % kMmaStages) * kStage;
      auto row_of = [&](int r) {  // token r's token-head index (row 0 for a dead token), from lane r
        const int64_t row = shfl_row(mine, r);
        return (row >= 0 ? row : 0) * a.Hkv + h;
      };
#pragma unroll
      for (int u = 0; u < kMmaTile * C / kWarp; ++u) {
        const int q = lane + kWarp * u, r = q / C, c = q % C;
        const int64_t th = row_of(r);
        const int at = r * D + ((c ^ (r % C)) * 16);
        cp_async16(st + at, a.k_cache + th * D + c * 16, true);
        cp_async16(st + kMmaTile * D + at, a.v_cache + th * D + c * 16, true);
      }
      const int64_t th = row_of(lane % kMmaTile);  // lane j < 16: token j's k scale; lane 16 + j: its v scale
      float* sc = reinterpret_cast<float*>(st + 2 * kMmaTile * D);
      cp_async4(sc + lane, (lane < kMmaTile ? a.k_scale : a.v_scale) + th);
    }
    cp_async_commit();
    return live;
  };

  static_assert(kMmaStages == 3, "the live-bit rotation below holds three tiles");
  uint32_t live_cur = issue(0), live_next = issue(1);  // in flight while q is read

  // Q's A fragments, k-step s: rows g and g + 8 (heads g0 + g, g0 + g + 8; zeros past gcount) at dims
  // KB t + 4s + {0, 1} (registers 0, 1) and KB t + 4s + {2, 3} (registers 2, 3).
  uint32_t qa[STEPS][4];
  const T* q = static_cast<const T*>(a.q) + (int64_t(b) * a.Hq + int64_t(h) * G + g0) * D;
#pragma unroll
  for (int s = 0; s < STEPS; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), d0 = KB * t + 4 * s + 2 * (i >> 1);
      qa[s][i] = row < gcount ? *reinterpret_cast<const uint32_t*>(q + row * D + d0) : 0u;
    }
  const float qk = a.sm_scale * kLog2e;  // scores in base 2 (exp2f), turned back at the end

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.f;

  for (int i = 0; i < tiles; ++i) {
    cp_async_wait<1>();  // this lane's copies of tile i have landed (tile i + 1 may still be in flight)
    __syncwarp();        // ... and every lane's; every lane is done with the stage issue() refills
    const uint32_t live_new = issue(i + 2);
    const unsigned char* st = ring + (i % kMmaStages) * kStage;
    const float* sc = reinterpret_cast<const float*>(st + 2 * kMmaTile * D);

    // S = Q K^T for tokens g (n-tile 0) and g + 8 (n-tile 1).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int r = g + 8 * nt;
      uint32_t kw[KB / 4];
#pragma unroll
      for (int cc = 0; cc < KB / 16; ++cc) {
        const int chunk = KB * t / 16 + cc;
        const uint4 v = *reinterpret_cast<const uint4*>(st + r * D + ((chunk ^ (r % C)) * 16));
        kw[4 * cc] = v.x, kw[4 * cc + 1] = v.y, kw[4 * cc + 2] = v.z, kw[4 * cc + 3] = v.w;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
      for (int k = 0; k < STEPS; ++k) {
        uint32_t b0, b1;
        int8x4_to_pairs<T>(kw[k], b0, b1);
        mma_16816<T>(s[nt], qa[k], b0, b1);
      }
    }

    // Online softmax per row (query head): s[nt][e] is row g + 8 (e >> 1), token 8 nt + 2t + (e & 1).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = 8 * nt + 2 * t + (e & 1);
        s[nt][e] = (live_cur >> tok) & 1u ? s[nt][e] * sc[tok] * qk : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    float mn[2], ps[2] = {0.f, 0.f};
    bool grew = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));  // the quad holds the row's 16 tokens
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
      mn[r] = fmaxf(m[r], mx[r]);
      grew = grew || mn[r] > m[r];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mr = mn[e >> 1];
        s[nt][e] = mr == -INFINITY ? nan_or_zero(s[nt][e]) : exp2f(s[nt][e] - mr);  // now p
        ps[e >> 1] += s[nt][e];
      }
    if (__ballot_sync(kFull, grew)) {  // once the maxima settle most tiles skip the rescale
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float alpha = mn[r] > m[r] ? exp2f(m[r] - mn[r]) : 1.f;  // 0 while m is still -inf
        l[r] *= alpha;
#pragma unroll
        for (int j = 0; j < NT; ++j) o[j][2 * r] *= alpha, o[j][2 * r + 1] *= alpha;
        m[r] = mn[r];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      ps[r] += __shfl_xor_sync(kFull, ps[r], 1);
      ps[r] += __shfl_xor_sync(kFull, ps[r], 2);
      l[r] += ps[r];
    }

    // P (times each token's V scale; 0 for dead tokens) as the A fragment of O += P V. In fp16 the
    // products also carry kPvScale (64), which lifts p * scale out of fp16's subnormals when V is small
    // (|V| ~ 1e-3: scales ~ 1e-5) and cannot overflow for V that fp16 holds (scale <= 516); O is scaled
    // back once at the end (powers of two: exact).
    auto vscale = [&](int tok) { return (live_cur >> tok) & 1u ? sc[kMmaTile + tok] * kPvScale<T> : 0.f; };
    const float v0 = vscale(2 * t), v1 = vscale(2 * t + 1), v8 = vscale(2 * t + 8), v9 = vscale(2 * t + 9);
    const uint32_t pa[4] = {pack_pair<T>(s[0][0] * v0, s[0][1] * v1), pack_pair<T>(s[0][2] * v0, s[0][3] * v1),
                            pack_pair<T>(s[1][0] * v8, s[1][1] * v9), pack_pair<T>(s[1][2] * v8, s[1][3] * v9)};

    // V rows 2t, 2t+1, 2t+8, 2t+9 at bytes [VB g, VB (g + 1)): byte j is head dim VB c + j of n-tile j.
    uint32_t vw[4][VB / 4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int r = 2 * t + (k & 1) + 8 * (k >> 1);
      const unsigned char* row = st + kMmaTile * D + r * D;
      const int chunk = VB * g / 16, within = VB * g % 16;
      const unsigned char* p = row + ((chunk ^ (r % C)) * 16) + within;
      if constexpr (VB == 16) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        vw[k][0] = v.x, vw[k][1] = v.y, vw[k][2] = v.z, vw[k][3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        vw[k][0] = v.x, vw[k][1] = v.y;
      }
    }
#pragma unroll
    for (int w = 0; w < VB / 4; ++w) {
      uint32_t b0[4], b1[4];  // tokens (2t, 2t+1) and (2t+8, 2t+9) of head dims VB c + 4w + 0..3
      int8x4_to_pairs<T>(__byte_perm(vw[0][w], vw[1][w], 0x5140), b0[0], b0[1]);
      int8x4_to_pairs<T>(__byte_perm(vw[0][w], vw[1][w], 0x7362), b0[2], b0[3]);
      int8x4_to_pairs<T>(__byte_perm(vw[2][w], vw[3][w], 0x5140), b1[0], b1[1]);
      int8x4_to_pairs<T>(__byte_perm(vw[2][w], vw[3][w], 0x7362), b1[2], b1[3]);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) mma_16816<T>(o[4 * w + jj], pa, b0[jj], b1[jj]);
    }
    live_cur = live_next;
    live_next = live_new;
  }
  cp_async_wait<0>();  // nothing may land after the ring is reused
  __syncthreads();     // every warp is done with the ring: it holds the partial outputs now

  // s_acc [warps][16][D]: a thread's VB values of one (row, column) are contiguous dims, stored as
  // float4s; the float4 index f of row r is XORed with (the thread's t, r's low bit), kept in f's bits
  // above the 8-float4 group, so the 8 threads of a quarter warp write 8 bank groups (plain, all 32
  // lanes of a store hit one bank) and the merge's reads of consecutive dims stay conflict-free.
  float* s_acc = reinterpret_cast<float*>(smem);
  float* s_ml = s_acc + kDecodeWarps * kMmaRows * D;  // [warps][2][16]
  constexpr int KEYB = VB / 4;                        // float4s a thread writes a (row, column): 4 or 2
  auto at = [](int w, int r, int d) {
    const int f = d >> 2, key = ((f >> 3) & (KEYB - 1)) | ((r & 1) * KEYB);
    return (w * kMmaRows + r) * D + ((f ^ key) << 2) + (d & 3);
  };
#pragma unroll
  for (int e = 0; e < 4; ++e)
#pragma unroll
    for (int c = 0; c < KEYB; ++c) {
      const int row = g + 8 * (e >> 1), dim = VB * (2 * t + (e & 1)) + 4 * c;
      *reinterpret_cast<float4*>(s_acc + at(warp, row, dim)) =
          make_float4(o[4 * c][e] * kPvUnscale<T>, o[4 * c + 1][e] * kPvUnscale<T>, o[4 * c + 2][e] * kPvUnscale<T>,
                      o[4 * c + 3][e] * kPvUnscale<T>);
    }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s_ml[(warp * 2) * kMmaRows + g + 8 * r] = m[r];
      s_ml[(warp * 2 + 1) * kMmaRows + g + 8 * r] = l[r];
    }
  }
  __syncthreads();
  decode_merge_warps<T>(a, s_acc, at, s_ml, kMmaRows, gcount, b, h, G, g0, split);
}

}  // namespace cuda
}  // namespace ptqrt
