// Tile configurations and the launcher of the w8a16 mma.sync GEMM, instantiated per activation
// dtype in w8a16_mma_{f16,bf16}.cu.
#pragma once

#include "../launch.h"
#include "w8a16_mma.cuh"

namespace ptqrt {
namespace cuda {

// Large: 128x128 CTA tile, 8 warps of 64x32, 4 stages (96 KiB of shared memory).
using W8A16Large = W8A16Tile<128, 128, 2, 4, 4, 8>;
// Small (16 < M <= 64): 32x128, 4 warps of 32x32, 4 stages (48 KiB); split-K fills the GPU.
using W8A16Small = W8A16Tile<32, 128, 1, 4, 4, 1>;

template <class C, typename T>
cudaError_t launch_w8a16_tile(const W8A16Args& a, cudaStream_t stream) {
  auto kernel = w8a16_mma_kernel<C, T>;
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, C::SMEM_BYTES, granted);
  if (e != cudaSuccess) return e;
  const dim3 grid(ceil_div(a.M, C::BM) * ceil_div(a.N, C::BN), 1, a.splits);
  PTQRT_LAUNCH(kernel, grid, C::THREADS, C::SMEM_BYTES, stream)(static_cast<const T*>(a.x), a.w, a.w_scale, a.bias,
                                                      static_cast<T*>(a.out), a.splits > 1 ? a.partial : nullptr,
                                                      a.M, a.N, a.K, a.group_size);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_w8a16_mma(Tile tile, const W8A16Args& a, cudaStream_t stream) {
  return tile == Tile::Large ? launch_w8a16_tile<W8A16Large, T>(a, stream) : launch_w8a16_tile<W8A16Small, T>(a, stream);
}

}  // namespace cuda
}  // namespace ptqrt
