// Shared helpers of the CPU kernels: float-dtype dispatch, scalar conversions, and the AVX2 building
// blocks (loads that widen fp32/bf16/fp16 to 8 floats, horizontal sums, exp). Header-only.
#pragma once

// The narrow ATen headers (not ATen/ATen.h): each file compiles in a fraction of the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "isa.h"
#if defined(__unix__)
#include <unistd.h>
#endif

namespace ptqrt_cpu {

// A kernel switch from the environment, read on every call (so tests can flip it): '1' on (1), '0'
// off (0), unset or empty -1; anything else is refused, naming the variable.
inline int env_switch3(const char* name) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return -1;
  TORCH_CHECK(std::strcmp(s, "1") == 0 || std::strcmp(s, "0") == 0, name, " must be '1' (on) or '0' (off); got '", s,
              "'");
  return s[0] == '1';
}
// The same with unset or empty meaning `dflt`.
inline bool env_switch(const char* name, bool dflt) {
  const int v = env_switch3(name);
  return v < 0 ? dflt : v == 1;
}

// Calls f(T{}) with T = float, c10::BFloat16 or c10::Half for the given dtype.
template <class F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16; got ", t);
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

// A float tensor of any of the three dtypes as contiguous fp32 values (small vectors: scales, bias,
// smooth): the tensor itself where it already is one (no copy on every call), else a converted copy;
// empty for none.
class F32Values {
 public:
  explicit F32Values(const std::optional<at::Tensor>& t = std::nullopt) {
    if (t.has_value()) t_ = t->to(at::kFloat).contiguous();
  }
  const float* data() const { return t_.defined() ? t_.data_ptr<float>() : nullptr; }
  int64_t size() const { return t_.defined() ? t_.numel() : 0; }

 private:
  at::Tensor t_;
};

// The last-level (L3) cache a CPU's threads share, in bytes: sysfs's figure for CPU 0 where Linux
// gives one (a VM's sysconf can be far off: 320 MiB for 32 on a 2-vCPU Zen 4), else sysconf's, else
// 32 MiB. Read once.
inline int64_t l3_cache_bytes() {
  static const int64_t bytes = [] {
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long long v = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%lld%c", &v, &unit);
      std::fclose(f);
      if (got >= 1 && v > 0) return static_cast<int64_t>(v) << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
    }
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (v > 0) return static_cast<int64_t>(v);
#endif
    return int64_t(32) << 20;
  }();
  return bytes;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
// A GEMM driver's tasks: n_mb m-blocks of MB rows and n_nb n-blocks of NB columns (the last of each
// may be shorter), task t = (n-block t / n_mb, m-block t % n_mb).
struct Blocking {
  int64_t MB, NB, n_mb, n_nb;
};

// Blocks that split evenly over the threads. at::parallel_for gives each thread one contiguous run
// of ceil(tasks / threads) tasks, so 9 equal tasks on 2 threads take as long as 10 (MiniLM's 384-row
// layers were 9 tasks: 128-row m-blocks x 3 n-blocks). m-blocks: as few as keep each within mb_max
// rows, MB = ceil(M / n_mb) each (the last up to n_mb - 1 rows shorter: 16130 rows are 126 x 128 + 2).
// n-blocks: NB = ceil(N / count) rounded up to a multiple of unit, for the smallest count from
// ceil(N / nb_max) up whose busiest thread does within 2% of an even share of rows x columns, or
// NB = unit; failing both within 256 counts, the most even of those tried (per-task overhead is not
// weighed, so with many threads it may pick narrow blocks for a small gain).
inline Blocking balanced_blocks(int64_t M, int64_t N, int64_t mb_max, int64_t nb_max, int64_t unit,
                                int64_t threads) {
  Blocking b;
  b.n_mb = ceil_div(M, mb_max);
  b.MB = ceil_div(M, b.n_mb);
  threads = std::max<int64_t>(threads, 1);
  nb_max = std::max(unit, nb_max / unit * unit);
  const double even = static_cast<double>(M) * N / threads;
  double best = -1;
  int64_t last_nb = -1;
  for (int64_t c = ceil_div(N, nb_max), tried = 0; tried < 256; ++c, ++tried) {
    const int64_t NB = round_up(ceil_div(N, c), unit);
    if (NB == last_nb) continue;
    last_nb = NB;
    const int64_t n_nb = ceil_div(N, NB), tasks = n_nb * b.n_mb, run = ceil_div(tasks, std::min(threads, tasks));
    double busiest = 0;
    for (int64_t t0 = 0; t0 < tasks; t0 += run) {
      double load = 0;
      for (int64_t t = t0; t < std::min(tasks, t0 + run); ++t)
        load += static_cast<double>(std::min(b.MB, M - (t % b.n_mb) * b.MB)) * std::min(NB, N - (t / b.n_mb) * NB);
      busiest = std::max(busiest, load);
    }
    if (best < 0 || busiest < best) {
      best = busiest;
      b.NB = NB;
      b.n_nb = n_nb;
    }
    if (busiest <= 1.02 * even || NB == unit) break;
  }
  return b;
}

// n values left uninitialised, for packed copies that are written in full before they are read (a
// std::vector would zero them first: one more pass over the data, single-threaded, on every call).
template <class T>
class Uninit {
 public:
  explicit Uninit(int64_t n = 0) : p_(n > 0 ? new T[n] : nullptr) {}
  T* data() const { return p_.get(); }
  bool empty() const { return !p_; }

 private:
  std::unique_ptr<T[]> p_;
};

// The first 64-byte aligned address at or after p (the buffer must have 64 bytes of slack).
template <class T>
T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

#if PTQRT_X86
// The panel (outer-product) kernels' shared skeleton (w8a8 and w8a16, AVX2): an R x 16 tile, R <= 6,
// in 12 named accumulators c00..c51 (row i, 8-column half h: ci0 / ci1; named, never an array or an
// address, or GCC keeps them in memory), one asm statement (the whole k loop) for each row count, built from
// the kernel's own weight-load (W), per-row (ROW(i, lo, hi)) and operand-list (OPS) macros.
#define PTQRT_PANEL_FOR_EACH_ACC(F) \
  F(0, 0, c00) F(0, 1, c01) F(1, 0, c10) F(1, 1, c11) F(2, 0, c20) F(2, 1, c21) \
  F(3, 0, c30) F(3, 1, c31) F(4, 0, c40) F(4, 1, c41) F(5, 0, c50) F(5, 1, c51)
#define PTQRT_PANEL_ASM(R, W, ROW, OPS)                                                                \
  if constexpr (R == 6)                                                                                \
    __asm__ volatile(W ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41) \
                         ROW(5, c50, c51) OPS);                                                        \
  else if constexpr (R == 5)                                                                           \
    __asm__ volatile(W ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) ROW(4, c40, c41) OPS); \
  else if constexpr (R == 4)                                                                           \
    __asm__ volatile(W ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31) OPS);       \
  else if constexpr (R == 3)                                                                           \
    __asm__ volatile(W ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) OPS);                        \
  else if constexpr (R == 2)                                                                           \
    __asm__ volatile(W ROW(0, c00, c01) ROW(1, c10, c11) OPS);                                         \
  else                                                                                                 \
    __asm__ volatile(W ROW(0, c00, c01) OPS)

// The k loop inside the asm statement: W starts with HEAD, OPS with TAIL (pointers %[w] and %[x] step
// by WSTEP and XSTEP bytes, %[n] steps count down to 0; n > 0). The head is aligned to 64 bytes (its
// padding NOPs run once a call). With the loop in C++ around a one-step asm, where the compiler put
// the loop head moved the int8 kernel's speed by ~10% between builds that changed nothing near it
// (one core, 128 x 4096 x 4096).
#define PTQRT_PANEL_LOOP_HEAD ".p2align 6\n1:\n\t"
#define PTQRT_PANEL_LOOP_TAIL(WSTEP, XSTEP) \
  "add $" #WSTEP ", %[w]\n\t" "add $" #XSTEP ", %[x]\n\t" "dec %[n]\n\t" "jnz 1b\n\t"
// The OPS of both panel kernels: the loop's tail, the 12 accumulators and the three loop registers
// in place, ymm12-15 as the kernels' scratch.
#define PTQRT_PANEL_LOOP_OPERANDS(WSTEP, XSTEP)                                                            \
  PTQRT_PANEL_LOOP_TAIL(WSTEP, XSTEP)                                                                      \
  : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21), \
    [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41), [c50] "+x"(c50), [c51] "+x"(c51), \
    [w] "+r"(w), [x] "+r"(x), [n] "+r"(n)                                                                 \
  :                                                                                                        \
  : "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc"

// Calls f(std::integral_constant<int, R>{}) with R = rows (1 to 6): a panel kernel's row count at run time.
template <class F>
inline void dispatch_panel_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

// 8 floats from p[0..8) of fp32 / bf16 / fp16 (bf16 is the top half of an fp32; F16C widens fp16).
PTQRT_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PTQRT_AVX2_INLINE __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PTQRT_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 int8 -> 8 floats (exact).
PTQRT_AVX2_INLINE __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// The first n < 8 int8 values, zeros after; reads no byte past p[n-1].
PTQRT_AVX2_INLINE __m256 load8_i8_partial(const int8_t* p, int64_t n) {
  int8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, static_cast<size_t>(n));
  return load8_i8(buf);
}
// All-ones in the first n lanes.
PTQRT_AVX2_INLINE __m256 lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx));
}

PTQRT_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
PTQRT_AVX2_INLINE int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
PTQRT_AVX2_INLINE float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for x <= 0 (softmax after subtracting the max), about 2 ulp: 2^n * p(r), r = x - n ln2 in
// [-ln2/2, ln2/2], p the degree-6 Taylor/Cephes polynomial. Inputs below -87 flush to 0; NaN stays NaN
// (max/min take the NaN operand second so it passes through).
PTQRT_AVX2_INLINE __m256 exp_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}
#endif

}  // namespace ptqrt_cpu
