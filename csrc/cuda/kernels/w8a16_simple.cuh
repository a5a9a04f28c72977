// w8a16_gemm for whatever the fast paths refuse: fp32 activations with M > 16, K not a multiple of
// 16, unaligned rows, group sizes that are not multiples of 16. CUDA cores, fp32 throughout:
//
//   y[m, n] = sum_k float(x[m, k]) * (float(w[n, k]) * s[n, k / g]) + bias[n]
//
// which is the reference's own order of operations (dequantize in fp32, then a fp32 dot product).
// A classic 64x64 shared-memory tile, 16 x 16 threads with 4 x 4 outputs each, every load predicated.
#pragma once

#include "common.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kSimpleBM = 64, kSimpleBN = 64, kSimpleBK = 16;

// grid: (ceil(N / 64), ceil(M / 64)); block: 256.
template <typename T>
__global__ void __launch_bounds__(256) w8a16_simple_kernel(const T* __restrict__ x, const int8_t* __restrict__ w,
                                                           const float* __restrict__ w_scale,
                                                           const float* __restrict__ bias, T* __restrict__ out, int M,
                                                           int N, int K, int group_size) {
  __shared__ float xs[kSimpleBK][kSimpleBM + 4];  // k-major so the inner loop reads rows of 4
  __shared__ float ws[kSimpleBK][kSimpleBN + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int m0 = blockIdx.y * kSimpleBM, n0 = blockIdx.x * kSimpleBN;
  const int groups = group_size > 0 ? K / group_size : 1;

  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kSimpleBK) {
    // 64 x 16 elements of each operand, 4 per thread; consecutive threads walk k (contiguous in memory).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = threadIdx.x + i * 256;
      const int r = e / kSimpleBK, kk = e % kSimpleBK;
      const int k = k0 + kk;
      const int m = m0 + r, n = n0 + r;
      xs[kk][r] = (m < M && k < K) ? to_float(x[int64_t(m) * K + k]) : 0.f;
      float wv = 0.f;
      if (n < N && k < K) {
        const float s = group_size > 0 ? w_scale[int64_t(n) * groups + k / group_size] : w_scale[n];
        wv = float(w[int64_t(n) * K + k]) * s;
      }
      ws[kk][r] = wv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimpleBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = xs[kk][ty * 4 + i];
        b[i] = ws[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n >= N) continue;
      float v = acc[i][j];
      if (bias != nullptr) v += bias[n];
      out[int64_t(m) * N + n] = from_float<T>(v);
    }
  }
}

}  // namespace cuda
}  // namespace ptqrt
