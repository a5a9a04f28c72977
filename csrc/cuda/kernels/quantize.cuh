// quantize_per_token and quantize_per_tensor (math: ptqrt/reference.py).
//
//   per token:  v = float(x[m, k]) / smooth[k];  s[m] = absmax_k(v) / 127 (1 if 0);  q = rne(v / s[m])
//   per tensor: q = rne((float(x[m, k]) / smooth[k]) / scale)
// q is clamped to [-127, 127], NaN -> 0. Divisions are IEEE (or, opt-in, a reciprocal multiply that
// divides where it could round apart: common.cuh, ScaleDivider) so that every q matches the reference
// bit for bit.
#pragma once

#include "common.cuh"

namespace ptqrt {
namespace cuda {

// VEC elements of T per 16-byte load (1: scalar path for unaligned rows).
template <typename T, int VEC> struct Vec16 {
  static_assert(VEC * sizeof(T) == 16 || VEC == 1, "16-byte vectors or scalars");
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(e[j]);
  }
}

template <int VEC>
__device__ __forceinline__ void divide_smooth(const float* smooth, int64_t k, float (&v)[VEC]) {
  if (smooth == nullptr) return;
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 s = *reinterpret_cast<const float4*>(smooth + k + j);
      v[j] /= s.x; v[j + 1] /= s.y; v[j + 2] /= s.z; v[j + 3] /= s.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] /= smooth[k + j];
  }
}

template <int VEC>
__device__ __forceinline__ void store_q(int8_t* p, const int8_t (&q)[VEC]) {
  if constexpr (VEC == 16) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(q);
  } else if constexpr (VEC == 8) {
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(q);
  } else if constexpr (VEC == 4) {
    *reinterpret_cast<uint32_t*>(p) = *reinterpret_cast<const uint32_t*>(q);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = q[j];
  }
}

// The NaN-propagating max of `v` over the CTA (blockDim.x a multiple of 32, at most 256), in every thread.
__device__ __forceinline__ float block_nan_max(float v) {
  __shared__ float red[8];
  v = warp_nan_max(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / kWarp;
    float a = lane < nw ? red[lane] : 0.f;
    a = warp_nan_max(a);
    if (lane == 0) red[0] = a;
  }
  __syncthreads();
  return red[0];
}

// One CTA per row, rows of 1 to blockDim.x * VEC * CHUNKS elements (VEC > 1: 16-byte vectors): the
// row stays in registers between the absmax and the quantization, so x is read once (the two-pass
// kernel below re-reads it from L2). Chunk c of a thread is the c-th blockDim.x * VEC-wide slice:
// every load coalesced. All CHUNKS loads are issued before any is used: a chunk past the row's end
// loads the row's first vector instead (the row is not empty) and is then ignored. Loads under
// `if (k < K)` were issued one at a time, each next to its first use (the sm_90a SASS of the first
// version: one 16-byte load in flight a thread; 102 us at 8192 x 8192 on an H100, slower than the
// two-pass kernel's 91).
template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(256) quantize_per_token_1pass_kernel(const T* __restrict__ x,
                                                                       const float* __restrict__ smooth,
                                                                       int8_t* __restrict__ x_q,
                                                                       float* __restrict__ x_scale, int64_t K,
                                                                       bool recip) {
  static_assert(VEC * sizeof(T) == 16, "16-byte vectors");
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* qr = x_q + row * K;
  uint4 raw[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t k = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    raw[c] = __ldg(reinterpret_cast<const uint4*>(xr + (k < K ? k : 0)));
  }
  float v[CHUNKS][VEC];
  float amax = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t k = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    const T* e = reinterpret_cast<const T*>(&raw[c]);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[c][j] = to_float(e[j]);
    if (k < K) {
      divide_smooth<VEC>(smooth, k, v[c]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) amax = nan_max(amax, fabsf(v[c][j]));
    }
  }
  const float s = absmax_scale(block_nan_max(amax));
  if (threadIdx.x == 0) x_scale[row] = s;
  const ScaleDivider div(s, recip);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t k = (int64_t(c) * blockDim.x + threadIdx.x) * VEC;
    if (k < K) {
      int8_t q[VEC];
      div(v[c], q);
      store_q<VEC>(qr + k, q);
    }
  }
}

// One CTA per row, any K: pass 1 finds the row's absmax, pass 2 re-reads the row (from L1/L2) and
// quantizes.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) quantize_per_token_kernel(const T* __restrict__ x, const float* __restrict__ smooth,
                                                                 int8_t* __restrict__ x_q, float* __restrict__ x_scale,
                                                                 int64_t K, bool recip) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* qr = x_q + row * K;
  const int64_t step = int64_t(blockDim.x) * VEC;

  float amax = 0.f;
  for (int64_t k = int64_t(threadIdx.x) * VEC; k < K; k += step) {
    float v[VEC];
    load_vec<T, VEC>(xr + k, v);
    divide_smooth<VEC>(smooth, k, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) amax = nan_max(amax, fabsf(v[j]));
  }
  const float s = absmax_scale(block_nan_max(amax));
  if (threadIdx.x == 0) x_scale[row] = s;
  const ScaleDivider div(s, recip);

  for (int64_t k = int64_t(threadIdx.x) * VEC; k < K; k += step) {
    float v[VEC];
    load_vec<T, VEC>(xr + k, v);
    divide_smooth<VEC>(smooth, k, v);
    int8_t q[VEC];
    div(v, q);
    store_q<VEC>(qr + k, q);
  }
}

// Grid-stride over VEC-element groups of the flattened [M, K] (K % VEC == 0 when VEC > 1).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) quantize_per_tensor_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                                                                  const float* __restrict__ smooth,
                                                                  int8_t* __restrict__ x_q, int64_t total, int64_t K,
                                                                  bool recip) {
  const ScaleDivider div(*scale, recip);
  const int64_t groups = total / VEC;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = g * VEC;
    float v[VEC];
    load_vec<T, VEC>(x + i, v);
    divide_smooth<VEC>(smooth, i % K, v);
    int8_t q[VEC];
    div(v, q);
    store_q<VEC>(x_q + i, q);
  }
}

}  // namespace cuda
}  // namespace ptqrt
