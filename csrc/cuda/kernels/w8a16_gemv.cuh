// w8a16_gemm for M <= 16 (decode): weight-bandwidth bound, GEMV-shaped.
//
//   y[m, n] = sum_k x[m, k] * (w[n, k] * s[n, k / g]) + bias[n]        (s[n] when group_size == 0)
//
// Two kernels:
//
// w8a16_gemv_tc_kernel (fp16 / bf16 activations): tensor cores without shared memory. Each warp
// streams its weight rows straight from global memory with 16-byte loads (UNROLL x NT of them in
// flight per thread), dequantizes in registers and feeds mma.sync m16n8k16 with x (M <= 16 rows, the
// rest zero) as the A operand. The K order inside each 64-wide window is permuted so that both
// operands come from wide contiguous loads: in mma step j, thread (g, t) supplies the four k values
// 64w + 16t + 4j + {0,1,2,3} for both x and w (logical k 2t,2t+1 -> +0,+1 and 2t+8,2t+9 -> +2,+3). A
// dot product does not care about the order of its k, only that x and w agree.
// The 8 warps of a CTA share the CTA's 8*NT output columns and split K; shared memory adds them up.
//
// w8a16_gemv_fma_kernel (fp32 activations, which tensor cores would round): CUDA-core FMAs, the same
// 16-byte weight loads, up to 16 rows of x.
#pragma once

#include "dequant.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kGemvWarps = 8;

// Loads 16 consecutive T of row `m` starting at k as 8 packed pairs (zeros when the row is absent).
template <typename T>
__device__ __forceinline__ void load_x16_pairs(const T* __restrict__ x, int m, int M, int64_t K, int64_t k, uint32_t (&r)[8]) {
  if (m < M) {
    const uint4* p = reinterpret_cast<const uint4*>(x + int64_t(m) * K + k);
    const uint4 a = p[0], b = p[1];
    r[0] = a.x; r[1] = a.y; r[2] = a.z; r[3] = a.w;
    r[4] = b.x; r[5] = b.y; r[6] = b.z; r[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = 0u;
  }
}

// The tensor-core GEMVs' end: add the 8 warps' partial sums; warp 0 applies the per-channel scale and
// bias and writes. c0,c1: (row g, cols 2t, 2t+1); c2,c3: row g + 8.
template <typename T, int NT>
__device__ __forceinline__ void gemv_tc_finish(float (&acc)[NT][4], int warp, int lane, int n0,
                                               const float* __restrict__ w_scale, const float* __restrict__ bias,
                                               T* __restrict__ out, int M, int N, int group_size) {
  if (!sum_over_warps<float, kGemvWarps>(acc, warp, lane)) return;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float v = acc[i][r];
      const int m = g + (r >= 2 ? 8 : 0);
      const int n = n0 + i * 8 + 2 * t + (r & 1);
      if (m < M && n < N) {
        if (group_size == 0) v *= w_scale[n];
        if (bias != nullptr) v += bias[n];
        out[int64_t(m) * N + n] = from_float<T>(v);
      }
    }
  }
}

// grid: ceil(N / (8 * NT)); block: 32 * kGemvWarps. K % 16 == 0; x and w 16-byte aligned;
// group_size 0 or a multiple of 16 (a 16-byte weight chunk never straddles two groups).
template <typename T, int NT, int UNROLL>
__global__ void __launch_bounds__(kGemvWarps * kWarp) w8a16_gemv_tc_kernel(
    const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
    const float* __restrict__ bias, T* __restrict__ out, int M, int N, int K, int group_size) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * (8 * NT);
  const int windows = ceil_div(K, 64);
  const int groups = group_size > 0 ? K / group_size : 1;

  float acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[i][r] = 0.f;

  for (int w0 = warp; w0 < windows; w0 += kGemvWarps * UNROLL) {
    uint4 wq[UNROLL][NT];
    int64_t kk[UNROLL];
    bool ok[UNROLL];  // this thread's 16-wide chunk exists (differs between lanes only in the last window)
    // Issue every weight load of the UNROLL windows before using any: that is what hides DRAM latency.
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int win = w0 + u * kGemvWarps;
      kk[u] = int64_t(win) * 64 + 16 * t;
      ok[u] = win < windows && kk[u] < K;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const int n = n0 + i * 8 + g;
        wq[u][i] = (ok[u] && n < N) ? __ldg(reinterpret_cast<const uint4*>(w + int64_t(n) * K + kk[u]))
                                    : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      // Warp-uniform test only: mma.sync needs all 32 lanes, so a lane without a chunk feeds zeros.
      if (w0 + u * kGemvWarps >= windows) break;
      uint32_t xa[8], xb[8];  // rows g and g + 8, 16 values each as pairs
      load_x16_pairs<T>(x, ok[u] ? g : M, M, K, kk[u], xa);
      load_x16_pairs<T>(x, ok[u] ? g + 8 : M, M, K, kk[u], xb);
      float s[NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const int n = n0 + i * 8 + g;
        s[i] = (group_size > 0 && ok[u] && n < N) ? w_scale[int64_t(n) * groups + kk[u] / group_size] : 1.f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t a[4] = {xa[2 * j], xb[2 * j], xa[2 * j + 1], xb[2 * j + 1]};
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const uint32_t q4 = j == 0 ? wq[u][i].x : j == 1 ? wq[u][i].y : j == 2 ? wq[u][i].z : wq[u][i].w;
          uint32_t b0, b1;
          if (group_size > 0)
            int8x4_scaled_pairs<T>(q4, s[i], b0, b1);
          else
            int8x4_to_pairs<T>(q4, b0, b1);
          mma_16816<T>(acc[i], a, b0, b1);
        }
      }
    }
  }

  gemv_tc_finish<T, NT>(acc, warp, lane, n0, w_scale, bias, out, M, N, group_size);
}

// w8a16_gemv_ring_kernel: the same tensor-core GEMV (same K permutation, fragments, and the same
// reduction of the 8 warps), with the weight loads moved into a per-warp cp.async ring of STAGES
// windows. The kernel above issues UNROLL windows' loads, waits, computes them, and only then issues
// the next batch: a warp has nothing in flight while it computes, and its first loads and the
// reduction are not overlapped with anything. Here window i + STAGES - 1 is issued before window i
// is computed, so STAGES - 1 windows per warp stay in flight all along, with no weight registers held
// (each lane reads back only the 16-byte chunks it copied: no barrier). Tails (k past K, n past N) are
// zero-filled by the copy. The default for fp16 / bf16 (measured on an H100: 1.01-1.44x the kernel
// above; PTQRT_CUDA_GEMV_RING=0 turns it off).
template <int NT, int STAGES>
constexpr size_t gemv_ring_smem_bytes() { return size_t(kGemvWarps) * STAGES * NT * kWarp * 16; }

// grid: ceil(N / (8 * NT)); block: 32 * kGemvWarps; dynamic smem gemv_ring_smem_bytes<NT, STAGES>().
// K % 16 == 0; x and w 16-byte aligned; GROUPED: group_size a multiple of 16, else 0 (per channel).
template <typename T, int NT, int STAGES, bool GROUPED>
__global__ void __launch_bounds__(kGemvWarps * kWarp) w8a16_gemv_ring_kernel(
    const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
    const float* __restrict__ bias, T* __restrict__ out, int M, int N, int K, int group_size) {
  PTQRT_DYNAMIC_SMEM(uint4, ring_all);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * (8 * NT);
  const int windows = ceil_div(K, 64);
  const int groups = group_size > 0 ? K / group_size : 1;
  const int mine = windows > warp ? (windows - warp + kGemvWarps - 1) / kGemvWarps : 0;  // warp-uniform
  uint4* ring = ring_all + warp * STAGES * NT * kWarp;  // [stage][i][lane]

  // Window i of this warp (window warp + 8 i) into stage i % STAGES; one group per call, maybe empty.
  auto issue = [&](int i) {
    if (i < mine) {
      const int k = (warp + i * kGemvWarps) * 64 + 16 * t;  // < K + 64: no overflow (K is an int)
      uint4* st = ring + (i % STAGES) * NT * kWarp;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = n0 + j * 8 + g;
        const bool ok = k < K && n < N;
        cp_async16(st + j * kWarp + lane, ok ? w + int64_t(n) * K + k : w, ok);
      }
    }
    cp_async_commit();
  };

  float acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[i][r] = 0.f;

#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) issue(i);
  for (int i = 0; i < mine; ++i) {
    cp_async_wait<STAGES - 2>();  // window i has landed
    issue(i + STAGES - 1);        // into the stage window i - 1 left
    const int k = (warp + i * kGemvWarps) * 64 + 16 * t;
    const bool ok = k < K;
    const uint4* st = ring + (i % STAGES) * NT * kWarp;
    uint32_t xa[8], xb[8];  // rows g and g + 8, 16 values each as pairs
    load_x16_pairs<T>(x, ok ? g : M, M, K, k, xa);
    load_x16_pairs<T>(x, ok ? g + 8 : M, M, K, k, xb);
    float s[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = n0 + j * 8 + g;
      s[j] = GROUPED && ok && n < N ? w_scale[int64_t(n) * groups + k / group_size] : 1.f;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4 wq = st[j * kWarp + lane];
      const uint32_t q[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
      for (int step = 0; step < 4; ++step) {
        const uint32_t a[4] = {xa[2 * step], xb[2 * step], xa[2 * step + 1], xb[2 * step + 1]};
        uint32_t b0, b1;
        if constexpr (GROUPED)
          int8x4_scaled_pairs<T>(q[step], s[j], b0, b1);
        else
          int8x4_to_pairs<T>(q[step], b0, b1);
        mma_16816<T>(acc[j], a, b0, b1);
      }
    }
  }
  cp_async_wait<0>();
  gemv_tc_finish<T, NT>(acc, warp, lane, n0, w_scale, bias, out, M, N, group_size);
}

// grid: ceil(N / (kGemvWarps * R)); block: 32 * kGemvWarps. Warp q owns weight rows n0 + q*R .. +R-1;
// its lanes take 16-element chunks of K in turn. MT >= M rows of x. K % 16 == 0, 16-byte aligned
// rows; any group size.
template <typename T, int MT, int R>
__global__ void __launch_bounds__(kGemvWarps * kWarp) w8a16_gemv_fma_kernel(
    const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
    const float* __restrict__ bias, T* __restrict__ out, int M, int N, int K, int group_size) {
  static_assert(sizeof(T) == 4, "the fp32 path; 16 values of x are four 16-byte loads");
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int nbase = (blockIdx.x * kGemvWarps + warp) * R;
  const int chunks = K / 16;
  const int groups = group_size > 0 ? K / group_size : 1;

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int c = lane; c < chunks; c += kWarp) {
    const int64_t k = int64_t(c) * 16;
    float wf[R][16];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = nbase + r;
      const uint4 q = n < N ? __ldg(reinterpret_cast<const uint4*>(w + int64_t(n) * K + k)) : make_uint4(0u, 0u, 0u, 0u);
      const uint32_t qs[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float f[4];
        int8x4_to_float(qs[j], f);
#pragma unroll
        for (int e = 0; e < 4; ++e) wf[r][4 * j + e] = f[e];
      }
      if (group_size > 0 && n < N) {
        // w = q * s, as in the reference; a chunk may straddle groups when 16 % group_size != 0.
        const float* srow = w_scale + int64_t(n) * groups;
        if (group_size % 16 == 0) {
          const float s = srow[k / group_size];
#pragma unroll
          for (int e = 0; e < 16; ++e) wf[r][e] *= s;
        } else {
#pragma unroll
          for (int e = 0; e < 16; ++e) wf[r][e] *= srow[(k + e) / group_size];
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= M) break;
      const float4* xp = reinterpret_cast<const float4*>(x + int64_t(m) * K + k);
      float xf[16];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 v = xp[j];
        xf[4 * j] = v.x; xf[4 * j + 1] = v.y; xf[4 * j + 2] = v.z; xf[4 * j + 3] = v.w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[m][r] = fmaf(xf[e], wf[r][e], acc[m][r]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= M) break;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float v = warp_sum(acc[m][r]);
      const int n = nbase + r;
      if (lane == 0 && n < N) {
        float y = group_size == 0 ? v * w_scale[n] : v;
        if (bias != nullptr) y += bias[n];
        out[int64_t(m) * N + n] = from_float<T>(y);
      }
    }
  }
}

}  // namespace cuda
}  // namespace ptqrt
