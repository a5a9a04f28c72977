// Row primitives of symmetric int8 quantization, shared by quantize.cpp and kv_cache.cpp.
//
//   row_absmax(x, smooth, K)     = max_k |x[k] / smooth[k]|   (NaN if any value is NaN)
//   row_quant(x, smooth, s, K)   q[k] = clamp(round_half_even(x[k] / smooth[k] / s), -127, 127), NaN -> 0
//
// smooth may be null (no division). Both divisions are real IEEE divisions, as in reference.py, so
// q is bit-identical to the reference (a reciprocal multiply would be off by an ulp and flip ties).
// The vector loops and the scalar tails compute the same per-element expression, so the AVX2 and the
// scalar paths agree exactly.
#pragma once

#include "common.h"

namespace ptqrt_cpu {

inline float absmax_scale(float amax) { return amax == 0.0f ? 1.0f : amax / 127.0f; }

inline int8_t quant1(float v) {
  if (std::isnan(v)) return 0;
  v = std::nearbyint(v);  // default rounding mode: half to even
  return static_cast<int8_t>(std::min(std::max(v, -127.0f), 127.0f));
}

template <class T>
inline float smoothed(const T* x, const float* smooth, int64_t k) {
  const float v = to_f32(x[k]);
  return smooth ? v / smooth[k] : v;
}

template <class T>
float row_absmax_scalar(const T* x, const float* smooth, int64_t K, int64_t k0 = 0, float m = 0.0f) {
  bool nan = std::isnan(m);
  for (int64_t k = k0; k < K; ++k) {
    const float a = std::fabs(smoothed(x, smooth, k));
    if (std::isnan(a)) nan = true;
    else m = std::max(m, a);
  }
  return nan ? NAN : m;
}

template <class T>
void row_quant_scalar(const T* x, const float* smooth, float s, int8_t* q, int64_t K, int64_t k0 = 0) {
  for (int64_t k = k0; k < K; ++k) q[k] = quant1(smoothed(x, smooth, k) / s);
}

#if PTQRT_X86
template <class T>
PTQRT_AVX2 float row_absmax_avx2(const T* x, const float* smooth, int64_t K) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 a = load8(x + k), b = load8(x + k + 8);
    if (smooth) {
      a = _mm256_div_ps(a, _mm256_loadu_ps(smooth + k));
      b = _mm256_div_ps(b, _mm256_loadu_ps(smooth + k + 8));
    }
    a = _mm256_and_ps(a, absmask);
    b = _mm256_and_ps(b, absmask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, a);  // a NaN lane may land here: the flag above keeps it
    m1 = _mm256_max_ps(m1, b);
  }
  if (_mm256_movemask_ps(nan)) return NAN;
  // max_ps lets a NaN lane through, so only take the max when no NaN was seen.
  const float m = hmax(_mm256_max_ps(m0, m1));
  return row_absmax_scalar(x, smooth, K, k, m);
}

template <class T>
PTQRT_AVX2 void row_quant_avx2(const T* x, const float* smooth, float s, int8_t* q, int64_t K) {
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = load8(x + k);
    if (smooth) v = _mm256_div_ps(v, _mm256_loadu_ps(smooth + k));
    v = _mm256_div_ps(v, sv);
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> +0
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);  // +-inf -> +-127, as nan_to_num then clamp
    const __m256i i = _mm256_cvtps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
  }
  row_quant_scalar(x, smooth, s, q, K, k);
}
#endif

template <class T>
float row_absmax(Isa isa, const T* x, const float* smooth, int64_t K) {
#if PTQRT_X86
  if (isa == Isa::avx2 || isa == Isa::avx512) return row_absmax_avx2(x, smooth, K);
#endif
  return row_absmax_scalar(x, smooth, K);
}

template <class T>
void row_quant(Isa isa, const T* x, const float* smooth, float s, int8_t* q, int64_t K) {
#if PTQRT_X86
  if (isa == Isa::avx2 || isa == Isa::avx512) return row_quant_avx2(x, smooth, s, q, K);
#endif
  row_quant_scalar(x, smooth, s, q, K);
}

}  // namespace ptqrt_cpu
