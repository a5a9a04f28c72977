// int8_kv_decode_attention: one query token per sequence against a paged int8 KV cache, split-KV
// (flash-decoding) with GQA.
//
//   k[j, d] = k_q[j, d] * ks,  v[j, d] = v_q[j, d] * vs   (ks, vs per token-head, or per channel [Hkv, D])
//   s_j = (q . k_j) * sm_scale;   out = sum_j softmax(s)_j v_j        (fp32; length 0 gives zeros)
//
// CTA (split z, kv head h, group chunk, sequence b) handles the GT query heads h*G + g0 .. of one kv
// head, so each K/V row is read once for all of them, over the token range [z*chunk, (z+1)*chunk).
//   A. scores: one thread per token; the thread reads its K row with 16-byte loads and forms GT dot
//      products against q' = q * sm_scale (* the static per-channel k scale) held in shared memory.
//      It also leaves the token's cache row and dynamic V scale in shared memory for C.
//   B. softmax statistics of the chunk: one warp per head; scores become exp(s - max).
//   C. P.V: lanes split D in 8-byte slices (several token rows per warp when D < 256), warps split the
//      tokens, each lane with kDecodeUnroll rows' loads in flight; shared memory adds the warps' sums.
// With one split the CTA writes out = acc / l; otherwise it writes (acc, max, l) and
// decode_combine_kernel merges the splits (rescaling each by exp(max_z - max)).
#pragma once

#include "../launch.h"
#include "dequant.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * kWarp;
constexpr int kDecodeDSlice = 256;  // columns of V one P.V pass covers (32 lanes x 8)

constexpr int kDecodeUnroll = 4;     // V rows in flight per lane in P.V

// Float part of the shared memory, then (16-byte aligned) the int64 cache rows of the chunk's tokens.
__host__ __device__ inline size_t decode_smem_floats(int gt, int d, int chunk) {
  const int dslice = d < kDecodeDSlice ? d : kDecodeDSlice;
  const size_t c = chunk > 0 ? chunk : 1;
  const size_t n = size_t(gt) * d          // q' (first: float4 reads need 16-byte alignment)
                   + size_t(gt) * c        // scores / probabilities
                   + c                     // dynamic V scale of each token
                   + size_t(kDecodeWarps) * gt * dslice  // P.V partial sums per warp
                   + 2 * size_t(gt);       // max, sum of exp
  return (n + 3) / 4 * 4;
}
__host__ __device__ inline size_t decode_smem_bytes(int gt, int d, int chunk) {
  return sizeof(float) * decode_smem_floats(gt, d, chunk) + sizeof(int64_t) * size_t(chunk > 0 ? chunk : 1);
}

// Cache row of token j of sequence b for kv head h, or -1 when the block id is out of range.
__device__ __forceinline__ int64_t kv_row(const DecodeArgs& a, int b, int j) {
  const int blk = a.block_table[int64_t(b) * a.max_blocks + j / a.block_size];
  if (blk < 0 || blk >= a.num_blocks) return -1;
  return int64_t(blk) * a.block_size + j % a.block_size;  // index into [num_blocks * block_size]
}

// Lane src's 64-bit cache row (kv_row), to every lane (a full-warp shuffle: all 32 lanes call it).
__device__ __forceinline__ int64_t shfl_row(int64_t row, int src) {
  const int lo = __shfl_sync(0xffffffffu, static_cast<int>(row & 0xffffffff), src);
  const int hi = __shfl_sync(0xffffffffu, static_cast<int>(row >> 32), src);
  return static_cast<int64_t>((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}

// A decode CTA's place in its grid (splits, Hkv * ceil(G / rows), B): its split, kv head h, batch
// row b, and the `count` query heads g0 .. g0 + count - 1 of the group it serves (rows at most).
struct DecodeCta {
  int G, split, h, g0, b, count;
};
__device__ __forceinline__ DecodeCta decode_cta(const DecodeArgs& a, int rows) {
  DecodeCta c;
  c.G = a.Hq / a.Hkv;
  const int gchunks = (c.G + rows - 1) / rows;
  c.split = blockIdx.x;
  c.h = blockIdx.y / gchunks;
  c.g0 = (blockIdx.y % gchunks) * rows;
  c.b = blockIdx.z;
  c.count = min(rows, c.G - c.g0);
  return c;
}

// grid: (splits, Hkv * ceil(G / GT), B); block: kDecodeThreads; dynamic smem: decode_smem_bytes(GT, D, chunk).
template <typename T, int GT>
__global__ void __launch_bounds__(kDecodeThreads) decode_attention_kernel(DecodeArgs a) {
  PTQRT_DYNAMIC_SMEM(float, dsmem);
  const int D = a.D;
  const DecodeCta cta = decode_cta(a, GT);
  const int G = cta.G, split = cta.split, h = cta.h, g0 = cta.g0, b = cta.b, gcount = cta.count;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int dslice = min(D, kDecodeDSlice);

  const int chunk_alloc = a.chunk > 0 ? a.chunk : 1;
  float* qs = dsmem;                              // [GT][D]
  float* S = qs + GT * D;                         // [GT][chunk]
  float* vsc = S + GT * chunk_alloc;              // [chunk]
  float* red = vsc + chunk_alloc;                 // [warps][GT][dslice]
  float* stat = red + kDecodeWarps * GT * dslice; // [2][GT]
  int64_t* rows = reinterpret_cast<int64_t*>(dsmem + decode_smem_floats(GT, D, a.chunk));  // [chunk], -1: unreadable

  int len = a.seq_lens[b];
  len = max(0, min(len, a.max_blocks * a.block_size));
  const int start = split * a.chunk;
  const int n = max(0, min(len - start, a.chunk));  // tokens of this CTA

  // q' = q * sm_scale (* static k scale), heads past gcount are zero.
  const T* q = static_cast<const T*>(a.q) + (int64_t(b) * a.Hq + int64_t(h) * G + g0) * D;
  for (int i = threadIdx.x; i < GT * D; i += kDecodeThreads) {
    const int g = i / D, d = i % D;
    float v = g < gcount ? to_float(q[int64_t(g) * D + d]) * a.sm_scale : 0.f;
    if (!a.k_dynamic) v *= a.k_scale[int64_t(h) * D + d];
    qs[i] = v;
  }
  __syncthreads();

  // A. scores
  const bool vec16 = a.vec && (D % 16) == 0;
  for (int r = threadIdx.x; r < n; r += kDecodeThreads) {
    const int64_t row = kv_row(a, b, start + r);
    rows[r] = row;  // phase C reads it back instead of walking the block table again
    vsc[r] = (row >= 0 && a.v_dynamic) ? a.v_scale[row * a.Hkv + h] : 1.f;
    float s[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) s[g] = 0.f;
    if (row >= 0) {
      const int8_t* kp = a.k_cache + (row * a.Hkv + h) * D;
      if (vec16) {
        for (int d0 = 0; d0 < D; d0 += 16) {
          const uint4 raw = *reinterpret_cast<const uint4*>(kp + d0);
          const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float kf[4];
            int8x4_to_float(words[j], kf);
#pragma unroll
            for (int g = 0; g < GT; ++g) {
              const float4 qv = *reinterpret_cast<const float4*>(qs + g * D + d0 + 4 * j);
              s[g] = fmaf(qv.x, kf[0], s[g]);
              s[g] = fmaf(qv.y, kf[1], s[g]);
              s[g] = fmaf(qv.z, kf[2], s[g]);
              s[g] = fmaf(qv.w, kf[3], s[g]);
            }
          }
        }
      } else {
        for (int d = 0; d < D; ++d) {
          const float kf = float(kp[d]);
#pragma unroll
          for (int g = 0; g < GT; ++g) s[g] = fmaf(qs[g * D + d], kf, s[g]);
        }
      }
      const float ks = a.k_dynamic ? a.k_scale[row * a.Hkv + h] : 1.f;
#pragma unroll
      for (int g = 0; g < GT; ++g) S[g * chunk_alloc + r] = s[g] * ks;
    } else {
#pragma unroll
      for (int g = 0; g < GT; ++g) S[g * chunk_alloc + r] = -INFINITY;  // unreadable block: no weight
    }
  }
  __syncthreads();

  // B. max and sum of exp per head; scores become unnormalized probabilities.
  for (int g = warp; g < GT; g += kDecodeWarps) {
    float* Sg = S + g * chunk_alloc;
    float m = -INFINITY;
    for (int r = lane; r < n; r += kWarp) m = fmaxf(m, Sg[r]);
    m = warp_max(m);
    float l = 0.f;
    for (int r = lane; r < n; r += kWarp) {
      const float p = m == -INFINITY ? nan_or_zero(Sg[r]) : expf(Sg[r] - m);
      Sg[r] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stat[g] = m;
      stat[GT + g] = l;
    }
  }
  __syncthreads();

  // C. P.V over slices of 256 columns of V.
  int lpr = 1;  // lanes per token row: a power of two covering the slice in 8-column pieces
  while (lpr * 8 < dslice) lpr *= 2;
  const int rpw = kWarp / lpr;  // token rows per warp per step
  const int sub = lane / lpr, col = (lane % lpr) * 8;
  const bool vec8 = a.vec && (D % 8) == 0;
  const int64_t part = (int64_t(b) * a.Hq + int64_t(h) * G + g0) * a.splits + split;  // (b, head g0, split)

  for (int dbase = 0; dbase < D; dbase += kDecodeDSlice) {
    const int dlen = min(kDecodeDSlice, D - dbase);
    float acc[GT][8];
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;

    if (col < dlen) {
      // kDecodeUnroll rows per lane per step, all loads issued before any use (latency hiding).
      const int step = kDecodeWarps * rpw;
      for (int r0 = warp * rpw + sub; r0 < n; r0 += step * kDecodeUnroll) {
        float vf[kDecodeUnroll][8];
#pragma unroll
        for (int u = 0; u < kDecodeUnroll; ++u) {
          const int r = r0 + u * step;
          const int64_t row = r < n ? rows[r] : -1;
#pragma unroll
          for (int i = 0; i < 8; ++i) vf[u][i] = 0.f;
          if (row < 0) continue;
          const int8_t* vp = a.v_cache + (row * a.Hkv + h) * D + dbase + col;
          if (vec8) {
            const uint2 raw = *reinterpret_cast<const uint2*>(vp);
            float lo[4], hi[4];
            int8x4_to_float(raw.x, lo);
            int8x4_to_float(raw.y, hi);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              vf[u][i] = lo[i];
              vf[u][4 + i] = hi[i];
            }
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) vf[u][i] = col + i < dlen ? float(vp[i]) : 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < kDecodeUnroll; ++u) {
          const int r = r0 + u * step;
          if (r >= n) break;
          const float vs = vsc[r];  // 1 for static scales (applied per channel below) and unreadable rows
#pragma unroll
          for (int g = 0; g < GT; ++g) {
            const float p = S[g * chunk_alloc + r] * vs;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[u][i], acc[g][i]);
          }
        }
      }
    }
    // Rows of the same warp hold the same columns lpr lanes apart.
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        for (int o = lpr; o < kWarp; o <<= 1) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    if (sub == 0 && col < dlen) {
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (col + i < dlen) red[(warp * GT + g) * dslice + col + i] = acc[g][i];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < gcount * dlen; i += kDecodeThreads) {
      const int g = i / dlen, d = i % dlen;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) v += red[(w * GT + g) * dslice + d];
      if (!a.v_dynamic) v *= a.v_scale[int64_t(h) * D + dbase + d];
      const int64_t head = int64_t(b) * a.Hq + int64_t(h) * G + g0 + g;
      if (a.splits == 1) {
        const float l = stat[GT + g];
        T* o = static_cast<T*>(a.out);
        o[head * D + dbase + d] = from_float<T>(l != 0.f ? v / l : 0.f);
      } else {
        a.part_acc[(part + int64_t(g) * a.splits) * D + dbase + d] = v;
      }
    }
    __syncthreads();  // `red` is reused by the next slice
  }
  if (a.splits > 1 && static_cast<int>(threadIdx.x) < gcount) {
    const int g = threadIdx.x;
    a.part_ml[(part + int64_t(g) * a.splits) * 2] = stat[g];
    a.part_ml[(part + int64_t(g) * a.splits) * 2 + 1] = stat[GT + g];
  }
}

// grid: B * Hq; block: kCombineThreads; dynamic smem: decode_combine_smem_bytes(splits).
// out[b, hq, :] = sum_z e^(m_z - M) acc_z / sum_z e^(m_z - M) l_z: each column summed in split order,
// the denominator by a block reduction (deterministic). The weights
// e^(m_z - M) and terms l_z e^(m_z - M) of the first kCombineCached splits are computed once, a split
// a thread, into shared memory, and each column's partials are loaded kCombineBatch splits at a time:
// the kernel is a chain of dependent loads (Nsight Compute on an H200: 9.4 us for 12 splits of 32
// heads when each thread walked the splits one load at a time, recomputing every expf per column).
constexpr int kCombineThreads = 128, kCombineCached = 2048, kCombineBatch = 8;
__host__ __device__ inline size_t decode_combine_smem_bytes(int splits) {
  return 2 * sizeof(float) * size_t(splits < kCombineCached ? splits : kCombineCached);
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(DecodeArgs a) {
  PTQRT_DYNAMIC_SMEM(float, s_e);  // [cached] weights (-1: a split that saw no token), then [cached] l terms
  __shared__ float s_red[kCombineThreads / kWarp];
  const int64_t head = blockIdx.x;  // b * Hq + hq
  const float* ml = a.part_ml + head * a.splits * 2;
  const int cached = a.splits < kCombineCached ? a.splits : kCombineCached;
  float* s_le = s_e + cached;
  // M: the largest max of the splits that saw a token (l_z != 0: a NaN sum counts, and its NaN, through
  // a NaN weight that the `!(e < 0)` tests let through, reaches the output as in the reference).
  float m = -INFINITY;
  for (int z = threadIdx.x; z < a.splits; z += kCombineThreads)
    if (ml[2 * z + 1] != 0.f) m = fmaxf(m, ml[2 * z]);
  m = warp_max(m);
  if (threadIdx.x % kWarp == 0) s_red[threadIdx.x / kWarp] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kCombineThreads / kWarp; ++w) m = fmaxf(m, s_red[w]);
  // e^(m_z - M), or -1 for a split that saw no token (its partials, zeros, are loaded but not used).
  auto weight = [&](int z) { return ml[2 * z + 1] != 0.f ? expf(ml[2 * z] - m) : -1.f; };
  for (int z = threadIdx.x; z < cached; z += kCombineThreads) {
    const float e = weight(z);
    s_e[z] = e;
    s_le[z] = !(e < 0.f) ? ml[2 * z + 1] * e : 0.f;
  }
  __syncthreads();
  float l = 0.f;  // L: sum_z l_z e^(m_z - M), a thread's splits, then the warps', then the block's
  for (int z = threadIdx.x; z < a.splits; z += kCombineThreads) {
    if (z < cached) {
      l += s_le[z];
    } else {
      const float e = weight(z);
      if (!(e < 0.f)) l += ml[2 * z + 1] * e;
    }
  }
  l = warp_sum(l);
  if (threadIdx.x % kWarp == 0) s_red[threadIdx.x / kWarp] = l;
  __syncthreads();
  l = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineThreads / kWarp; ++w) l += s_red[w];
  const float* acc = a.part_acc + head * a.splits * a.D;
  T* o = static_cast<T*>(a.out) + head * a.D;
  for (int d = threadIdx.x; d < a.D; d += kCombineThreads) {
    float v = 0.f;
    for (int z0 = 0; z0 < a.splits; z0 += kCombineBatch) {
      float p[kCombineBatch];
#pragma unroll
      for (int i = 0; i < kCombineBatch; ++i)  // the batch's loads first
        p[i] = z0 + i < a.splits ? acc[int64_t(z0 + i) * a.D + d] : 0.f;
#pragma unroll
      for (int i = 0; i < kCombineBatch; ++i) {
        const int z = z0 + i;
        if (z >= a.splits) break;
        const float e = z < cached ? s_e[z] : weight(z);
        if (!(e < 0.f)) v += p[i] * e;
      }
    }
    o[d] = from_float<T>(l != 0.f ? v / l : 0.f);
  }
}

}  // namespace cuda
}  // namespace ptqrt
