// w8a16_gemm: y [M, N] = x [M, K] . (w_q [N, K] * w_scale)^T + bias, computed in fp32, returned in x.dtype.
//
// Weights stay int8 in memory and are dequantized in registers (int8 -> fp32, times the group's
// scale), which is what makes the decode (small M) case fast: it reads a quarter of fp32's bytes.
// Per channel (group_size 0) the scale is applied once to each finished dot product; per group the
// loop runs one segment per group and scales the weight vector as it is converted, so a group never
// has to be a multiple of the vector width (a partial vector is masked). Blocking and threading as
// in gemm_w8a8.cpp; the mr rows of x are converted to fp32 once per tile row (zero-padded), so the
// inner loop reads plain fp32 whatever x's dtype (fp32, bf16 or fp16). From kW8A16PanelMinRows rows
// (compute-bound: each weight meets many rows) the AVX2 path is an fp32 outer-product kernel on
// weights dequantized once per block, 16 columns x one K chunk at a time (see block_panel_avx2).
// AVX-512 CPUs run the same tiles at 16 lanes and the panel kernel 32 columns wide
// (gemm_w8a16_avx512.h; its emulation under avx512-emulated; PTQRT_CPU_W8A16_AVX512=0 keeps them on
// AVX2's).
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace ptqrt_cpu {

namespace {

struct W8A16Block {
  const float* xf;  // [mr, ldxf] fp32 rows of x, filled per tile row by the block function
  int64_t ldxf;
  const int8_t* w;  // [nb, K]
  int64_t ldw;
  const float* ws;  // per channel: [nb]; per group: [nb, G]
  int64_t G, gsize;  // G = 0: per channel
  int64_t K;
  float* c;  // [mr, nr] fp32 results
  int64_t ldc;
};

// Row stride of the fp32 copy of x: a multiple of 8 plus 8 more, so an 8-wide load that starts at
// any k < K stays inside the row (the extra lanes are masked or multiply zero).
int64_t xf_stride(int64_t K) { return round_up(K, 8) + 8; }

template <class T>
void convert_rows_scalar(const T* x, int64_t ldx, int64_t mr, int64_t K, float* xf, int64_t ldxf) {
  for (int64_t i = 0; i < mr; ++i) {
    int64_t k = 0;
    for (; k < K; ++k) xf[i * ldxf + k] = to_f32(x[i * ldx + k]);
    for (; k < ldxf; ++k) xf[i * ldxf + k] = 0.0f;
  }
}

void tile_scalar(const W8A16Block& b, int64_t mr, int64_t nr) {
  const int64_t nseg = b.G ? b.G : 1, seg = b.G ? b.gsize : b.K;
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) {
      const float* xr = b.xf + i * b.ldxf;
      const int8_t* wr = b.w + j * b.ldw;
      float acc = 0.0f;
      for (int64_t g = 0; g < nseg; ++g) {
        const float s = b.G ? b.ws[j * b.G + g] : 1.0f;
        for (int64_t k = g * seg; k < (g + 1) * seg; ++k) acc += xr[k] * (static_cast<float>(wr[k]) * s);
      }
      b.c[i * b.ldc + j] = b.G ? acc : acc * b.ws[j];
    }
}

// dequant_panel_avx2's result in portable code: weight rows [0, nr) (nr <= 16), k [k0, k0 + kc) ->
// wp [kc][16] fp32, w * its channel's or group's scale, zeros past nr.
inline void dequant_panel_scalar(const int8_t* w, int64_t ldw, int64_t nr, const float* ws, int64_t G, int64_t gsize,
                                 int64_t k0, int64_t kc, float* wp) {
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t j = 0; j < 16; ++j)
      wp[k * 16 + j] = j < nr ? static_cast<float>(w[j * ldw + k0 + k]) * (G ? ws[j * G + (k0 + k) / gsize] : ws[j])
                              : 0.0f;
}

// The dot tiles (AVX2 and AVX-512): 12 accumulators + 3 weight vectors; x is an FMA memory operand.
// A single row uses 1 x 8 instead.
constexpr int kMR = 4, kNR = 3;

// From kW8A16PanelMinRows rows: outer-product (panel) kernels, as in w8a8's AVX2 path. Per K chunk,
// kPanels panels of 16 weight columns are dequantized once (scale applied) into fp32 [kc][16] each,
// and every 6-row group of x (packed once per call as fp32 [group][K][6]) runs against them: no
// horizontal sums, where the dot-product tiles convert each weight vector once per 4 rows and reduce
// every output across lanes. AVX2 takes one panel a step, AVX-512 two (gemm_w8a16_avx512.h).
constexpr int kPR = 6, kPC = 16;
constexpr int64_t kW8A16PanelMinRows = 64;

// x rows [mb, K] (ldx) -> xp [ceil(mb / 6)][K][6] fp32, zeros past mb.
template <class T>
void pack_x_rows6(const T* x, int64_t ldx, int64_t mb, int64_t K, float* xp) {
  for (int64_t g = 0; g < ceil_div(mb, kPR); ++g) {
    const int64_t rows = std::min<int64_t>(kPR, mb - g * kPR);
    const T* src = x + g * kPR * ldx;
    float* d = xp + g * K * kPR;
    for (int64_t k = 0; k < K; ++k, d += kPR)  // written in order; rows past mb get zeros
      for (int64_t i = 0; i < kPR; ++i) d[i] = i < rows ? to_f32(src[i * ldx + k]) : 0.0f;
  }
}

// c [mb, nb] (fp32, ldc) through panels: xp this block's packed x, K in chunks (the groups' x of one
// chunk ~256 KiB, L2), per chunk kPanels * 16 columns dequantized at a time. dequant(w, ldw, nr, ws,
// G, gsize, k0, kc, dst) fills one panel (zeros past nr <= 16); kernel(rows, xg, panels, kc, c, ldc,
// add) runs a 6-row group against the kPanels panels. A step cut short by nb runs on a scratch tile
// (its panels past nb are zeros: computed, never stored), so nothing outside c's [mb, nb] is written.
template <int kPanels, class Dequant, class Kernel>
inline void panel_driver(const float* xp, int64_t mb, const int8_t* w, const float* ws, int64_t nb, int64_t G,
                         int64_t gsize, int64_t K, float* c, int64_t ldc, std::vector<float>& wbuf,
                         const Dequant& dequant, const Kernel& kernel) {
  constexpr int64_t kStep = kPanels * kPC;
  const int64_t groups = ceil_div(mb, kPR), gs = G ? G : 1;
  const int64_t kc_max = std::clamp<int64_t>((256 * 1024) / (groups * kPR * 4) / 8 * 8, 64, 4096);
  if (static_cast<int64_t>(wbuf.size()) < kStep * kc_max + 16) wbuf.resize(kStep * kc_max + 16);
  float* panels[kPanels];
  for (int p = 0; p < kPanels; ++p) panels[p] = align64(wbuf.data()) + p * kPC * kc_max;
  alignas(64) float tile[kPR * kStep];
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    const bool add = k0 > 0;
    for (int64_t n0 = 0; n0 < nb; n0 += kStep) {
      const int64_t nr = std::min(kStep, nb - n0);
      for (int p = 0; p < kPanels; ++p) {
        const int64_t np = std::clamp<int64_t>(nr - p * kPC, 0, kPC), j0 = np ? n0 + p * kPC : 0;
        dequant(w + j0 * K, K, np, ws + j0 * gs, G, gsize, k0, kc, panels[p]);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m0 = g * kPR, mr = std::min<int64_t>(kPR, mb - m0);
        const float* xg = xp + (g * K + k0) * kPR;
        float* cg = c + m0 * ldc + n0;
        if (nr == kStep) {
          kernel(mr, xg, panels, kc, cg, ldc, add);
          continue;
        }
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < kStep; ++j) tile[i * kStep + j] = add && j < nr ? cg[i * ldc + j] : 0.0f;
        kernel(mr, xg, panels, kc, tile, kStep, add);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j) cg[i * ldc + j] = tile[i * kStep + j];
      }
    }
  }
}

#if PTQRT_X86

template <int mr, int nr>
PTQRT_AVX2 void tile_avx2(const W8A16Block& b) {
  __m256 acc[mr][nr];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t nseg = b.G ? b.G : 1, seg = b.G ? b.gsize : b.K;
  for (int64_t g = 0; g < nseg; ++g) {
    const int64_t k1 = (g + 1) * seg;
    __m256 sv[nr];
    for (int j = 0; j < nr; ++j) sv[j] = _mm256_set1_ps(b.G ? b.ws[j * b.G + g] : 1.0f);
    int64_t k = g * seg;
    for (; k + 8 <= k1; k += 8) {
      __m256 wv[nr];
      for (int j = 0; j < nr; ++j) {
        wv[j] = load8_i8(b.w + j * b.ldw + k);
        if (b.G) wv[j] = _mm256_mul_ps(wv[j], sv[j]);
      }
      for (int i = 0; i < mr; ++i) {
        const __m256 xv = _mm256_loadu_ps(b.xf + i * b.ldxf + k);
        for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    if (k < k1) {  // the group's last k1 - k < 8 values; lanes past k1 are zeroed on both sides
      const __m256 lm = lane_mask(k1 - k);
      __m256 wv[nr];
      for (int j = 0; j < nr; ++j) {
        wv[j] = load8_i8_partial(b.w + j * b.ldw + k, k1 - k);
        if (b.G) wv[j] = _mm256_and_ps(_mm256_mul_ps(wv[j], sv[j]), lm);
      }
      for (int i = 0; i < mr; ++i) {
        const __m256 xv = _mm256_and_ps(_mm256_loadu_ps(b.xf + i * b.ldxf + k), lm);
        for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      const float y = hsum(acc[i][j]);
      b.c[i * b.ldc + j] = b.G ? y : y * b.ws[j];
    }
}

// 8 x 8 transpose of floats across r[0..8).
PTQRT_AVX2_INLINE void transpose8x8_ps(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

// Weight rows [0, nr) (nr <= 16), k [k0, k0 + kc) -> wp [kc][16] fp32, w * its channel's or group's
// scale, zeros past nr. 8 rows x 8 k at a time (convert, scale, transpose) where the 8 k share a group.
PTQRT_AVX2 void dequant_panel_avx2(const int8_t* w, int64_t ldw, int64_t nr, const float* ws, int64_t G,
                                   int64_t gsize, int64_t k0, int64_t kc, float* wp) {
  int64_t kv = 0;
  if (nr == kPC && k0 % 8 == 0 && (!G || gsize % 8 == 0)) {
    for (; kv + 8 <= kc; kv += 8)
      for (int h = 0; h < 2; ++h) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          const int64_t j = 8 * h + i;
          const float sc = G ? ws[j * G + (k0 + kv) / gsize] : ws[j];
          r[i] = _mm256_mul_ps(load8_i8(w + j * ldw + k0 + kv), _mm256_set1_ps(sc));
        }
        transpose8x8_ps(r);
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(wp + (kv + q) * kPC + 8 * h, r[q]);
      }
  }
  dequant_panel_scalar(w, ldw, nr, ws, G, gsize, k0 + kv, kc - kv, wp + kv * kPC);  // the last kc % 8 k
}

// The AVX2 panel kernel: one 16-column panel a step (panel_driver<1>), 12 accumulators of 8 lanes,
// per k 2 weight loads + 6 broadcasts per 12 FMAs.
#define PTQRT_FPANEL_ROW(i, lo, hi)                    \
  "vbroadcastss " #i "*4(%[x]), %%ymm14\n\t"           \
  "vfmadd231ps %%ymm14, %%ymm12, %[" #lo "]\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm13, %[" #hi "]\n\t"
#define PTQRT_FPANEL_W PTQRT_PANEL_LOOP_HEAD "vmovups (%[w]), %%ymm12\n\t" "vmovups 32(%[w]), %%ymm13\n\t"
#define PTQRT_FPANEL_OPERANDS PTQRT_PANEL_LOOP_OPERANDS(64, 24)

// c [R, 16] (ldc) = (add ? c : 0) + xp-group . wp over kc values of k (assembly: named accumulators).
template <int R>
PTQRT_AVX2 void fpanel_rx16_avx2(const float* xp, const float* wp, int64_t kc, float* c, int64_t ldc, bool add) {
  static_assert(R >= 1 && R <= kPR, "1 to 6 rows");
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
#define PTQRT_FPANEL_LD(i, h, v) if (add && (i) < R) v = _mm256_loadu_ps(c + (i) * ldc + 8 * (h));
  PTQRT_PANEL_FOR_EACH_ACC(PTQRT_FPANEL_LD)
#undef PTQRT_FPANEL_LD
  static_assert(kPC * 4 == 64 && kPR * 4 == 24, "the asm's per-step strides");
  if (kc > 0) {
    const float* w = wp;
    const float* x = xp;
    int64_t n = kc;
    PTQRT_PANEL_ASM(R, PTQRT_FPANEL_W, PTQRT_FPANEL_ROW, PTQRT_FPANEL_OPERANDS);
  }
#define PTQRT_FPANEL_ST(i, h, v) if ((i) < R) _mm256_storeu_ps(c + (i) * ldc + 8 * (h), v);
  PTQRT_PANEL_FOR_EACH_ACC(PTQRT_FPANEL_ST)
#undef PTQRT_FPANEL_ST
}
#undef PTQRT_FPANEL_ROW
#undef PTQRT_FPANEL_W
#undef PTQRT_FPANEL_OPERANDS

PTQRT_AVX2 void fpanel_avx2(int64_t rows, const float* xp, const float* wp, int64_t kc, float* c, int64_t ldc,
                            bool add) {
  dispatch_panel_rows(rows, [&](auto r) { fpanel_rx16_avx2<decltype(r)::value>(xp, wp, kc, c, ldc, add); });
}

// The AVX2 panel path: one 16-column panel a step.
PTQRT_AVX2 void block_panel_avx2(const float* xp, int64_t mb, const int8_t* w, const float* ws, int64_t nb, int64_t G,
                                 int64_t gsize, int64_t K, float* c, int64_t ldc, std::vector<float>& wbuf) {
  panel_driver<1>(xp, mb, w, ws, nb, G, gsize, K, c, ldc, wbuf, dequant_panel_avx2,
                  [](int64_t rows, const float* xg, const float* const* panels, int64_t kc, float* cc, int64_t ld,
                     bool add) { fpanel_avx2(rows, xg, panels[0], kc, cc, ld, add); });
}

template <class T>
PTQRT_AVX2 void convert_rows_avx2(const T* x, int64_t ldx, int64_t mr, int64_t K, float* xf, int64_t ldxf) {
  for (int64_t i = 0; i < mr; ++i) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(xf + i * ldxf + k, load8(x + i * ldx + k));
    for (; k < K; ++k) xf[i * ldxf + k] = to_f32(x[i * ldx + k]);
    for (; k < ldxf; ++k) xf[i * ldxf + k] = 0.0f;
  }
}
#endif

// ------------------------------------------------------------------------------- AVX-512 tiles
// The two policies gemm_w8a16_avx512.h is instantiated with (16 floats a vector).
#if PTQRT_X86
struct F16x_avx512 {
  using V = __m512;
  PTQRT_AVX512 static inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  PTQRT_AVX512 static inline V zero() { return _mm512_setzero_ps(); }
  PTQRT_AVX512 static inline V set1(float v) { return _mm512_set1_ps(v); }
  PTQRT_AVX512 static inline V load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  PTQRT_AVX512 static inline V load_i8_masked(const int8_t* p, int64_t n) {  // n < 16; reads p[0, n) only
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(first(n), p)));
  }
  PTQRT_AVX512 static inline V loadu(const float* p) { return _mm512_loadu_ps(p); }
  PTQRT_AVX512 static inline V loadu_masked(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  PTQRT_AVX512 static inline V keep_first(V v, int64_t n) { return _mm512_maskz_mov_ps(first(n), v); }
  PTQRT_AVX512 static inline void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void dequant(const int8_t* w, int64_t ldw, int64_t nr, const float* ws, int64_t G, int64_t gsize, int64_t k0,
                      int64_t kc, float* wp) {
    dequant_panel_avx2(w, ldw, nr, ws, G, gsize, k0, kc, wp);
  }
  PTQRT_AVX512 static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  PTQRT_AVX512 static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  PTQRT_AVX512 static inline float hsum(V v) {  // halving adds (as reduce_add would, without its header's warning)
    return ptqrt_cpu::hsum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
};
#endif

// A portable model of the same operations (fused multiply-add included), in the same order.
struct F16xEmulated {
  struct V {
    float f[16];
  };
  static V zero() { return set1(0.0f); }
  static V set1(float v) {
    V r;
    for (float& x : r.f) x = v;
    return r;
  }
  static V load_i8(const int8_t* p) { return load_i8_masked(p, 16); }
  static V load_i8_masked(const int8_t* p, int64_t n) {
    V r;
    for (int64_t l = 0; l < 16; ++l) r.f[l] = l < n ? static_cast<float>(p[l]) : 0.0f;
    return r;
  }
  static V loadu(const float* p) { return loadu_masked(p, 16); }
  static V loadu_masked(const float* p, int64_t n) {
    V r;
    for (int64_t l = 0; l < 16; ++l) r.f[l] = l < n ? p[l] : 0.0f;
    return r;
  }
  static V keep_first(V v, int64_t n) {
    for (int64_t l = n; l < 16; ++l) v.f[l] = 0.0f;
    return v;
  }
  static void storeu(float* p, const V& v) { std::memcpy(p, v.f, sizeof(v.f)); }
  static void dequant(const int8_t* w, int64_t ldw, int64_t nr, const float* ws, int64_t G, int64_t gsize, int64_t k0,
                      int64_t kc, float* wp) {
    dequant_panel_scalar(w, ldw, nr, ws, G, gsize, k0, kc, wp);
  }
  static V mul(V a, const V& b) {
    for (int l = 0; l < 16; ++l) a.f[l] *= b.f[l];
    return a;
  }
  static V fmadd(const V& a, const V& b, V c) {
    for (int l = 0; l < 16; ++l) c.f[l] = std::fma(a.f[l], b.f[l], c.f[l]);
    return c;
  }
  static float hsum(const V& v) {
    float h[8], q[4];
    for (int l = 0; l < 8; ++l) h[l] = v.f[l] + v.f[l + 8];
    for (int l = 0; l < 4; ++l) q[l] = h[l] + h[l + 4];
    const float a = q[0] + q[2], b = q[1] + q[3];
    return a + b;
  }
};

#if PTQRT_X86
#define PTQRT_W16_NS w16_avx512
#define PTQRT_W16_POLICY F16x_avx512
#define PTQRT_W16_TARGET PTQRT_AVX512
#include "gemm_w8a16_avx512.h"
#undef PTQRT_W16_NS
#undef PTQRT_W16_POLICY
#undef PTQRT_W16_TARGET
#endif
#define PTQRT_W16_NS w16_emulated
#define PTQRT_W16_POLICY F16xEmulated
#define PTQRT_W16_TARGET
#include "gemm_w8a16_avx512.h"
#undef PTQRT_W16_NS
#undef PTQRT_W16_POLICY
#undef PTQRT_W16_TARGET

// PTQRT_CPU_W8A16_AVX512=0 keeps AVX-512 CPUs on the AVX2 tiles and panel kernel (the AVX-512 ones
// are the default there; a switch back until an AVX-512 machine has timed both). '0' off; unset,
// empty or '1' on; anything else is refused.
bool w8a16_avx512_switch() { return env_switch("PTQRT_CPU_W8A16_AVX512", true); }

thread_local const char* t_last_path = "none";

using Tile = void (*)(const W8A16Block&);
#if PTQRT_X86
const Tile avx2_tiles[kMR][kNR] = {
    {tile_avx2<1, 1>, tile_avx2<1, 2>, tile_avx2<1, 3>},
    {tile_avx2<2, 1>, tile_avx2<2, 2>, tile_avx2<2, 3>},
    {tile_avx2<3, 1>, tile_avx2<3, 2>, tile_avx2<3, 3>},
    {tile_avx2<4, 1>, tile_avx2<4, 2>, tile_avx2<4, 3>},
};
const Tile avx2_row_tiles[8] = {tile_avx2<1, 1>, tile_avx2<1, 2>, tile_avx2<1, 3>, tile_avx2<1, 4>,
                                tile_avx2<1, 5>, tile_avx2<1, 6>, tile_avx2<1, 7>, tile_avx2<1, 8>};
#endif

// c [mb, nb] (fp32, ldc) for rows x [mb, K] of dtype T and weight rows w [nb, K]: the AVX-512 tiles
// where `wide` (native, or their emulation under avx512-emulated), else AVX2's, else scalar.
template <class T>
void block(Isa isa, bool wide, const T* x, int64_t mb, const int8_t* w, const float* ws, int64_t nb, int64_t G,
           int64_t gsize, int64_t K, float* c, int64_t ldc, std::vector<float>& xbuf) {
  const Tile(*tiles)[kNR] = nullptr;
  const Tile* row_tiles = nullptr;
  if (wide && isa == Isa::avx512_emulated) {
    tiles = w16_emulated::tiles;
    row_tiles = w16_emulated::row_tiles;
  }
#if PTQRT_X86
  else if (wide) {
    tiles = w16_avx512::tiles;
    row_tiles = w16_avx512::row_tiles;
  } else if (isa == Isa::avx2 || isa == Isa::avx512) {
    tiles = avx2_tiles;
    row_tiles = avx2_row_tiles;
  }
#endif
  const int64_t MR = tiles != nullptr ? kMR : 1, NR = tiles != nullptr ? kNR : 1;
  const int64_t ldxf = xf_stride(K);
  if (static_cast<int64_t>(xbuf.size()) < MR * ldxf) xbuf.resize(MR * ldxf);
  for (int64_t m0 = 0; m0 < mb; m0 += MR) {
    const int64_t mr = std::min(MR, mb - m0);
    W8A16Block b{xbuf.data(), ldxf, nullptr, K, nullptr, G, gsize, K, nullptr, ldc};
    if (tiles == nullptr) {
      convert_rows_scalar(x + m0 * K, K, mr, K, xbuf.data(), ldxf);
      for (int64_t n0 = 0; n0 < nb; ++n0) {
        b.w = w + n0 * K;
        b.ws = ws + n0 * (G ? G : 1);
        b.c = c + m0 * ldc + n0;
        tile_scalar(b, mr, 1);
      }
      continue;
    }
#if PTQRT_X86
    if (isa != Isa::avx512_emulated)
      convert_rows_avx2(x + m0 * K, K, mr, K, xbuf.data(), ldxf);
    else
#endif
      convert_rows_scalar(x + m0 * K, K, mr, K, xbuf.data(), ldxf);
    const int64_t step = mr == 1 ? 8 : NR;  // one row: eight columns, eight FMA chains hide the FMA latency
    for (int64_t n0 = 0; n0 < nb; n0 += step) {
      const int64_t nr = std::min(step, nb - n0);
      b.w = w + n0 * K;
      b.ws = ws + n0 * (G ? G : 1);
      b.c = c + m0 * ldc + n0;
      (mr == 1 ? row_tiles[nr - 1] : tiles[mr - 1][nr - 1])(b);
    }
  }
}

}  // namespace

// The kernel family this thread's last w8a16_gemm call ran (a test and diagnosis aid: "none" when it
// returned before any kernel, else scalar, avx2-tiles, avx512-tiles, avx2-panel or avx512-panel; the
// emulated AVX-512 kernels report the AVX-512 names).
std::string last_w8a16_path() { return t_last_path; }

at::Tensor w8a16_gemm(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, int64_t group_size) {
  t_last_path = "none";
  TORCH_CHECK(x.dim() == 2 && w_q.dim() == 2 && w_q.scalar_type() == at::kChar && x.is_contiguous() &&
                  w_q.is_contiguous(),
              "ptqrt_cpu.w8a16_gemm: x [M, K] float and w_q [N, K] int8 must be contiguous 2-D; got ", x.sizes(),
              " ", x.scalar_type(), " and ", w_q.sizes(), " ", w_q.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w_q.size(0);
  TORCH_CHECK(w_q.size(1) == K, "ptqrt_cpu.w8a16_gemm: K differs: x ", x.sizes(), ", w_q ", w_q.sizes());
  TORCH_CHECK(group_size >= 0 && (group_size == 0 || K % group_size == 0),
              "ptqrt_cpu.w8a16_gemm: group_size must be 0 or divide K=", K, "; got ", group_size);
  const int64_t G = group_size ? K / group_size : 0;
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                  w_scale.numel() == N * (group_size ? G : 1),
              "ptqrt_cpu.w8a16_gemm: w_scale must be contiguous float32 [N]=", N, " or [N, K/group_size]=[", N, ", ",
              G, "]; got ", w_scale.sizes(), " ", w_scale.scalar_type());
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "ptqrt_cpu.w8a16_gemm: bias must be [N]=", N);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) {  // empty sums (and no scales to read, per group): y = bias or 0, as the reference
    if (bias.has_value()) return out.copy_(bias->to(at::kFloat).expand({M, N}));
    return out.zero_();
  }

  const Isa isa = active_isa();
  const bool avx512_tiles = w8a16_avx512_switch();
  const F32Values bias_f32(bias);
  const float* bs = bias_f32.data();  // (null: none)
  const int8_t* wp = w_q.data_ptr<int8_t>();
  const float* wsp = w_scale.data_ptr<float>();
  // Blocks of up to 128 rows x ~192 KiB of weights, split evenly over the threads; whole panels for
  // the panel kernels (16 columns, 32 on AVX-512), else multiples of the dot tiles' 12 columns.
  const bool panel = (isa == Isa::avx2 || isa == Isa::avx512 || isa == Isa::avx512_emulated) && M >= kW8A16PanelMinRows;
  // The AVX-512 kernels (native, or their emulation): 32-column panels and the wide tiles.
  const bool wide = isa == Isa::avx512_emulated || (isa == Isa::avx512 && avx512_tiles);
  const bool wide_panel = panel && wide;
  t_last_path = wide_panel ? "avx512-panel"
                : panel    ? "avx2-panel"
                : wide     ? "avx512-tiles"
                : isa == Isa::avx2 || isa == Isa::avx512 ? "avx2-tiles"
                                                         : "scalar";
  const Blocking bl = balanced_blocks(M, N, 128, std::min<int64_t>(512, (192 * 1024) / std::max<int64_t>(K, 1)),
                                      wide_panel ? 32 : panel ? 16 : 12, at::get_num_threads());
  const int64_t MB = bl.MB, NB = bl.NB, n_mb = bl.n_mb, n_nb = bl.n_nb;

  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    // From kW8A16PanelMinRows rows: the panel kernels, with x packed once per call as 6-row fp32
    // groups, [m-block][group][K][6].
    Uninit<float> xpanel;
    int64_t xblock = 0;
    if (panel) {
      const int64_t gpb = ceil_div(MB, kPR);  // groups per m-block
      xblock = gpb * kPR * K;
      xpanel = Uninit<float>(n_mb * xblock);
      at::parallel_for(0, n_mb * gpb, 1, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t m0 = (g / gpb) * MB + (g % gpb) * kPR;
          if (m0 >= M) continue;  // a group past the last m-block's rows: never read
          pack_x_rows6(xp + m0 * K, K, std::min<int64_t>(kPR, M - m0), K,
                       xpanel.data() + (g / gpb) * xblock + (g % gpb) * kPR * K);
        }
      });
    }
    using PanelFn = void (*)(const float*, int64_t, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                             float*, int64_t, std::vector<float>&);
    PanelFn panel_fn = w16_emulated::block_panel;
#if PTQRT_X86
    if (isa != Isa::avx512_emulated) panel_fn = wide_panel ? w16_avx512::block_panel : block_panel_avx2;
#endif
    at::parallel_for(0, n_nb * n_mb, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> cbuf(std::min(MB, M) * NB), xbuf;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = (t / n_mb) * NB, m0 = (t % n_mb) * MB;
        const int64_t mb = std::min(MB, M - m0), nb = std::min(NB, N - n0);
        if (!xpanel.empty())
          panel_fn(xpanel.data() + (m0 / MB) * xblock, mb, wp + n0 * K, wsp + n0 * (G ? G : 1), nb, G, group_size,
                   K, cbuf.data(), NB, xbuf);
        else
          block(isa, wide, xp + m0 * K, mb, wp + n0 * K, wsp + n0 * (G ? G : 1), nb, G, group_size, K,
                cbuf.data(), NB, xbuf);
        for (int64_t i = 0; i < mb; ++i)
          for (int64_t j = 0; j < nb; ++j) {
            float y = cbuf[i * NB + j];
            if (bs) y = y + bs[n0 + j];
            op[(m0 + i) * N + n0 + j] = static_cast<T>(y);
          }
      }
    });
  });
  return out;
}

}  // namespace ptqrt_cpu
