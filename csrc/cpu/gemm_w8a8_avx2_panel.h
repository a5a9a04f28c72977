// The AVX2 w8a8 panel (outer-product) kernel, included once by gemm_w8a8.cpp inside its anonymous
// namespace (it uses W8A8Block and the helpers defined there).
//
// Why a second formulation. The dot-product tiles (K along the lanes, a horizontal sum per output)
// need a fresh x or w vector for every vpmaddwd and widen every weight vector with a shuffle, and
// measured 45-60 GMAC/s on one Zen 3 core, while vpmaddwd + vpaddd on registers run at ~80. Here
// the lanes are output columns instead: for one pair of k, a vector holds 8 columns' two weights
// (int16), each x row contributes one broadcast 32-bit (two int16) value, and one vpmaddwd adds
// the row's two products into each column's int32 lane. An R x 16 tile (R <= 6) keeps 2R
// accumulators, reads 2 weight vectors (16 bytes each, widened to int16 by the load) and R
// broadcasts per 2R vpmaddwd, and needs no horizontal sum: 72-77 GMAC/s on one Zen 3 core.
//
// The weights must be in panel order, [16-column panel][k pair][16][2] int8. Either the packed-weight
// cache (pack_cache.h) holds the whole weight in that order (packed once, on the first call), and the
// kernel runs from M >= kPackedMinRows; or, without a cached copy, each block repacks 16 columns x one
// K chunk at a time into an L1-resident buffer (8 x 8 transposes of 2-byte units), which the row
// reuse pays for from kPanelMinRows rows up, and fewer rows take the dot-product tiles. x is packed
// once per call into 6-row interleaved int16 groups. Every int8 value, -128 included, is exact: int16
// products of int8 values, two per int32 lane, wrapping adds.
#pragma once

constexpr int kPanelRows = 6, kPanelCols = 16;
constexpr int64_t kPanelMinRows = 24;   // repacking per call (no cached copy)
constexpr int64_t kPackedMinRows = 3;   // with the cached packed weights (M <= 2: block_gemv_avx2)
constexpr int kPanelLayout = 1;         // this layout's tag in the packed-weight cache

// x [mb, K] (ldx) columns [k0, k0 + kc) -> xp [ceil(mb / 6)][kp][6][2] int16, zeros past mb and kc.
// 16 k of a 6-row group at a time: each row widened to int16 (8 pairs of k, one 32-bit unit each),
// then the 6 x 8 units transposed, so k pair p's 6 units (24 bytes) go out as one 16- and one 8-byte
// store. (Scalar, this pass took ~6% of a 384^3 call on one core.)
PTQRT_AVX2 void pack_x_panel_avx2(const int8_t* x, int64_t ldx, int64_t mb, int64_t k0, int64_t kc, int16_t* xp) {
  const int64_t kp = ceil_div(kc, 2), groups = ceil_div(mb, kPanelRows);
  for (int64_t g = 0; g < groups; ++g) {
    int16_t* const dst = xp + g * kp * (2 * kPanelRows);
    const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, mb - g * kPanelRows));
    const int8_t* const src = x + g * kPanelRows * ldx + k0;
    int64_t k = 0;
    for (; k + 16 <= kc; k += 16) {
      __m256i r[kPanelRows];
      for (int i = 0; i < kPanelRows; ++i) r[i] = i < rows ? widen16(src + i * ldx + k) : _mm256_setzero_si256();
      // Per 128-bit lane (pairs 0-3 low, 4-7 high): a = rows 0-3 of pairs {0, 1} / {2, 3}; b = rows 4-5.
      const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
      const __m256i b01 = _mm256_unpacklo_epi32(r[4], r[5]), b23 = _mm256_unpackhi_epi32(r[4], r[5]);
      const __m256i a[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                            _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
      const __m256i b[2] = {b01, b23};
      int16_t* d = dst + (k / 2) * (2 * kPanelRows);
      for (int h = 0; h < 2; ++h)
        for (int q = 0; q < 4; ++q) {  // pair 4h + q: rows 0-3 from a[q], rows 4-5 from half q % 2 of b[q / 2]
          const __m128i lo = h ? _mm256_extracti128_si256(a[q], 1) : _mm256_castsi256_si128(a[q]);
          __m128i hi = h ? _mm256_extracti128_si256(b[q / 2], 1) : _mm256_castsi256_si128(b[q / 2]);
          if (q % 2) hi = _mm_unpackhi_epi64(hi, hi);
          int16_t* dp = d + (4 * h + q) * (2 * kPanelRows);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dp), lo);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(dp + 8), hi);
        }
    }
    for (int i = 0; i < kPanelRows; ++i) {  // the last kc % 16 columns
      int16_t* d = dst + 2 * i;
      for (int64_t p = k / 2; p < kp; ++p) {
        const int8_t* s = src + i * ldx;
        d[p * 2 * kPanelRows] = i < rows ? s[2 * p] : 0;
        d[p * 2 * kPanelRows + 1] = i < rows && 2 * p + 1 < kc ? s[2 * p + 1] : 0;
      }
    }
  }
}

// Weight rows [0, nr) (nr <= 16, ldw apart), columns [k0, k0 + kc) -> wp [kp][16][2] int8: for
// k pair p, the two weights of column j at wp[p * 32 + 2 * j]. Zeros past nr and kc.
PTQRT_AVX2 void pack_w_panel_avx2(const int8_t* w, int64_t ldw, int64_t nr, int64_t k0, int64_t kc, int8_t* wp) {
  const int64_t kp = ceil_div(kc, 2);
  for (int h = 0; h < 2; ++h) {  // columns [8h, 8h + 8): bytes [16h, 16h + 16) of each k pair
    const int64_t rows = std::clamp<int64_t>(nr - 8 * h, 0, 8);
    const int8_t* base = w + 8 * h * ldw + k0;
    int64_t k = 0;
    if (rows == 8) {
      for (; k + 16 <= kc; k += 16) {  // 8 rows x 8 k pairs: an 8 x 8 transpose of 2-byte units
        __m128i r[8], t[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + i * ldw + k));
        for (int i = 0; i < 4; ++i) {
          t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
          t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) {  // r[4i + q']: rows 0-3 (i = 0) or 4-7 (i = 1), pairs 2q', 2q' + 1
          r[4 * i + 0] = _mm_unpacklo_epi32(t[4 * i + 0], t[4 * i + 2]);
          r[4 * i + 1] = _mm_unpackhi_epi32(t[4 * i + 0], t[4 * i + 2]);
          r[4 * i + 2] = _mm_unpacklo_epi32(t[4 * i + 1], t[4 * i + 3]);
          r[4 * i + 3] = _mm_unpackhi_epi32(t[4 * i + 1], t[4 * i + 3]);
        }
        for (int q = 0; q < 4; ++q) {  // pairs 2q and 2q + 1 of all 8 rows
          int8_t* d = wp + (k / 2 + 2 * q) * 2 * kPanelCols + 16 * h;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi64(r[q], r[4 + q]));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * kPanelCols), _mm_unpackhi_epi64(r[q], r[4 + q]));
        }
      }
    }
    for (int64_t p = k / 2; p < kp; ++p)
      for (int64_t j = 0; j < 8; ++j) {
        int8_t* d = wp + p * 2 * kPanelCols + 2 * (8 * h + j);
        const int8_t* src = base + j * ldw;
        d[0] = j < rows ? src[2 * p] : 0;
        d[1] = j < rows && 2 * p + 1 < kc ? src[2 * p + 1] : 0;
      }
  }
}

// The whole weight [N, K] in panel order for the packed-weight cache: [ceil(N / 16)][kp][16][2].
inline int64_t packed_panel_bytes(int64_t N, int64_t K) { return ceil_div(N, kPanelCols) * ceil_div(K, 2) * 2 * kPanelCols; }
PTQRT_AVX2 void pack_w_panels_avx2(const int8_t* w, int64_t N, int64_t K, int8_t* dst) {
  const int64_t panels = ceil_div(N, kPanelCols), stride = ceil_div(K, 2) * 2 * kPanelCols;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      pack_w_panel_avx2(w + p * kPanelCols * K, K, std::min<int64_t>(kPanelCols, N - p * kPanelCols), 0, K, dst + p * stride);
  });
}

// c [R, 16] (ldc) = (add ? c : 0) + xp-group . wp over kp pairs of k. Written in assembly: from
// intrinsics GCC kept fewer than the 12 accumulators in registers and spilled the rest every step.
#define PTQRT_PANEL_ROW(i, lo, hi)                     \
  "vpbroadcastd " #i "*4(%[x]), %%ymm14\n\t"           \
  "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"             \
  "vpaddd %%ymm15, %[" #lo "], %[" #lo "]\n\t"         \
  "vpmaddwd %%ymm14, %%ymm13, %%ymm14\n\t"             \
  "vpaddd %%ymm14, %[" #hi "], %[" #hi "]\n\t"
#define PTQRT_PANEL_W PTQRT_PANEL_LOOP_HEAD "vpmovsxbw (%[w]), %%ymm12\n\t" "vpmovsxbw 16(%[w]), %%ymm13\n\t"
#define PTQRT_PANEL_OPERANDS PTQRT_PANEL_LOOP_OPERANDS(32, 24)

template <int R>
PTQRT_AVX2 void panel_rx16_avx2(const int16_t* xp, const int8_t* wp, int64_t kp, int32_t* c, int64_t ldc, bool add) {
  static_assert(R >= 1 && R <= kPanelRows, "1 to 6 rows (2R accumulators + 4 scratch of the 16 ymm)");
  __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_si256();
#define PTQRT_PANEL_LD(i, h, v) \
  if (add && (i) < R) v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + (i) * ldc + 8 * (h)));
  PTQRT_PANEL_FOR_EACH_ACC(PTQRT_PANEL_LD)
#undef PTQRT_PANEL_LD
  static_assert(2 * kPanelCols == 32 && 2 * kPanelRows * 2 == 24, "the asm's per-step strides");
  if (kp > 0) {
    const int8_t* w = wp;
    const int16_t* x = xp;
    int64_t n = kp;
    PTQRT_PANEL_ASM(R, PTQRT_PANEL_W, PTQRT_PANEL_ROW, PTQRT_PANEL_OPERANDS);
  }
#define PTQRT_PANEL_ST(i, h, v) \
  if ((i) < R) _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (i) * ldc + 8 * (h)), v);
  PTQRT_PANEL_FOR_EACH_ACC(PTQRT_PANEL_ST)
#undef PTQRT_PANEL_ST
}
#undef PTQRT_PANEL_ROW
#undef PTQRT_PANEL_W
#undef PTQRT_PANEL_OPERANDS

PTQRT_AVX2 void panel_avx2(int64_t rows, const int16_t* xp, const int8_t* wp, int64_t kp, int32_t* c, int64_t ldc,
                           bool add) {
  dispatch_panel_rows(rows, [&](auto r) { panel_rx16_avx2<decltype(r)::value>(xp, wp, kp, c, ldc, add); });
}

// M <= 2 on the cached panels (decode): S panels side by side, so S weight streams run at once, each
// sequential over its panel's whole K (the dot-product tiles' 4 rows restart every 4 KiB row) and
// prefetched 1 KiB ahead. One Zen 3 core, from DRAM: 1 stream 17-20 GB/s, 4 streams 28-30. Two rows
// take 2 panels at a time (3 spilled an accumulator: 0.8x at 4096 x 4096).
template <int R, int S>
PTQRT_AVX2 void gemv_panels_avx2(const int16_t* xw, int64_t ldxw, const int8_t* wp, int64_t pstride, int64_t kp,
                                 int32_t* c, int64_t ldc) {
  static_assert(R * S * 2 <= 12, "2RS accumulators + 2 x + weight + product within the 16 ymm");
  __m256i acc[R][S][2];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s][0] = acc[r][s][1] = _mm256_setzero_si256();
  constexpr int64_t kAhead = 1024;
  for (int64_t p = 0; p < kp; ++p) {
    if ((p & 1) == 0)
      for (int s = 0; s < S; ++s) _mm_prefetch(reinterpret_cast<const char*>(wp + s * pstride + p * 32 + kAhead), _MM_HINT_T0);
    __m256i xb[R];
    for (int r = 0; r < R; ++r) {
      int32_t v;
      std::memcpy(&v, xw + r * ldxw + 2 * p, 4);
      xb[r] = _mm256_set1_epi32(v);
    }
    for (int s = 0; s < S; ++s) {
      const int8_t* ws = wp + s * pstride + p * 2 * kPanelCols;
      const __m256i lo = widen16(ws), hi = widen16(ws + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][s][0] = _mm256_add_epi32(acc[r][s][0], _mm256_madd_epi16(xb[r], lo));
        acc[r][s][1] = _mm256_add_epi32(acc[r][s][1], _mm256_madd_epi16(xb[r], hi));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + s * kPanelCols), acc[r][s][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + s * kPanelCols + 8), acc[r][s][1]);
    }
}

// The block for M <= 2 from the cached panels; its 1-2 rows of x are widened here (int16, K rounded
// up to 16 with zeros), not packed as a 6-row group.
PTQRT_AVX2 void block_gemv_avx2(const W8A8Block& b) {
  const int64_t kp = ceil_div(b.K, 2), pstride = kp * 2 * kPanelCols, K16 = round_up(b.K, 16);
  thread_local std::vector<int16_t> xw_buf;
  if (static_cast<int64_t>(xw_buf.size()) < 2 * K16 + 32) xw_buf.resize(2 * K16 + 32);
  int16_t* const xw = align64(xw_buf.data());
  widen_rows_avx2(b.x, b.ldx, b.mb, b.K, K16, xw);
  const int64_t full = b.nb / kPanelCols;  // whole panels; the last one may be cut short
  const int8_t* const w = b.wpanels;
  int64_t p = 0;
  if (b.mb == 1) {
    for (; p + 4 <= full; p += 4) gemv_panels_avx2<1, 4>(xw, K16, w + p * pstride, pstride, kp, b.c + p * kPanelCols, b.ldc);
    for (; p < full; ++p) gemv_panels_avx2<1, 1>(xw, K16, w + p * pstride, pstride, kp, b.c + p * kPanelCols, b.ldc);
  } else {
    for (; p + 2 <= full; p += 2) gemv_panels_avx2<2, 2>(xw, K16, w + p * pstride, pstride, kp, b.c + p * kPanelCols, b.ldc);
    for (; p < full; ++p) gemv_panels_avx2<2, 1>(xw, K16, w + p * pstride, pstride, kp, b.c + p * kPanelCols, b.ldc);
  }
  const int64_t nr = b.nb - full * kPanelCols;
  if (nr > 0) {  // through a scratch tile: nothing past c's [mb, nb] is written
    alignas(32) int32_t tile[2 * kPanelCols];
    if (b.mb == 1)
      gemv_panels_avx2<1, 1>(xw, K16, w + full * pstride, pstride, kp, tile, kPanelCols);
    else
      gemv_panels_avx2<2, 1>(xw, K16, w + full * pstride, pstride, kp, tile, kPanelCols);
    scratch_out(b.c + full * kPanelCols, b.ldc, b.mb, nr, tile, kPanelCols);
  }
}

// x for the panel kernel, once per call: each m-block of the driver (mblock rows) as 6-row groups
// over the whole K, [block][group][kp][6][2] int16.
// (Groups past the last block's rows are not written and never read.)
PTQRT_AVX2 Uninit<int16_t> pack_x_panels_avx2(const int8_t* x, int64_t M, int64_t K, int64_t mblock) {
  const int64_t per_block = ceil_div(mblock, kPanelRows) * kPanelRows * 2 * ceil_div(K, 2);
  const int64_t blocks = ceil_div(M, mblock);
  Uninit<int16_t> xp(blocks * per_block);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i)
      pack_x_panel_avx2(x + i * mblock * K, K, std::min(mblock, M - i * mblock), 0, K, xp.data() + i * per_block);
  });
  return xp;
}

// The block through panels: K in chunks; per chunk, 16 columns at a time (from the cached packed
// weights, or repacked into an L1-resident buffer) against every 6-row group of the block (the last
// group's rows past mb are not computed). A panel cut short by nb goes through a 6 x 16 scratch
// tile, so nothing outside c's [mb, nb] is touched.
PTQRT_AVX2 void block_panel_avx2(const W8A8Block& b) {
  const int64_t groups = ceil_div(b.mb, kPanelRows), kp_all = ceil_div(b.K, 2);
  // The groups' x of one chunk <= ~256 KiB; a multiple of 16 so only the last chunk has a ragged end.
  const int64_t kc_max = std::clamp<int64_t>((128 * 1024) / (groups * kPanelRows) / 16 * 16, 256, 4096);
  int8_t* wbuf = nullptr;
  if (!b.wpanels) {
    thread_local std::vector<int8_t> wp_buf;  // 64-byte aligned: no 32-byte weight load splits a line
    if (static_cast<int64_t>(wp_buf.size()) < kPanelCols * kc_max + 64) wp_buf.resize(kPanelCols * kc_max + 64);
    wbuf = align64(wp_buf.data());
  }
  alignas(32) int32_t tile[kPanelRows * kPanelCols];
  for (int64_t k0 = 0; k0 < b.K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, b.K - k0), kp = ceil_div(kc, 2);
    const bool add = k0 > 0;
    for (int64_t n0 = 0; n0 < b.nb; n0 += kPanelCols) {
      const int64_t nr = std::min<int64_t>(kPanelCols, b.nb - n0);
      const int8_t* wp;
      if (b.wpanels) {
        wp = b.wpanels + ((n0 / kPanelCols) * kp_all + k0 / 2) * 2 * kPanelCols;
      } else {
        pack_w_panel_avx2(b.w + n0 * b.ldw, b.ldw, nr, k0, kc, wbuf);
        wp = wbuf;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m0 = g * kPanelRows, mr = std::min<int64_t>(kPanelRows, b.mb - m0);
        const int16_t* xg = b.xpanel + (g * kp_all + k0 / 2) * 2 * kPanelRows;
        int32_t* c = b.c + m0 * b.ldc + n0;
        if (nr == kPanelCols) {
          panel_avx2(mr, xg, wp, kp, c, b.ldc, add);
          continue;
        }
        scratch_in(c, b.ldc, mr, nr, add, tile, kPanelCols);
        panel_avx2(mr, xg, wp, kp, tile, kPanelCols, add);
        scratch_out(c, b.ldc, mr, nr, tile, kPanelCols);
      }
    }
  }
}
