// kv_cache_append: quantize new keys / values into the paged int8 cache, in place.
//
//   dynamic (scale [num_blocks, block_size, H]):  s = absmax_d(x[t, h, :]) / 127 (1 if 0), written
//   static  (scale [H, D]):                       s = scale[h, d], read
//   cache[slot, h, d] = rne(x[t, h, d] / s), clamped to [-127, 127], NaN -> 0
//
// One warp per (token, head) row of D values, or one CTA per token (the token kernel); grid.y picks k or v. A negative slot is padding; a slot
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

// One CTA per token (grid.x = T), all H heads of it, like the Triton kernel: VEC = 16 / sizeof(T)
// values a lane (one 16-byte load; 8 or 4 bytes stored), LPR = D / VEC lanes a row, 128 / LPR rows a
// pass, up to kTokenPasses passes' loads issued before any is used. One slot lookup a CTA and no
// index division. The row's absmax is a max over the bits of |x| (for non-negative floats their
// order as integers, and NaN's bits sit above infinity's, so a NaN still makes the scale NaN), over
// log2(LPR) shuffles. An earlier kernel with 4 values a lane spent an SM's issue slots on per-row
// overhead (a 64-bit division a warp, 5 shuffles of a float max for 4 values a lane; Nsight Compute
// on an H100: 77% SM throughput at 43% of DRAM bandwidth; on an H200 65.7 us at 4096 tokens of
// 32 x 128 against this kernel's 42.7; removed). Same arithmetic per value: bit-identical.
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
        const ScaleDivider div(sc, a.recip);
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
