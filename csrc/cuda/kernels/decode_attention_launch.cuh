// Launcher of int8_kv_decode_attention, instantiated per query dtype in decode_attention_{f16,bf16,f32}.cu.
#pragma once

#include <algorithm>

#include "../launch.h"
#include "decode_attention.cuh"
#include "decode_mma.cuh"
#include "decode_stream.cuh"

namespace ptqrt {
namespace cuda {

// The decode kernels' grid is (splits, Hkv * ceil(G / rows), B) -- `rows` query heads a CTA -- and the
// combine kernel's B * Hq. Where that passes the grid limits (max_grid_yz, max_grid_x) it runs in pieces,
// each a DecodeArgs whose pointers start at the piece's first sequence, kv head and query head (the
// kernels index from 0 with the whole call's strides), so every CTA computes what it would in one launch:
//   * whole kv heads, up to the limits' worth of sequences a piece (the usual case: one piece, `a` as given);
//   * else one sequence a piece, as many kv heads as fit;
//   * else one sequence and kv head a piece, a range of whole CTAs' query heads of its group, with Hq set to
//     that count times Hkv so that the kernel's G = Hq / Hkv is the piece's (b = h = 0 there: Hq is no stride).
// f(piece, kv_heads) launches one piece; kv_heads is the kv heads it spans.
template <typename F>
cudaError_t for_each_decode_piece(const DecodeArgs& a, int rows, size_t q_elem_bytes, F&& f) {
  const int64_t G = a.Hq / a.Hkv, gchunks = (G + rows - 1) / rows;
  const int64_t yz = max_grid_yz(), x = max_grid_x();
  auto piece = [&](int64_t b0, int64_t bn, int64_t h0, int64_t hn, int64_t g0, int64_t gn) {
    DecodeArgs p = a;
    const int64_t head = b0 * a.Hq + h0 * G + g0;  // the piece's first query head in [B, Hq]
    p.q = static_cast<const char*>(a.q) + head * a.D * q_elem_bytes;
    p.out = static_cast<char*>(a.out) + head * a.D * q_elem_bytes;
    p.k_cache = a.k_cache + h0 * a.D;
    p.v_cache = a.v_cache + h0 * a.D;
    p.k_scale = a.k_scale + (a.k_dynamic ? h0 : h0 * a.D);
    p.v_scale = a.v_scale + (a.v_dynamic ? h0 : h0 * a.D);
    p.block_table = a.block_table + b0 * a.max_blocks;
    p.seq_lens = a.seq_lens + b0;
    if (a.splits > 1) {
      p.part_acc = a.part_acc + head * a.splits * a.D;
      p.part_ml = a.part_ml + head * a.splits * 2;
    }
    p.B = static_cast<int>(bn);
    p.Hq = static_cast<int>(gn < G ? gn * a.Hkv : a.Hq);
    return f(p, hn);
  };
  cudaError_t e = cudaSuccess;
  if (a.Hkv * gchunks <= yz && a.Hq <= x) {
    const int64_t step = std::min(yz, x / a.Hq);  // the combine kernel: B * Hq CTAs along x
    for (int64_t b0 = 0; b0 < a.B && e == cudaSuccess; b0 += step)
      e = piece(b0, std::min(step, a.B - b0), 0, a.Hkv, 0, G);
  } else if (gchunks <= yz && G <= x) {
    const int64_t step = std::min(yz / gchunks, x / G);
    for (int64_t b = 0; b < a.B && e == cudaSuccess; ++b)
      for (int64_t h0 = 0; h0 < a.Hkv && e == cudaSuccess; h0 += step)
        e = piece(b, 1, h0, std::min(step, a.Hkv - h0), 0, G);
  } else {
    const int64_t step = std::max<int64_t>(1, std::min(yz, x / rows)) * rows;
    for (int64_t b = 0; b < a.B && e == cudaSuccess; ++b)
      for (int64_t h = 0; h < a.Hkv && e == cudaSuccess; ++h)
        for (int64_t g0 = 0; g0 < G && e == cudaSuccess; g0 += step)
          e = piece(b, 1, h, 1, g0, std::min(step, G - g0));
  }
  return e;
}

// `kernel` (one of the decode kernels, `rows` query heads a CTA, `smem` bytes of dynamic shared memory)
// over the grid, then the split-KV partials' merge (decode_combine_kernel) where there is more than one
// split; piece by piece (for_each_decode_piece).
template <typename T, typename Kernel>
cudaError_t launch_split_kv(const DecodeArgs& a, Kernel kernel, int rows, size_t smem, cudaStream_t stream) {
  return for_each_decode_piece(a, rows, sizeof(T), [&](const DecodeArgs& p, int64_t kv_heads) {
    const int64_t G = p.Hq / p.Hkv;
    const dim3 grid(p.splits, static_cast<unsigned>(kv_heads * ((G + rows - 1) / rows)), p.B);
    PTQRT_LAUNCH(kernel, grid, kDecodeThreads, smem, stream)(p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || p.splits == 1) return e;
    auto combine = decode_combine_kernel<T>;
    PTQRT_LAUNCH(combine, static_cast<unsigned>(p.B * kv_heads * G), kCombineThreads,
                 decode_combine_smem_bytes(p.splits), stream)(p);
    return cudaGetLastError();
  });
}

template <typename T, int GT, int LPR>
cudaError_t launch_stream(const DecodeArgs& a, cudaStream_t stream) {
  auto kernel = decode_stream_kernel<T, GT, LPR>;
  constexpr size_t smem = decode_stream_smem_bytes(decode_stream_cols(GT));
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, smem, granted);
  return e != cudaSuccess ? e : launch_split_kv<T>(a, kernel, GT, smem, stream);
}

template <typename T, int GT>
cudaError_t launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  if (decode_stream_fits(a, GT)) {  // LPR = D / columns a lane
    if constexpr (GT <= 2) {
      return a.D == 64 ? launch_stream<T, GT, 4>(a, stream)
             : a.D == 128 ? launch_stream<T, GT, 8>(a, stream)
                          : launch_stream<T, GT, 16>(a, stream);
    } else if constexpr (GT == 4) {
      return a.D == 64 ? launch_stream<T, GT, 8>(a, stream) : launch_stream<T, GT, 16>(a, stream);
    }
  }
  auto kernel = decode_attention_kernel<T, GT>;
  const size_t smem = decode_smem_bytes(GT, a.D, a.chunk);
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, smem, granted);
  return e != cudaSuccess ? e : launch_split_kv<T>(a, kernel, GT, smem, stream);
}

// The tensor-core kernel (fp16 / bf16 queries; decode_mma_fits), then the combine kernel.
template <typename T, int D>
cudaError_t launch_mma(const DecodeArgs& a, cudaStream_t stream) {
  auto kernel = decode_mma_kernel<T, D>;
  constexpr size_t smem = decode_mma_smem_bytes(D);
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, smem, granted);
  return e != cudaSuccess ? e : launch_split_kv<T>(a, kernel, kMmaRows, smem, stream);
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
