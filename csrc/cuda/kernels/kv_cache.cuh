// kv_cache_append: quantize new keys / values into the paged int8 cache, in place.
//
//   dynamic (scale [num_blocks, block_size, H]):  s = absmax_d(x[t, h, :]) / 127 (1 if 0), written
//   static  (scale [H, D]):                       s = scale[h, d], read
//   cache[slot, h, d] = rne(x[t, h, d] / s), clamped to [-127, 127], NaN -> 0
//
// One warp per (token, head) row of D values (the 4-wide kernel: 4 / chunks rows a warp); grid.y picks k or v. A negative slot is padding; a slot
// at or past num_blocks * block_size would write outside the cache and is skipped as well.
#pragma once

#include "../launch.h"
#include "common.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kAppendWarps = 4;

// The (token, head) row this warp appends: its index in the source, its head, and its row in the cache
// (slot * H + head); false past the last row or for a skipped slot (negative, or past the cache).
struct AppendRow {
  int64_t unit, row;
  int h;
};
// Token t's cache slot, and whether a slot is written (negative: padding; past the cache: skipped).
__device__ __forceinline__ int64_t append_slot(const KvAppendArgs& a, int t) {
  return a.slots_i64 ? static_cast<const int64_t*>(a.slots)[t] : static_cast<const int32_t*>(a.slots)[t];
}
__device__ __forceinline__ bool slot_kept(const KvAppendArgs& a, int64_t slot) { return slot >= 0 && slot < a.num_slots; }
__device__ __forceinline__ bool append_row(const KvAppendArgs& a, AppendRow& r) {
  r.unit = int64_t(blockIdx.x) * kAppendWarps + threadIdx.x / kWarp;
  if (r.unit >= int64_t(a.T) * a.H) return false;
  const int t = static_cast<int>(r.unit / a.H);
  r.h = static_cast<int>(r.unit % a.H);
  const int64_t slot = append_slot(a, t);
  if (!slot_kept(a, slot)) return false;
  r.row = slot * a.H + r.h;
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kAppendWarps * kWarp) kv_cache_append_kernel(KvAppendArgs a) {
  const KvStream s = blockIdx.y == 0 ? a.kv[0] : a.kv[1];  // no dynamic index into the parameter space
  const int lane = threadIdx.x % kWarp;
  AppendRow r;
  if (!append_row(a, r)) return;
  const T* src = static_cast<const T*>(s.src) + r.unit * a.D;
  int8_t* dst = s.cache + r.row * a.D;
  if (s.dynamic) {
    float amax = 0.f;
    for (int d = lane; d < a.D; d += kWarp) amax = nan_max(amax, fabsf(to_float(src[d])));
    const float sc = absmax_scale(warp_nan_max(amax));
    if (lane == 0) s.scale[r.row] = sc;
    for (int d = lane; d < a.D; d += kWarp) dst[d] = round_clamp_int8(to_float(src[d]) / sc);
  } else {
    const float* sc = s.scale + int64_t(r.h) * a.D;
    for (int d = lane; d < a.D; d += kWarp) dst[d] = round_clamp_int8(to_float(src[d]) / sc[d]);
  }
}

// The same, 4 consecutive values a lane (one 8- or 16-byte load, one 4-byte store, the row kept in
// registers between the absmax and the quantization: x is read once), for D % 4 == 0 and
// D <= 128 * CHUNKS, with src, the cache and a static scale aligned to 4 values; each warp appends
// ROWS = 4 / CHUNKS consecutive (token, head) rows. Every source load and slot lookup of the warp's
// rows is issued before any is used (a row past the end loads row 0 instead, a lane past D its own
// row's first values; neither is used): the data loads do not wait for the slot, nor each other.
// The kernel above reads each row twice with 2-byte loads and writes single bytes: on an H100 it ran
// 94 us at 4096 tokens of 32 x 128 (fp16 k and v), against Triton's 45 and a 34 us floor. Same
// arithmetic per value: bit-identical. Opt-in (PTQRT_CUDA_APPEND_VEC=1) until measured.
template <int CHUNKS>
constexpr int append_vec4_rows() {
  return 4 / CHUNKS;
}

template <typename T, int CHUNKS>
__global__ void __launch_bounds__(kAppendWarps * kWarp) kv_cache_append_vec4_kernel(KvAppendArgs a) {
  struct alignas(4 * sizeof(T)) Src4 {
    T v[4];
  };
  struct alignas(4) Q4 {
    int8_t q[4];
  };
  struct alignas(16) Scale4 {
    float s[4];
  };
  constexpr int ROWS = append_vec4_rows<CHUNKS>();
  static_assert(ROWS * CHUNKS == 4, "1, 2 or 4 chunks a lane");
  const KvStream s = blockIdx.y == 0 ? a.kv[0] : a.kv[1];
  const int lane = threadIdx.x % kWarp;
  const int64_t units = int64_t(a.T) * a.H;
  const int64_t unit0 = (int64_t(blockIdx.x) * kAppendWarps + threadIdx.x / kWarp) * ROWS;
  if (unit0 >= units) return;  // warp-uniform

  // Row i is (token t[i], head h[i]); one division for the warp (a 64-bit one is a branchy call).
  int t[ROWS], h[ROWS];
  t[0] = static_cast<int>(unit0 / a.H);
  h[0] = static_cast<int>(unit0 - int64_t(t[0]) * a.H);
#pragma unroll
  for (int i = 1; i < ROWS; ++i) {
    const bool wrap = h[i - 1] + 1 == a.H;
    h[i] = wrap ? 0 : h[i - 1] + 1;
    t[i] = wrap ? t[i - 1] + 1 : t[i - 1];
  }
  Src4 raw[ROWS][CHUNKS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t unit = unit0 + i < units ? unit0 + i : 0;
    const T* src = static_cast<const T*>(s.src) + unit * a.D;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int d = (c * kWarp + lane) * 4;
      raw[i][c] = *reinterpret_cast<const Src4*>(src + (d < a.D ? d : 0));
    }
  }
  int64_t slot[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) slot[i] = append_slot(a, t[i] < a.T ? t[i] : 0);

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    // Past the last row, or a skipped slot (negative: padding; past the cache): nothing to write.
    if (unit0 + i >= units || !slot_kept(a, slot[i])) continue;  // warp-uniform
    const int64_t row = slot[i] * a.H + h[i];
    int8_t* dst = s.cache + row * a.D;
    float v[CHUNKS][4];
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const bool in = (c * kWarp + lane) * 4 < a.D;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[c][j] = to_float(raw[i][c].v[j]);
        if (in) amax = nan_max(amax, fabsf(v[c][j]));
      }
    }
    float sc = 1.f;
    if (s.dynamic) {
      sc = absmax_scale(warp_nan_max(amax));
      if (lane == 0) s.scale[row] = sc;
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int d = (c * kWarp + lane) * 4;
      if (d < a.D) {
        Q4 q;
        if (s.dynamic) {
#pragma unroll
          for (int j = 0; j < 4; ++j) q.q[j] = round_clamp_int8(v[c][j] / sc);
        } else {
          const Scale4 st = *reinterpret_cast<const Scale4*>(s.scale + int64_t(h[i]) * a.D + d);
#pragma unroll
          for (int j = 0; j < 4; ++j) q.q[j] = round_clamp_int8(v[c][j] / st.s[j]);
        }
        *reinterpret_cast<Q4*>(dst + d) = q;
      }
    }
  }
}

// One CTA per token (grid.x = T), all H heads of it, like the Triton kernel: VEC = 16 / sizeof(T)
// values a lane (one 16-byte load; 8 or 4 bytes stored), LPR = D / VEC lanes a row, 128 / LPR rows a
// pass, up to kTokenPasses passes' loads issued before any is used. One slot lookup a CTA and no
// index division. The row's absmax is a max over the bits of |x| (for non-negative floats their
// order as integers, and NaN's bits sit above infinity's, so a NaN still makes the scale NaN), over
// log2(LPR) shuffles. The vec4 kernel above spent an SM's issue slots on per-row overhead (a 64-bit
// division a warp, 5 shuffles of a float max for 4 values a lane; Nsight Compute on an H100: 77% SM
// throughput at 43% of DRAM bandwidth). Same arithmetic per value: bit-identical.
// Applies where LPR divides 32 (D = VEC * 2^i <= 32 VEC), with src, the cache (VEC bytes) and a
// static scale (16 bytes) aligned.
constexpr int kTokenThreads = 128, kTokenPasses = 4;

template <typename T>
__host__ __device__ constexpr int append_token_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int LPR>
__global__ void __launch_bounds__(kTokenThreads) kv_cache_append_token_kernel(KvAppendArgs a) {
  constexpr int VEC = append_token_vec<T>(), ROWS = kTokenThreads / LPR;  // ROWS: rows a pass
  static_assert(LPR >= 1 && LPR <= kWarp && kWarp % LPR == 0, "a row's lanes inside one warp");
  struct alignas(16) Src {
    T v[VEC];
  };
  struct alignas(VEC) Q {
    int8_t q[VEC];
  };
  const KvStream s = blockIdx.y == 0 ? a.kv[0] : a.kv[1];
  const int t = blockIdx.x;
  const int64_t slot = append_slot(a, t);
  if (!slot_kept(a, slot)) return;  // CTA-uniform
  const int sub = threadIdx.x % LPR, d = sub * VEC, r = threadIdx.x / LPR;
  const T* src = static_cast<const T*>(s.src) + int64_t(t) * a.H * a.D;
  int8_t* dst = s.cache + slot * a.H * a.D;

  // Every thread runs the same passes (the shuffles need whole warps); rows past H load row 0.
  for (int h0 = 0; h0 < a.H; h0 += kTokenPasses * ROWS) {
    Src raw[kTokenPasses];
#pragma unroll
    for (int p = 0; p < kTokenPasses; ++p) {
      const int h = h0 + p * ROWS + r;
      raw[p] = *reinterpret_cast<const Src*>(src + int64_t(h < a.H ? h : 0) * a.D + d);
    }
#pragma unroll
    for (int p = 0; p < kTokenPasses; ++p) {
      const int h = h0 + p * ROWS + r;
      float v[VEC];
      uint32_t bits = 0;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[j] = to_float(raw[p].v[j]);
        bits = max(bits, __float_as_uint(v[j]) & 0x7fffffffu);
      }
#pragma unroll
      for (int o = LPR / 2; o > 0; o >>= 1) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, o));
      if (h >= a.H) continue;
      const int64_t row = slot * a.H + h;
      Q q;
      if (s.dynamic) {
        const float sc = absmax_scale(__uint_as_float(bits));
        if (sub == 0) s.scale[row] = sc;
        const ScaleDivider div(sc);
        div(v, q.q);
      } else {
        const float4* st = reinterpret_cast<const float4*>(s.scale + int64_t(h) * a.D + d);
#pragma unroll
        for (int c = 0; c < VEC / 4; ++c) {
          const float4 f = st[c];
          q.q[4 * c + 0] = round_clamp_int8(v[4 * c + 0] / f.x);
          q.q[4 * c + 1] = round_clamp_int8(v[4 * c + 1] / f.y);
          q.q[4 * c + 2] = round_clamp_int8(v[4 * c + 2] / f.z);
          q.q[4 * c + 3] = round_clamp_int8(v[4 * c + 3] / f.w);
        }
      }
      *reinterpret_cast<Q*>(dst + int64_t(h) * a.D + d) = q;
    }
  }
}

}  // namespace cuda
}  // namespace ptqrt
