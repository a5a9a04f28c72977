// int8 -> fp16 / bf16 / fp32 conversions for weights dequantized in registers (w8a16_gemm).
//
// The magic-number trick replaces one I2F per value (a quarter-rate instruction) with byte permutes
// and one add: q + 128 is a byte b in [1, 255], and a float whose mantissa's low bits are b and whose
// exponent makes the ulp 1 holds exactly (magic + b); subtracting (magic + 128) leaves q exactly.
#pragma once

#include "common.cuh"

namespace ptqrt {
namespace cuda {

// Four int8 packed in a 32-bit word (byte i = element i) -> four exact floats.
__device__ __forceinline__ void int8x4_to_float(uint32_t q4, float (&f)[4]) {
  const uint32_t u = q4 ^ 0x80808080u;  // q + 128 as unsigned bytes
  // 0x4B000000 is 2^23: ulp 1, so 0x4B0000bb == 2^23 + b.
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - 8388736.f;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - 8388736.f;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - 8388736.f;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - 8388736.f;
}

// Four int8 -> two packed pairs of T holding the exact integers (elements 0,1 in lo, 2,3 in hi).
template <typename T> __device__ __forceinline__ void int8x4_to_pairs(uint32_t q4, uint32_t& lo, uint32_t& hi);

template <>
__device__ __forceinline__ void int8x4_to_pairs<__half>(uint32_t q4, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = q4 ^ 0x80808080u;
  // 0x64bb is the half 1024 + b (ulp 1 in [1024, 2048)); subtract 1024 + 128.
  uint32_t l = __byte_perm(u, 0x64646464u, 0x4140);
  uint32_t h = __byte_perm(u, 0x64646464u, 0x4342);
  const __half2 bias = __float2half2_rn(1152.f);
  __half2 lh = __hsub2(*reinterpret_cast<__half2*>(&l), bias);
  __half2 hh = __hsub2(*reinterpret_cast<__half2*>(&h), bias);
  lo = *reinterpret_cast<uint32_t*>(&lh);
  hi = *reinterpret_cast<uint32_t*>(&hh);
}

template <>
__device__ __forceinline__ void int8x4_to_pairs<__nv_bfloat16>(uint32_t q4, uint32_t& lo, uint32_t& hi) {
  // bf16 has too few mantissa bits for the 8-bit trick; go through exact floats (|q| <= 127 is exact in bf16).
  float f[4];
  int8x4_to_float(q4, f);
  __nv_bfloat162 l = __floats2bfloat162_rn(f[0], f[1]);
  __nv_bfloat162 h = __floats2bfloat162_rn(f[2], f[3]);
  lo = *reinterpret_cast<uint32_t*>(&l);
  hi = *reinterpret_cast<uint32_t*>(&h);
}

// Four int8 -> two pairs of T, elements 0, 1 scaled by s_lo and 2, 3 by s_hi (two weight rows of one
// fragment word, each with its own per-group scale), rounded to T.
template <typename T>
__device__ __forceinline__ void int8x4_scaled_rows(uint32_t q4, float s_lo, float s_hi, uint32_t& lo, uint32_t& hi) {
  float f[4];
  int8x4_to_float(q4, f);
  lo = pack_pair<T>(f[0] * s_lo, f[1] * s_lo);
  hi = pack_pair<T>(f[2] * s_hi, f[3] * s_hi);
}

// Four int8 times one scale, rounded to T (per-group dequantization: w = q * s in fp32, then cast).
template <typename T>
__device__ __forceinline__ void int8x4_scaled_pairs(uint32_t q4, float s, uint32_t& lo, uint32_t& hi) {
  int8x4_scaled_rows<T>(q4, s, s, lo, hi);
}

}  // namespace cuda
}  // namespace ptqrt
