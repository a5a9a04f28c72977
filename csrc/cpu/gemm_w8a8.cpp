// w8a8_gemm: y [M, N] = (x_q [M, K] . w_q [N, K]^T in exact int32) * x_scale[m] * w_scale[n] + bias[n].
//
// Both operands are K-contiguous, so each output is a dot product along K and the tile kernels keep
// mr x nr of them in vector accumulators over the whole K (no int32 partials written back), then
// reduce across lanes once. The driver cuts N into blocks of about 192 KiB of weights, which stay in
// L2 while every row block of x streams past them, and runs (n-block, m-block) tasks on
// at::parallel_for. Paths (isa.h): AVX-512 VNNI (vpdpbusd, 64 MACs an instruction), AVX2 (int8
// widened to int16, vpmaddwd: exact for every int8 value, where vpmaddubsw would saturate; an
// outer-product panel kernel from 3 rows up on the weights' cached panel-order copy (pack_cache.h),
// or from 24 rows up repacking them per call when nothing is cached; dot-product tiles below), scalar.
// All three (and the AMX-INT8 tile kernel, gemm_w8a8_amx.h, the default from 16 rows where the CPU
// has AMX) return the same int32 sums; the fp32 epilogue runs in baseline code (no FMA contraction)
// in the reference's order, (float(acc) * x_scale[m]) * w_scale[n] + bias[n], then one cast.
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "pack_cache.h"

namespace ptqrt_cpu {

namespace {

// One task's worth of work: c [mb, nb] = x [mb, K] . w [nb, K]^T.
struct W8A8Block {
  const int8_t* x;
  int64_t ldx;
  const int32_t* xsum;     // [mb]: 128 * sum_k x, wrapped to int32 (VNNI paths only)
  const int16_t* xpanel;   // this m-block's x as 6-row int16 groups (AVX2 panel path only)
  const int8_t* wpanels;   // this n-block's weights in panel order, cached (AVX2 panel path), or null
  const int8_t* wquads;    // this n-block's weights as 32-column quads, cached (VNNI GEMV, panel, AMX), or null
  const int32_t* wcorr;    // with wquads: 128 * sum_k w of this n-block's columns
  const uint8_t* xquads;   // this m-block's x ^ 0x80 as 8-row groups of 4-byte k quads (VNNI GEMV and panel)
  const int8_t* w;
  int64_t ldw;
  int64_t mb, nb, K;
  int32_t* c;
  int64_t ldc;
  const int8_t* xamx = nullptr;  // AMX path: this m-block's rows of x padded to 64 k (gemm_w8a8_amx.h)
  const int8_t* wquads_next = nullptr;  // with wquads: the next n-block's quads (none past the last)
  int64_t gemv_ahead = 0;  // VNNI GEMV form: prefetch distance into L2 on each weight stream (0: none)
};
using BlockFn = void (*)(const W8A8Block&);

// ------------------------------------------------------------------------------------------ scalar
void block_scalar(const W8A8Block& b) {
  for (int64_t i = 0; i < b.mb; ++i) {
    const int8_t* xr = b.x + i * b.ldx;
    for (int64_t j = 0; j < b.nb; ++j) {
      const int8_t* wr = b.w + j * b.ldw;
      uint32_t acc = 0;  // wraps like the vector paths (defined in C++); the final sum fits in int32
      for (int64_t k = 0; k < b.K; ++k) acc += static_cast<uint32_t>(int32_t(xr[k]) * int32_t(wr[k]));
      b.c[i * b.ldc + j] = static_cast<int32_t>(acc);
    }
  }
}

// A panel kernel's tile that reaches past the output ([mr, nr] of it inside) runs on a scratch tile
// (ld apart): seeded from c's part (or zeros), then that part is copied back, so nothing outside the
// output is read or written. Shared by the AVX2 and VNNI panel kernels.
inline void scratch_in(const int32_t* c, int64_t ldc, int64_t mr, int64_t nr, bool add, int32_t* t, int64_t ld) {
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) t[i * ld + j] = add ? c[i * ldc + j] : 0;
}
inline void scratch_out(int32_t* c, int64_t ldc, int64_t mr, int64_t nr, const int32_t* t, int64_t ld) {
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = t[i * ld + j];
}

#if PTQRT_X86
// -------------------------------------------------------------------------------------------- AVX2
// int8 widened to int16 and multiplied with vpmaddwd, which adds two int16 products
// (|.| <= 2 * 128 * 128 = 32768) into an int32 lane: exact for every int8 value (vpmaddubsw would
// saturate). x rows are widened once per block into a zero-padded int16 panel (K16 = K rounded up to
// 16); weight rows are widened as they are loaded, and their last K % 16 bytes are copied to a
// zeroed buffer so that no load reads past a row.
//
// The kernels name their accumulators and add into them with an asm vpaddd: with arrays of
// accumulators GCC kept every product live and copied each sum back (a vmovdqa per product), as
// costly as the adds themselves.
#define PTQRT_MADD(acc, x, w)                                      \
  do {                                                             \
    const __m256i p_ = _mm256_madd_epi16((x), (w));                \
    __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(p_));            \
  } while (0)

PTQRT_AVX2_INLINE __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PTQRT_AVX2_INLINE __m256i load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// rows x rows [ldx apart, K int8 each] -> dst rows K16 apart as int16, zeros in [K, K16).
PTQRT_AVX2 void widen_rows_avx2(const int8_t* x, int64_t ldx, int64_t rows, int64_t K, int64_t K16, int16_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const int8_t* xr = x + i * ldx;
    int16_t* d = dst + i * K16;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k), widen16(xr + k));
    for (; k < K; ++k) d[k] = xr[k];
    for (; k < K16; ++k) d[k] = 0;
  }
}

// Weight row j's bytes [k, k + 16) as a pointer: the row itself, or a zero-padded copy of its tail.
struct WTail {
  alignas(16) int8_t buf[16];
  const int8_t* at(const int8_t* row, int64_t k, int64_t K) {
    if (k + 16 <= K) return row + k;
    std::memset(buf, 0, 16);
    std::memcpy(buf, row + k, static_cast<size_t>(K - k));
    return buf;
  }
};

// c[i][j] for 4 rows of the x panel and 2 weight rows (w1 may repeat w0 when only one is wanted).
PTQRT_AVX2 void tile4x2_avx2(const int16_t* xw, int64_t ldxw, const int8_t* w0, const int8_t* w1, int64_t K,
                             int32_t* c, int64_t ldc, int64_t nr) {
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const int16_t *x0 = xw, *x1 = xw + ldxw, *x2 = xw + 2 * ldxw, *x3 = xw + 3 * ldxw;
  WTail t0, t1;
  for (int64_t k = 0; k < K; k += 16) {
    const __m256i v0 = widen16(t0.at(w0, k, K)), v1 = widen16(t1.at(w1, k, K));
    __m256i x = load16(x0 + k);
    PTQRT_MADD(a00, x, v0);
    PTQRT_MADD(a01, x, v1);
    x = load16(x1 + k);
    PTQRT_MADD(a10, x, v0);
    PTQRT_MADD(a11, x, v1);
    x = load16(x2 + k);
    PTQRT_MADD(a20, x, v0);
    PTQRT_MADD(a21, x, v1);
    x = load16(x3 + k);
    PTQRT_MADD(a30, x, v0);
    PTQRT_MADD(a31, x, v1);
  }
  c[0] = hsum(a00), c[ldc] = hsum(a10), c[2 * ldc] = hsum(a20), c[3 * ldc] = hsum(a30);
  if (nr > 1) c[1] = hsum(a01), c[ldc + 1] = hsum(a11), c[2 * ldc + 1] = hsum(a21), c[3 * ldc + 1] = hsum(a31);
}

// One or two rows of the x panel against 4 weight rows (decode, and rows left over from the 4-row
// tiles): each weight vector loaded once for both x rows.
template <int R>
PTQRT_AVX2 void tile_rx4_avx2(const int16_t* xw, int64_t ldxw, const int8_t* w0, const int8_t* w1, const int8_t* w2,
                              const int8_t* w3, int64_t K, int32_t* c, int64_t ldc, int64_t nr) {
  static_assert(R == 1 || R == 2, "1 or 2 x rows (8 accumulators + 2 x + 1 weight + 1 product: 12 of 16 ymm)");
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  const int16_t* x1 = xw + (R > 1 ? ldxw : 0);
#define PTQRT_RX4_STEP(p0, p1, p2, p3)                    \
  do {                                                    \
    const __m256i x = load16(xw + k);                     \
    const __m256i y = R > 1 ? load16(x1 + k) : x;         \
    __m256i v = widen16(p0);                              \
    PTQRT_MADD(a0, x, v);                                 \
    if (R > 1) PTQRT_MADD(b0, y, v);                      \
    v = widen16(p1);                                      \
    PTQRT_MADD(a1, x, v);                                 \
    if (R > 1) PTQRT_MADD(b1, y, v);                      \
    v = widen16(p2);                                      \
    PTQRT_MADD(a2, x, v);                                 \
    if (R > 1) PTQRT_MADD(b2, y, v);                      \
    v = widen16(p3);                                      \
    PTQRT_MADD(a3, x, v);                                 \
    if (R > 1) PTQRT_MADD(b3, y, v);                      \
  } while (0)
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) PTQRT_RX4_STEP(w0 + k, w1 + k, w2 + k, w3 + k);
  if (k < K) {  // the last K % 16 bytes of each row, from zero-padded copies (no read past a row)
    WTail t0, t1, t2, t3;
    PTQRT_RX4_STEP(t0.at(w0, k, K), t1.at(w1, k, K), t2.at(w2, k, K), t3.at(w3, k, K));
  }
#undef PTQRT_RX4_STEP
  const int32_t r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
  for (int64_t j = 0; j < nr; ++j) c[j] = r[j];
  if (R > 1) {
    const int32_t q[4] = {hsum(b0), hsum(b1), hsum(b2), hsum(b3)};
    for (int64_t j = 0; j < nr; ++j) c[ldc + j] = q[j];
  }
}
#undef PTQRT_MADD

#include "gemm_w8a8_avx2_panel.h"

PTQRT_AVX2 void block_avx2(const W8A8Block& b) {
  if (b.wpanels && b.mb < kPackedMinRows) return block_gemv_avx2(b);
  if (b.xpanel) return block_panel_avx2(b);
  const int64_t K16 = round_up(b.K, 16);
  // 64-byte aligned, so no 32-byte load of a row splits a cache line (K16 keeps every row aligned):
  // from a std::vector's 16-byte alignment half of them did, and the kernel ran 20% slower.
  thread_local std::vector<int16_t> xw_buf;
  if (static_cast<int64_t>(xw_buf.size()) < 4 * K16 + 32) xw_buf.resize(4 * K16 + 32);
  int16_t* const xw = align64(xw_buf.data());
  for (int64_t m0 = 0; m0 < b.mb; m0 += 4) {
    const int64_t mr = std::min<int64_t>(4, b.mb - m0);
    widen_rows_avx2(b.x + m0 * b.ldx, b.ldx, mr, b.K, K16, xw);  // once here, for every n tile of the block
    int32_t* c = b.c + m0 * b.ldc;
    const int8_t* w = b.w;
    const int64_t ldw = b.ldw;
    if (mr == 4) {
      for (int64_t n0 = 0; n0 < b.nb; n0 += 2) {
        const int64_t nr = std::min<int64_t>(2, b.nb - n0);
        tile4x2_avx2(xw, K16, w + n0 * ldw, w + (n0 + nr - 1) * ldw, b.K, c + n0, b.ldc, nr);
      }
      continue;
    }
    // Rows in pairs, one pass over the block's weights per pair (M = 2, 3 and the rows past a multiple
    // of 4; same process, A/B against one row a pass: 1.22-1.27x at M = 2, 1.15x at M = 3).
    for (int64_t i = 0; i < mr; i += 2)
      for (int64_t n0 = 0; n0 < b.nb; n0 += 4) {
        const int64_t nr = std::min<int64_t>(4, b.nb - n0);
        auto row = [&](int64_t j) { return w + (n0 + std::min(j, nr - 1)) * ldw; };
        int32_t* ci = c + i * b.ldc + n0;
        if (i + 1 < mr)
          tile_rx4_avx2<2>(xw + i * K16, K16, row(0), row(1), row(2), row(3), b.K, ci, b.ldc, nr);
        else
          tile_rx4_avx2<1>(xw + i * K16, K16, row(0), row(1), row(2), row(3), b.K, ci, b.ldc, nr);
      }
  }
}

// ------------------------------------------------------------------------------- AVX-512 VNNI
// The two policies gemm_w8a8_vnni.h is instantiated with. Same operation, same argument order:
// dpbusd(acc, u8, s8) adds, to each int32 lane, the four products u8[4l+t] * s8[4l+t] (wrapping).
struct Vnni512Native {
  using V = __m512i;
  using Mask = __mmask64;
  PTQRT_AVX512 static inline V zero() { return _mm512_setzero_si512(); }
  PTQRT_AVX512 static inline V set1_u8(uint8_t v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  PTQRT_AVX512 static inline V loadu(const int8_t* p) { return _mm512_loadu_si512(p); }
  PTQRT_AVX512 static inline Mask tail_mask(int64_t n) { return n >= 64 ? ~Mask(0) : (Mask(1) << n) - 1; }
  PTQRT_AVX512 static inline V maskz_loadu(Mask m, const int8_t* p) { return _mm512_maskz_loadu_epi8(m, p); }
  PTQRT_AVX512 static inline V xor_(V a, V b) { return _mm512_xor_si512(a, b); }
  // In assembly with the accumulator tied in place ("+v"): from the intrinsic, GCC copied every
  // accumulator of an unrolled tile to a fresh register each step (and spilled some).
  PTQRT_AVX512 static inline V dpbusd(V acc, V u8, V s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
  }
  PTQRT_AVX512 static inline V bcast4(const uint8_t* p) {  // the 4 bytes at p in every 32-bit lane
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  PTQRT_AVX512 static inline V sub_i32(V a, V b) { return _mm512_sub_epi32(a, b); }
  PTQRT_AVX512 static inline void prefetch_l2(const int8_t* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
  }
  PTQRT_AVX512 static inline void storeu(int8_t* p, V v) { _mm512_storeu_si512(p, v); }
  // Halving adds (wrapping, like the lanes): 7 instructions where a store and 16 scalar loads and
  // adds took ~33, 16 times per 4 x 4 tile. (_mm512_reduce_add_epi32 trips GCC 12's
  // -Wuninitialized inside its own header.)
  PTQRT_AVX512 static inline uint32_t reduce_add(V v) {
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4e));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(q));
  }
};
#endif

// A portable model of the same instructions (a 64-byte register as bytes).
struct Vnni512Emulated {
  struct V {
    uint8_t b[64];
  };
  using Mask = uint64_t;
  static V zero() { return set1_u8(0); }
  static V set1_u8(uint8_t v) {
    V r;
    std::memset(r.b, v, 64);
    return r;
  }
  static V loadu(const int8_t* p) {
    V r;
    std::memcpy(r.b, p, 64);
    return r;
  }
  static Mask tail_mask(int64_t n) { return n >= 64 ? ~Mask(0) : (Mask(1) << n) - 1; }
  static V maskz_loadu(Mask m, const int8_t* p) {  // like the instruction, touches no masked-off byte
    V r;
    for (int t = 0; t < 64; ++t) r.b[t] = ((m >> t) & 1) ? static_cast<uint8_t>(p[t]) : 0;
    return r;
  }
  static V xor_(V a, V b) {
    for (int t = 0; t < 64; ++t) a.b[t] ^= b.b[t];
    return a;
  }
  static V dpbusd(V acc, V u8, V s8) {
    for (int l = 0; l < 16; ++l) {
      uint32_t a;
      std::memcpy(&a, acc.b + 4 * l, 4);
      for (int t = 4 * l; t < 4 * l + 4; ++t)
        a += static_cast<uint32_t>(int32_t(u8.b[t]) * int32_t(static_cast<int8_t>(s8.b[t])));
      std::memcpy(acc.b + 4 * l, &a, 4);
    }
    return acc;
  }
  static V bcast4(const uint8_t* p) {
    V r;
    for (int l = 0; l < 16; ++l) std::memcpy(r.b + 4 * l, p, 4);
    return r;
  }
  static V sub_i32(V a, V b) {  // per 32-bit lane, wrapping
    for (int l = 0; l < 16; ++l) {
      uint32_t x, y;
      std::memcpy(&x, a.b + 4 * l, 4);
      std::memcpy(&y, b.b + 4 * l, 4);
      x -= y;
      std::memcpy(a.b + 4 * l, &x, 4);
    }
    return a;
  }
  static void prefetch_l2(const int8_t*) {}  // (a hint: nothing to model)
  static void storeu(int8_t* p, V v) { std::memcpy(p, v.b, 64); }
  static uint32_t reduce_add(V v) {
    uint32_t s = 0;
    for (int l = 0; l < 16; ++l) {
      uint32_t a;
      std::memcpy(&a, v.b + 4 * l, 4);
      s += a;
    }
    return s;
  }
};

// The VNNI panel path's x, once per call: each m-block (mblock rows) as 8-row groups of 4-byte k
// quads, x ^ 0x80 (the u8 operand of vpdpbusd): [block][group][K / 4][8][4]. k past the end is 0
// (the packed weights are 0 there, so it adds nothing); a last group's rows past M are left unwritten,
// as the kernels read only a block's own rows (and no memory is zeroed per call). The panel path runs from
// kVnniPanelMinRows rows when it repacks the weights per call (a guess: the AVX2 kernel's crossover
// was 24 on Zen 3), and at every M on the weights' cached copy: its GEMV form below
// kVnniGemvRows + 1 rows, the panel kernel from there (measured on a 2-core Zen 4, bench/NOTES.md:
// the dot tiles on w as it is ran 0.68-0.93x the GEMV form at 1-3 rows, 0.60-0.86x the panel kernel
// at 16).
constexpr int64_t kVnniPanelMinRows = 32, kVnniPackedMinRows = 1, kVnniGemvRows = 6;
// PTQRT_CPU_VNNI_PANEL_ROWS=R moves both crossovers to R rows (a diagnosis knob: bench_cpu.py times
// M = 1 and 16 with the dot tiles beside the default). Read on every call; 0: unset.
// The VNNI GEMV's software prefetch: each weight stream prefetches into L2 the line this many bytes
// ahead (0: none). By default 8 KiB on a weight larger than the L3 (which comes from memory on every
// call), except on Zen 5: a 2-core Zen 4 measured it 1.09-1.12x there (1.10x at 2 rows; 0.91x on a
// weight the L3 holds, hence the gate); a 2-core Zen 5 measured it 0.70-0.85x on one 45 MB weight and
// 0.94-0.96x cycling through six (270 MB, every call from memory), at 1, 2 and 4 rows (bench/NOTES.md).
// PTQRT_CPU_GEMV_PREFETCH=B sets B bytes whatever the weight and the CPU (a diagnosis knob: 0 turns
// it off). Read on every call.
int64_t gemv_prefetch_bytes(int64_t weight_bytes) {
  const char* s = std::getenv("PTQRT_CPU_GEMV_PREFETCH");
  if (s == nullptr || *s == '\0') return weight_bytes > l3_cache_bytes() && amd_family() < 26 ? 8192 : 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && v >= 0 && v % 64 == 0 && v <= (1 << 20),
              "PTQRT_CPU_GEMV_PREFETCH must be a whole number of bytes, a multiple of 64 from 0 to 1048576; got '", s,
              "'");
  return v;
}

int64_t vnni_rows_override() {
  const char* s = std::getenv("PTQRT_CPU_VNNI_PANEL_ROWS");
  if (s == nullptr || *s == '\0') return 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && v >= 1, "PTQRT_CPU_VNNI_PANEL_ROWS must be a whole number of rows >= 1; got '",
              s, "'");
  return v;
}
constexpr int kVnniLayout = 2;  // the VNNI quads' tag in the packed-weight cache
Uninit<uint8_t> pack_x_quads(const int8_t* x, int64_t M, int64_t K, int64_t mblock) {
  const int64_t nq = ceil_div(K, 4), gpb = ceil_div(mblock, 8), blocks = ceil_div(M, mblock);
  Uninit<uint8_t> xq(blocks * gpb * 8 * 4 * nq);
  // Over every block's 8-row groups (one m-block of 128 rows is 16 of them), each in its output order:
  // a quad of each of its rows, 32 bytes written in a row; threads from 64 KiB of x a task (2 threads
  // on a Zen 4, 128 x 4096: 36 us less than one block a task, so one thread a block).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(8 * K, 1));
  at::parallel_for(0, blocks * gpb, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t m0 = (g / gpb) * mblock + (g % gpb) * 8;
      const int64_t rows = std::min<int64_t>({8, mblock - (g % gpb) * 8, M - m0});
      if (rows <= 0) continue;  // a group past the last block's rows: never read
      const int8_t* src = x + m0 * K;
      uint8_t* d = xq.data() + g * 8 * 4 * nq;
      int64_t q = 0;
      for (; 4 * q + 4 <= K; ++q, d += 32)
        for (int64_t i = 0; i < rows; ++i) {  // one 32-bit xor flips a quad's four sign bits
          uint32_t v;
          std::memcpy(&v, src + i * K + 4 * q, 4);
          v ^= 0x80808080u;
          std::memcpy(d + 4 * i, &v, 4);
        }
      if (q < nq)  // the last, partial quad: zeros past K
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t k = 4 * q; k < 4 * q + 4; ++k) d[4 * i + k % 4] = k < K ? static_cast<uint8_t>(src[i * K + k]) ^ 0x80u : 0;
    }
  });
  return xq;
}

// ---------------------------------------------------------------------------------------- AMX-INT8
// The two policies gemm_w8a8_amx.h is instantiated with: 8 tile registers of 16 rows x 64 bytes.
// dp<c, a, b>: tile c (int32 [16][16]) += tile a (int8 [16][64]) . tile b (int8 [16 quads][16][4]).
#if PTQRT_AMX_NATIVE
// The instructions in inline assembly (AT&T operand order), the tile number an immediate: the
// compiler's _tile_* macros take only literal numbers. Loads name "memory": the copies made just
// before them (the zero-padded tails) must not be moved past.
struct AmxNative {
  static void config(const void* cfg) { __asm__ volatile("ldtilecfg (%0)" ::"r"(cfg) : "memory"); }
  static void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int t>
  static void zero() { __asm__ volatile("tilezero %%tmm%c0" ::"i"(t)); }
  template <int t>
  static void load(const void* p, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(t) : "memory");
  }
  template <int t>
  static void store(void* p, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(t) : "memory");
  }
  template <int c, int a, int b>
  static void dp() { __asm__ volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(c), "i"(a), "i"(b)); }
};
#endif

// A portable model of the same instructions (each thread its own 8 tiles, as each core has).
struct AmxEmulated {
  struct Tiles {
    uint8_t t[8][16 * 64];
  };
  static Tiles& tiles() {
    thread_local Tiles r;
    return r;
  }
  static void config(const void*) {}
  static void release() {}
  template <int t>
  static void zero() { std::memset(tiles().t[t], 0, 16 * 64); }
  template <int t>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(tiles().t[t] + r * 64, static_cast<const uint8_t*>(p) + r * stride, 64);
  }
  template <int t>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, tiles().t[t] + r * 64, 64);
  }
  template <int c, int a, int b>
  static void dp() {
    Tiles& x = tiles();
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) {
        uint32_t acc;
        std::memcpy(&acc, x.t[c] + m * 64 + n * 4, 4);
        for (int q = 0; q < 16; ++q)
          for (int u = 0; u < 4; ++u)
            acc += static_cast<uint32_t>(int32_t(static_cast<int8_t>(x.t[a][m * 64 + q * 4 + u])) *
                                         int32_t(static_cast<int8_t>(x.t[b][q * 64 + n * 4 + u])));
        std::memcpy(x.t[c] + m * 64 + n * 4, &acc, 4);
      }
  }
};

// The AMX-INT8 tile kernel for the VNNI path's calls on cached quads (calls without them, with the
// cache off or full, keep the VNNI kernels: last_w8a8_path() says which ran). PTQRT_CPU_AMX unset or
// empty: on where the CPU and OS offer AMX, from kAmxMinRows rows (measured on a 2-core AMX Xeon,
// bench/NOTES.md: 1.61-2.08x the VNNI panel kernel at M = 16 and 1.61-2.39x at M = 128, but
// 0.67-0.81x at M = 1, where 15 of a tile's 16 rows are padding; the first such call on Linux asks
// the OS for the process's AMX permission, which enlarges its signal frames); '1': at every M with
// quads (on a CPU with AVX-512 VNNI but no AMX, or an OS that withholds it, refused; under
// avx512-emulated the emulated tile kernel); '0': off. AVX2 and scalar paths have nothing for it to change. Anything else
// is refused on every path.
constexpr int64_t kAmxMinRows = 16;
enum class AmxMode { Auto, On, Off };
AmxMode amx_mode() {
  const int v = env_switch3("PTQRT_CPU_AMX");
  return v < 0 ? AmxMode::Auto : v == 1 ? AmxMode::On : AmxMode::Off;
}

// x [M, K] -> [M + 16][round_up(K, 64)], zeros past K and in the 16 rows past M (the tile kernel
// reads whole 16 x 64 tiles). Each byte written once (no zero fill first).
Uninit<int8_t> pad_x_amx(const int8_t* x, int64_t M, int64_t K) {
  const int64_t kp = round_up(K, 64);
  Uninit<int8_t> xp((M + 16) * kp);
  at::parallel_for(0, M, std::max<int64_t>(1, (256 << 10) / kp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      std::memcpy(xp.data() + m * kp, x + m * K, K);
      std::memset(xp.data() + m * kp + K, 0, kp - K);
    }
  });
  std::memset(xp.data() + M * kp, 0, 16 * kp);
  return xp;
}

}  // namespace

#if PTQRT_AMX_NATIVE
#define PTQRT_AMX_NS amx_native
#define PTQRT_AMX_POLICY AmxNative
#include "gemm_w8a8_amx.h"
#undef PTQRT_AMX_NS
#undef PTQRT_AMX_POLICY
#endif
#define PTQRT_AMX_NS amx_emulated
#define PTQRT_AMX_POLICY AmxEmulated
#include "gemm_w8a8_amx.h"
#undef PTQRT_AMX_NS
#undef PTQRT_AMX_POLICY

#if PTQRT_X86
#define PTQRT_VNNI_NS vnni_native
#define PTQRT_VNNI_POLICY Vnni512Native
#define PTQRT_VNNI_TARGET PTQRT_AVX512
#include "gemm_w8a8_vnni.h"
#undef PTQRT_VNNI_NS
#undef PTQRT_VNNI_POLICY
#undef PTQRT_VNNI_TARGET
#endif

#define PTQRT_VNNI_NS vnni_emulated
#define PTQRT_VNNI_POLICY Vnni512Emulated
#define PTQRT_VNNI_TARGET
#include "gemm_w8a8_vnni.h"
#undef PTQRT_VNNI_NS
#undef PTQRT_VNNI_POLICY
#undef PTQRT_VNNI_TARGET

namespace {

// The weights' cached copies (pack_cache.h), packed on first use: VNNI quads (the same portable
// packing for the native and the emulated build) and AVX2 panels. Undefined when not cached.
// snapshot: pack_weight's (see packed_weight).
at::Tensor cached_quads(const at::Tensor& w, int64_t N, int64_t K, bool snapshot = false) {
  return packed_weight(w, kVnniLayout, vnni_emulated::packed_quads_bytes(N, K), [&](const at::Tensor& t, int8_t* dst) {
    vnni_emulated::pack_w_quads_all(t.data_ptr<int8_t>(), N, K, dst);
  }, snapshot);
}
#if PTQRT_X86
at::Tensor cached_panels(const at::Tensor& w, int64_t N, int64_t K, bool snapshot = false) {
  return packed_weight(w, kPanelLayout, packed_panel_bytes(N, K), [&](const at::Tensor& t, int8_t* dst) {
    pack_w_panels_avx2(t.data_ptr<int8_t>(), N, K, dst);
  }, snapshot);
}
#endif

BlockFn pick(Isa isa) {
  switch (isa) {
#if PTQRT_X86
    case Isa::avx512: return vnni_native::block;
    case Isa::avx2: return block_avx2;
#endif
    case Isa::avx512_emulated: return vnni_emulated::block;
    default: return block_scalar;
  }
}

template <class T>
void epilogue(const int32_t* c, int64_t ldc, int64_t m0, int64_t n0, int64_t mb, int64_t nb, const float* xs,
              bool per_token, const float* ws, const float* bias, T* out, int64_t N) {
  for (int64_t i = 0; i < mb; ++i) {
    const float s = xs[per_token ? m0 + i : 0];
    T* o = out + (m0 + i) * N + n0;
    for (int64_t j = 0; j < nb; ++j) {
      float y = static_cast<float>(c[i * ldc + j]) * s;
      y = y * ws[n0 + j];
      if (bias) y = y + bias[n0 + j];
      o[j] = static_cast<T>(y);
    }
  }
}

#if PTQRT_X86
// epilogue<float> 16 outputs at a time (masked at a row's end), the same operations in the same
// order, so the same bits: the scalar loop, in baseline code, took 4% of a 1 x 4096 x 4096 call and
// 3% at 16 x 11008 x 4096 on a Zen 4. The empty asm keeps the compiler from fusing the bias add into
// a multiply-add (which rounds once, not twice).
PTQRT_AVX512 void epilogue_f32_avx512(const int32_t* c, int64_t ldc, int64_t m0, int64_t n0, int64_t mb, int64_t nb,
                                      const float* xs, bool per_token, const float* ws, const float* bias,
                                      float* out, int64_t N) {
  for (int64_t i = 0; i < mb; ++i) {
    const __m512 s = _mm512_set1_ps(xs[per_token ? m0 + i : 0]);
    float* o = out + (m0 + i) * N + n0;
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 m = nb - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nb - j)) - 1);
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, c + i * ldc + j)), s);
      y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, ws + n0 + j));
      if (bias) {
        __asm__("" : "+v"(y));
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, bias + n0 + j));
      }
      _mm512_mask_storeu_ps(o + j, m, y);
    }
  }
}
#endif

}  // namespace

namespace {
thread_local const char* t_last_path = "none";
}  // namespace

// The kernel family this thread's last w8a8_gemm call ran (a test and diagnosis aid: "none" when it
// returned before any kernel, else scalar, avx2-dot, avx2-gemv, avx2-panel, vnni-dot, vnni-gemv,
// vnni-panel or amx; the emulated VNNI / AMX kernels report the same names).
std::string last_w8a8_path() { return t_last_path; }

at::Tensor w8a8_gemm(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  t_last_path = "none";
  TORCH_CHECK(x_q.dim() == 2 && w_q.dim() == 2 && x_q.scalar_type() == at::kChar && w_q.scalar_type() == at::kChar,
              "ptqrt_cpu.w8a8_gemm: x_q [M, K] and w_q [N, K] must be 2-D int8; got ", x_q.sizes(), " ",
              x_q.scalar_type(), " and ", w_q.sizes(), " ", w_q.scalar_type());
  TORCH_CHECK(x_q.is_contiguous() && w_q.is_contiguous(), "ptqrt_cpu.w8a8_gemm: x_q and w_q must be contiguous");
  const int64_t M = x_q.size(0), K = x_q.size(1), N = w_q.size(0);
  TORCH_CHECK(w_q.size(1) == K, "ptqrt_cpu.w8a8_gemm: K differs: x_q ", x_q.sizes(), ", w_q ", w_q.sizes());
  TORCH_CHECK(K <= 131071, "ptqrt_cpu.w8a8_gemm: K=", K,
              " exceeds 131071, past which the int32 sum of int8 products can overflow");
  const bool raw = out_dtype == at::kInt;
  TORCH_CHECK(!raw || !bias.has_value(), "ptqrt_cpu.w8a8_gemm: out_dtype int32 returns the raw sums, with no "
              "epilogue; a bias needs a float out_dtype");
  TORCH_CHECK(raw || x_scale.numel() == M || x_scale.numel() == 1, "ptqrt_cpu.w8a8_gemm: x_scale must be [M]=", M,
              " or [1]; got ", x_scale.sizes());
  TORCH_CHECK(raw || w_scale.numel() == N, "ptqrt_cpu.w8a8_gemm: w_scale must be [N]=", N, "; got ", w_scale.sizes());
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "ptqrt_cpu.w8a8_gemm: bias must be [N]=", N, "; got ",
              bias->sizes());
  at::Tensor out = at::empty({M, N}, x_q.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  if (K == 0 && raw) return out.zero_();  // (the float path's epilogue runs on zero sums)

  const Isa isa = active_isa();
  const BlockFn fn = pick(isa);
  const int8_t* xp = x_q.data_ptr<int8_t>();
  const int8_t* wp = w_q.data_ptr<int8_t>();

  // VNNI: the GEMV form or the panel kernel on the cached 32-column quads from kVnniPackedMinRows
  // rows (or the panel kernel repacking per call from kVnniPanelMinRows), the dot-product tiles below.
  const bool vnni = isa == Isa::avx512 || isa == Isa::avx512_emulated;
  const int64_t rows_knob = vnni ? vnni_rows_override() : 0;
  const AmxMode amx_want = amx_mode();
  const bool amx_on = vnni && (amx_want == AmxMode::On ||
                               (amx_want == AmxMode::Auto && isa == Isa::avx512 && M >= kAmxMinRows && has_amx()));
  TORCH_CHECK(!amx_on || isa == Isa::avx512_emulated || has_amx(),
              "ptqrt_cpu.w8a8_gemm: PTQRT_CPU_AMX=1, but this CPU (or its OS) offers no AMX-INT8 tiles");
  const int64_t packed_min = rows_knob ? rows_knob : kVnniPackedMinRows;
  const int64_t panel_min = rows_knob ? rows_knob : kVnniPanelMinRows;
  const at::Tensor wquads = vnni && K > 0 && M >= packed_min ? cached_quads(w_q, N, K) : at::Tensor();
  const int64_t wquads_stride = ceil_div(K, 4) * 4 * 32;
  const bool vnni_panel = vnni && (wquads.defined() || M >= panel_min);
#if PTQRT_X86
  // AVX2: with the weights' cached panel-order copy, the streaming GEMV below kPackedMinRows rows and
  // the panel kernel from there; without it, the panel kernel from kPanelMinRows rows (repacking the
  // weights per call) and the dot-product tiles below.
  const at::Tensor wpanels = isa == Isa::avx2 && K > 0 ? cached_panels(w_q, N, K) : at::Tensor();
  const int64_t wpanel_stride = ceil_div(K, 2) * 2 * kPanelCols;
  const bool panel = isa == Isa::avx2 && ((wpanels.defined() && M >= kPackedMinRows) || M >= kPanelMinRows);
#endif

  // Blocks: up to 128 rows x ~192 KiB of weights per n-block (L2-resident while the m-blocks stream
  // by), split evenly over the threads (balanced_blocks; n-blocks start on the cached 32-column
  // panels of the VNNI path).
  const int64_t threads = at::get_num_threads();
  Blocking bl = balanced_blocks(M, N, 128, std::min<int64_t>(512, (192 * 1024) / std::max<int64_t>(K, 1)),
                                wquads.defined() ? 32 : 16, threads);
#if PTQRT_X86
  // The GEMV streams 4 panels at a time over the whole K (nothing to keep in L2): 4 n-blocks a thread.
  if (wpanels.defined() && M < kPackedMinRows) {
    bl.NB = std::max<int64_t>(64, round_up(ceil_div(N, 4 * threads), 64));
    bl.n_nb = ceil_div(N, bl.NB);
  }
#endif
  // The VNNI GEMV (1-6 rows on the cached quads) streams up to 4 panels at a time over the whole K:
  // 2 n-blocks a thread, with the software prefetch gemv_prefetch_bytes gives.
  const bool vnni_gemv = wquads.defined() && M <= kVnniGemvRows && !amx_on;
  const int64_t gemv_ahead = vnni_gemv ? gemv_prefetch_bytes(N * K) : 0;
  if (vnni_gemv) {
    bl.NB = round_up(ceil_div(N, 2 * threads), 32);
    bl.n_nb = ceil_div(N, bl.NB);
  }
  const int64_t MB = bl.MB, NB = bl.NB, n_mb = bl.n_mb, n_nb = bl.n_nb;
  // AMX: on the cached quads only (its B tiles are their layout), x padded once per call.
  const bool amx = amx_on && wquads.defined();
  const Uninit<int8_t> xamx = amx ? pad_x_amx(xp, M, K) : Uninit<int8_t>();
  const BlockFn block_fn = !amx ? fn : isa == Isa::avx512_emulated ? amx_emulated::block
#if PTQRT_AMX_NATIVE
                                                                   : amx_native::block;
#else
                                                                   : fn;  // (unreachable: has_amx() is false)
#endif
  t_last_path = amx                ? "amx"
                : vnni_gemv          ? "vnni-gemv"
                : vnni && vnni_panel ? "vnni-panel"
                : vnni               ? "vnni-dot"
#if PTQRT_X86
                : isa == Isa::avx2 ? (wpanels.defined() && M < kPackedMinRows ? "avx2-gemv" : panel ? "avx2-panel"
                                                                                                   : "avx2-dot")
#endif
                                   : "scalar";
  // x once per call in the layout of the panel kernels (AVX2, VNNI), or the dot tiles' row sums.
  const Uninit<uint8_t> xquads = vnni_panel && !amx ? pack_x_quads(xp, M, K, MB) : Uninit<uint8_t>();
  const int64_t xquads_block = ceil_div(MB, 8) * 8 * 4 * ceil_div(K, 4);
  std::vector<int32_t> xsum;
  if (vnni && xquads.empty() && !amx) {  // the dot-product tiles' u8 offset correction, per row
    xsum.resize(M);
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t a, int64_t e) {
      for (int64_t m = a; m < e; ++m) {
        int64_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += xp[m * K + k];
        xsum[m] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(s) * 128u));
      }
    });
  }
#if PTQRT_X86
  const Uninit<int16_t> xpanel = panel ? pack_x_panels_avx2(xp, M, K, MB) : Uninit<int16_t>();
  const int64_t xpanel_block = ceil_div(MB, kPanelRows) * kPanelRows * 2 * ceil_div(K, 2);
#endif

  const F32Values xs(raw ? std::nullopt : std::optional<at::Tensor>(x_scale));
  const F32Values ws(raw ? std::nullopt : std::optional<at::Tensor>(w_scale));
  const F32Values bs(raw ? std::nullopt : bias);
  at::parallel_for(0, n_nb * n_mb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> cbuf(raw ? 0 : std::min(MB, M) * NB);  // the epilogue's int32 tile
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = (t / n_mb) * NB, m0 = (t % n_mb) * MB;
      W8A8Block b{xp + m0 * K, K, xsum.empty() ? nullptr : xsum.data() + m0, nullptr, nullptr, nullptr, nullptr,
                  xquads.empty() ? nullptr : xquads.data() + (m0 / MB) * xquads_block, wp + n0 * K, K,
                  std::min(MB, M - m0), std::min(NB, N - n0), K, nullptr, 0};
#if PTQRT_X86
      if (!xpanel.empty()) b.xpanel = xpanel.data() + (m0 / MB) * xpanel_block;
      if (wpanels.defined()) b.wpanels = wpanels.data_ptr<int8_t>() + (n0 / kPanelCols) * wpanel_stride;
#endif
      if (amx) b.xamx = xamx.data() + m0 * round_up(K, 64);
      b.gemv_ahead = gemv_ahead;
      if (wquads.defined()) {
        b.wquads = wquads.data_ptr<int8_t>() + (n0 / 32) * wquads_stride;
        if (n0 + NB < N) b.wquads_next = b.wquads + (NB / 32) * wquads_stride;
        b.wcorr = reinterpret_cast<const int32_t*>(wquads.data_ptr<int8_t>() + ceil_div(N, 32) * wquads_stride) + n0;
      }
      if (raw) {
        b.c = out.data_ptr<int32_t>() + m0 * N + n0;
        b.ldc = N;
        block_fn(b);
        continue;
      }
      b.c = cbuf.data();
      b.ldc = NB;
      block_fn(b);
#if PTQRT_X86
      if (isa == Isa::avx512 && out_dtype == at::kFloat) {
        epilogue_f32_avx512(b.c, b.ldc, m0, n0, b.mb, b.nb, xs.data(), xs.size() != 1, ws.data(), bs.data(),
                            out.data_ptr<float>(), N);
        continue;
      }
#endif
      dispatch_float(out_dtype, "out_dtype", [&](auto tag) {
        using T = decltype(tag);
        epilogue(b.c, b.ldc, m0, n0, b.mb, b.nb, xs.data(), xs.size() != 1, ws.data(),
                 bs.data(), reinterpret_cast<T*>(out.data_ptr()), N);
      });
    }
  });
  return out;
}

// The packed copy w8a8_gemm would make on a weight's first call, made now (at load time): true when
// the cache holds one for the path this CPU runs (false: scalar path, budget). An inference tensor,
// which a call would not cache, is packed as a snapshot (afresh on every pack_weight).
bool pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "ptqrt_cpu.pack_weight: w_q must be a contiguous 2-D int8 CPU tensor [N, K]; got ", w.sizes(), " ",
              w.scalar_type(), " on ", w.device(), w.is_contiguous() ? "" : " (not contiguous)");
  const int64_t N = w.size(0), K = w.size(1);
  if (N == 0 || K == 0) return false;
  const Isa isa = active_isa();
  if (isa == Isa::avx512 || isa == Isa::avx512_emulated) return cached_quads(w, N, K, true).defined();
#if PTQRT_X86
  if (isa == Isa::avx2) return cached_panels(w, N, K, true).defined();
#endif
  return false;
}

}  // namespace ptqrt_cpu
