// Device helpers shared by every ptqrt CUDA kernel. Torch-free: only the CUDA runtime headers.
//
// Everything here targets sm_80 and newer (cp.async, ldmatrix, mma.sync); the build only emits
// sm_80 and sm_90a code.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// kernel<<<grid, block, smem, stream>>>, spelled so that the emulator can run the same launchers.
// `kernel` must be a single token (bind template instances to a variable first).
#ifdef PTQRT_CUDA_EMU
#define PTQRT_LAUNCH(kernel, grid, block, smem, stream) ::ptqrt::emu::launcher(kernel, grid, block, smem)
#define PTQRT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::ptqrt::emu::dynamic_smem())
#else
#define PTQRT_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define PTQRT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

namespace ptqrt {
namespace cuda {

// Grid limits of every CUDA GPU: gridDim.x <= 2^31 - 1, gridDim.y and gridDim.z <= 65535 (a launch past
// them fails). Launchers whose grid grows with an input size past them launch it in pieces. The
// emulator's can be lowered (emu.h), so that tests reach those pieces at small sizes.
#ifdef PTQRT_CUDA_EMU
inline int64_t max_grid_x() { return ::ptqrt::emu::max_grid_x(); }
inline int64_t max_grid_yz() { return ::ptqrt::emu::max_grid_yz(); }
#else
constexpr int64_t max_grid_x() { return 2147483647; }
constexpr int64_t max_grid_yz() { return 65535; }
#endif

// Host side of a launch: opts `kernel` in to `bytes` of dynamic shared memory on the current device
// (needed when its static plus dynamic shared memory exceed 48 KiB, so any dynamic size may need it:
// a 48 KiB ring beside an 8 KiB static reduction buffer once failed to launch for want of it; the
// attribute is per device). `granted`, one static array per kernel instance, remembers the largest size set on
// each device so far, so the attribute is set once.
template <typename Kernel>
inline cudaError_t opt_in_smem(Kernel kernel, size_t bytes, size_t (&granted)[64]) {
  if (bytes == 0) return cudaSuccess;
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 64 && granted[dev] >= bytes) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess && dev < 64) granted[dev] = bytes;
  return e;
}

constexpr int kWarp = 32;
constexpr float kQMax = 127.f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ float conversions
// Explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__, so no implicit casts exist.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two adjacent outputs as one store when the address allows it (the caller checks alignment).
template <typename T> struct Pair;
template <> struct Pair<float> { using type = float2; };
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };
template <> struct Pair<int32_t> { using type = int2; };

template <typename T> __device__ __forceinline__ typename Pair<T>::type make_pair2(float a, float b);
template <> __device__ __forceinline__ float2 make_pair2<float>(float a, float b) { return make_float2(a, b); }
template <> __device__ __forceinline__ __half2 make_pair2<__half>(float a, float b) { return __floats2half2_rn(a, b); }
template <> __device__ __forceinline__ __nv_bfloat162 make_pair2<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}
// Two floats -> one 32-bit register of two fp16 / bf16 (a in the low half), rounded to nearest.
template <typename T> __device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  auto p = make_pair2<T>(a, b);
  return *reinterpret_cast<uint32_t*>(&p);
}

// ------------------------------------------------------------------ quantization math (reference.py)
// NaN-propagating max: torch.amax propagates NaN, fmaxf would drop it.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
// exp(s - m) in an online softmax where the running max m is still -inf: 0 for a dead (-inf) score,
// but a NaN score stays NaN (fmaxf skips NaN, so a row of NaN scores keeps m = -inf) and reaches the
// output as in the reference.
__device__ __forceinline__ float nan_or_zero(float s) { return s != s ? s : 0.f; }

// s = amax / 127, and 1 for amax == 0 (an all-zero row must not produce 0 or NaN); NaN/Inf pass through.
__device__ __forceinline__ float absmax_scale(float amax) { return amax == 0.f ? 1.f : amax / kQMax; }

// Round half to even, NaN -> 0, clamp to [-127, 127]. The caller divides (IEEE, not a reciprocal
// multiply) so that ties land exactly where the reference's fp32 division puts them.
// The rounding is one fp32 add: for |v| <= 127, v + 1.5 * 2^23 has no fraction bits left, so the
// add itself rounds v to an integer (round to nearest even, as __float2int_rn) and the integer sits
// in the low mantissa bits, whose low byte is v's two's-complement int8 code. That replaces F2I,
// which runs on a quarter-rate unit, in the memory-bound kernels that quantize every element.
__device__ __forceinline__ int8_t round_clamp_int8(float v) {
  if (v != v) return 0;
  v = fminf(fmaxf(v, -kQMax), kQMax);
  return static_cast<int8_t>(__float_as_uint(__fadd_rn(v, 12582912.f)) & 0xFFu);
}

// round_clamp_int8(v / s) for one s shared by many v, bit for bit, with a multiply where the division
// is not needed (opt-in, PTQRT_CUDA_QUANT_RECIPROCAL=1): q = v * (1 / s), both correctly rounded, is
// within 3 x 2^-17 of the rounded quotient wherever |v / s| <= 128 and s lies in [2^-100, 2^100]
// (further out both saturate), so the two round to the same integer unless q lies within 2^-14 of a
// half-integer. A group of N values holding such a q (ties included), a NaN, or an s out of range is
// divided instead, all N: on random data about 1 value in 8000 is that close, 3% of warps' groups of
// 8. (A first form with a 2^-10 margin, 40% of warps dividing, ran slower than the division on an
// H100: bench/NOTES.md.) The IEEE division is ~10 instructions a value (reciprocal, refinements, a
// range check, a branch) in kernels Nsight Compute showed issue-bound (74-78% SM throughput).
// Made once per scale (its reciprocal is a division); with recip false every group divides.
struct ScaleDivider {
  float s, r;  // r = 1 / s, or 0 where s is out of range or recip is off (then every group divides)
  __device__ __forceinline__ ScaleDivider(float s_, bool recip)
      : s(s_), r(recip && s_ >= 0x1p-100f && s_ <= 0x1p100f ? 1.f / s_ : 0.f) {}  // (IEEE: correctly rounded)
  template <int N>
  __device__ __forceinline__ void operator()(const float (&v)[N], int8_t (&q)[N]) const {
    bool exact = r != 0.f;
    if (exact) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float t = fminf(fmaxf(v[j] * r, -kQMax), kQMax);
        const float big = __fadd_rn(t, 12582912.f);  // t rounded half to even, as in round_clamp_int8
        const float off = fabsf(__fsub_rn(t, __fsub_rn(big, 12582912.f)));  // |t - rint(t)|, exact
        exact = exact && off < 0.49993896484375f && v[j] == v[j];  // 0.5 - 2^-14
        q[j] = static_cast<int8_t>(__float_as_uint(big) & 0xFFu);
      }
    }
    if (!exact) {
#pragma unroll
      for (int j = 0; j < N; ++j) q[j] = round_clamp_int8(v[j] / s);
    }
  }
};

// ------------------------------------------------------------------ warp reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The CTA's WARPS warps' partial sums acc[NT][4] (one per lane) added up through shared memory, in
// warp order from zero; warp 0 gets the sums back in acc and true, the other warps false.
template <typename A, int WARPS, int NT>
__device__ __forceinline__ bool sum_over_warps(A (&acc)[NT][4], int warp, int lane) {
  __shared__ A red[WARPS][NT][4][kWarp];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) red[warp][i][r][lane] = acc[i][r];
  __syncthreads();
  if (warp != 0) return false;
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      A v = 0;
#pragma unroll
      for (int q = 0; q < WARPS; ++q) v += red[q][i][r][lane];
      acc[i][r] = v;
    }
  return true;
}

// ------------------------------------------------------------------ async copies and tensor-core ops
// Under PTQRT_CUDA_EMU (the CPU emulator in csrc/cuda/emu, used by the CPU tests) these come from
// emu/emu.h instead, with the same signatures and the PTX-specified fragment layouts.
#ifndef PTQRT_CUDA_EMU
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg: tiles are reused from shared memory, not L1).
// pred == false writes 16 zero bytes and reads nothing; `src` must still be a valid address.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(n));
}
// 4- and 8-byte global -> shared copies (through L1: .cg takes only 16 bytes).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices; lane i gives the row address for matrix i / 8, row i % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// D = A * B + D, A 16x32 s8 (row), B 32x8 s8 (col), D 16x8 s32. Exact integer arithmetic.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A * B + D, A 16x16 (row), B 16x8 (col) in fp16 or bf16, D 16x8 fp32.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // PTQRT_CUDA_EMU

// Grouped tile order: GROUP consecutive tile rows share their B (weight) tiles while they are in L2.
__device__ __forceinline__ void grouped_tile(int pid, int tiles_m, int tiles_n, int group, int& tm, int& tn) {
  const int per_group = group * tiles_n;
  const int first_m = (pid / per_group) * group;
  const int rows = min(tiles_m - first_m, group);
  tm = first_m + (pid % per_group) % rows;
  tn = (pid % per_group) / rows;
}

// Split-K over blockIdx.z: this CTA's K tiles (of bk) are [kt_begin, kt_begin + nk); splits of whole
// tiles, the last one takes what is left (nk may be 0 when K has fewer tiles than splits).
__device__ __forceinline__ void split_k_tiles(int K, int bk, int& kt_begin, int& nk) {
  const int kt_total = ceil_div(K, bk);
  const int kt_per = ceil_div(kt_total, static_cast<int>(gridDim.z));
  kt_begin = blockIdx.z * kt_per;
  nk = max(0, min(kt_total, kt_begin + kt_per) - kt_begin);
}

}  // namespace cuda
}  // namespace ptqrt
