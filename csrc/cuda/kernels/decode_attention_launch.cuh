// Launcher of int8_kv_decode_attention, instantiated per query dtype in decode_attention_{f16,bf16,f32}.cu.
#pragma once

#include "../launch.h"
#include "decode_attention.cuh"
#include "decode_mma.cuh"
#include "decode_stream.cuh"

namespace ptqrt {
namespace cuda {

// The split-KV partials' merge (decode_combine_kernel), where there is more than one split.
template <typename T>
cudaError_t launch_combine(const DecodeArgs& a, cudaStream_t stream) {
  if (a.splits == 1) return cudaSuccess;
  auto combine = decode_combine_kernel<T>;
  PTQRT_LAUNCH(combine, static_cast<unsigned>(int64_t(a.B) * a.Hq), kCombineThreads, decode_combine_smem_bytes(a.splits),
               stream)(a);
  return cudaGetLastError();
}

template <typename T, int GT, int LPR>
cudaError_t launch_stream(const DecodeArgs& a, dim3 grid, cudaStream_t stream) {
  auto kernel = decode_stream_kernel<T, GT, LPR>;
  constexpr size_t smem = decode_stream_smem_bytes(decode_stream_cols(GT));
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, smem, granted);
  if (e != cudaSuccess) return e;
  PTQRT_LAUNCH(kernel, grid, kDecodeThreads, smem, stream)(a);
  return cudaSuccess;
}

template <typename T, int GT>
cudaError_t launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  const int G = a.Hq / a.Hkv;
  const dim3 grid(a.splits, a.Hkv * ((G + GT - 1) / GT), a.B);
  cudaError_t e = cudaSuccess;
  bool streamed = false;
  if (decode_stream_fits(a, GT)) {  // LPR = D / columns a lane
    if constexpr (GT <= 2) {
      e = a.D == 64 ? launch_stream<T, GT, 4>(a, grid, stream)
          : a.D == 128 ? launch_stream<T, GT, 8>(a, grid, stream)
                       : launch_stream<T, GT, 16>(a, grid, stream);
    } else if constexpr (GT == 4) {
      e = a.D == 64 ? launch_stream<T, GT, 8>(a, grid, stream) : launch_stream<T, GT, 16>(a, grid, stream);
    }
    if (e != cudaSuccess) return e;
    streamed = true;
  }
  if (!streamed) {
    auto kernel = decode_attention_kernel<T, GT>;
    const size_t smem = decode_smem_bytes(GT, a.D, a.chunk);
    static size_t granted[64] = {};
    e = opt_in_smem(kernel, smem, granted);
    if (e != cudaSuccess) return e;
    PTQRT_LAUNCH(kernel, grid, kDecodeThreads, smem, stream)(a);
  }
  e = cudaGetLastError();
  return e != cudaSuccess ? e : launch_combine<T>(a, stream);
}

// The tensor-core kernel (fp16 / bf16 queries; decode_mma_fits), then the combine kernel.
template <typename T, int D>
cudaError_t launch_mma(const DecodeArgs& a, cudaStream_t stream) {
  auto kernel = decode_mma_kernel<T, D>;
  constexpr size_t smem = decode_mma_smem_bytes(D);
  static size_t granted[64] = {};
  cudaError_t e = opt_in_smem(kernel, smem, granted);
  if (e != cudaSuccess) return e;
  const int G = a.Hq / a.Hkv;
  const dim3 grid(a.splits, a.Hkv * ((G + kMmaRows - 1) / kMmaRows), a.B);
  PTQRT_LAUNCH(kernel, grid, kDecodeThreads, smem, stream)(a);
  e = cudaGetLastError();
  return e != cudaSuccess ? e : launch_combine<T>(a, stream);
}

template <typename T>
cudaError_t run_decode(const DecodeArgs& a, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    if (decode_mma_fits(a)) return a.D == 64 ? launch_mma<T, 64>(a, stream) : launch_mma<T, 128>(a, stream);
  }
  switch (decode_heads_per_cta(a.Hq / a.Hkv)) {
    case 1: return launch_decode<T, 1>(a, stream);
    case 2: return launch_decode<T, 2>(a, stream);
    case 4: return launch_decode<T, 4>(a, stream);
    default: return launch_decode<T, 8>(a, stream);
  }
}

}  // namespace cuda
}  // namespace ptqrt
