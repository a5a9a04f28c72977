// The AVX-512 VNNI w8a8 tile kernel, written once against a small "policy" of vector operations.
//
// Included twice by gemm_w8a8.cpp (deliberately no include guard):
//   PTQRT_VNNI_NS = vnni_native,   PTQRT_VNNI_POLICY = Vnni512Native,   PTQRT_VNNI_TARGET = PTQRT_AVX512
//   PTQRT_VNNI_NS = vnni_emulated, PTQRT_VNNI_POLICY = Vnni512Emulated, PTQRT_VNNI_TARGET = (nothing)
// The second copy runs this exact code with every intrinsic replaced by a portable model of the same
// instruction, so tests check the tiling, tails and 128-offset correction on CPUs without AVX-512.
//
// vpdpbusd multiplies u8 by s8. With u = w + 128 (w XOR 0x80, in [0, 255]):
//   sum_k x*w = sum_k x*(w + 128) - 128 * sum_k x,
// and the correction 128*sum_k x per row is computed once per call (xsum). vpdpbusd adds four
// products into each int32 lane without saturating, so every step is exact modulo 2^32; the true
// result fits in int32 (K <= 131071), hence the wrapped one equals it. Unsigned arithmetic keeps the
// intermediate wrap defined in C++.

namespace PTQRT_VNNI_NS {

using P = PTQRT_VNNI_POLICY;
using V = P::V;
constexpr int kMR = 4, kNR = 4;  // 16 zmm accumulators + 4 weight vectors + 1 x vector + 1 constant

// c[i*ldc + j] = sum_k x[i*ldx + k] * w[j*ldw + k] for i < mr, j < nr (exact int32).
template <int mr, int nr>
PTQRT_VNNI_TARGET void tile(const int8_t* x, int64_t ldx, const int32_t* xsum, const int8_t* w, int64_t ldw,
                            int64_t K, int32_t* c, int64_t ldc) {
  V acc[mr][nr];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) acc[i][j] = P::zero();
  const V flip = P::set1_u8(0x80);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    V wu[nr];
    for (int j = 0; j < nr; ++j) wu[j] = P::xor_(P::loadu(w + j * ldw + k), flip);
    for (int i = 0; i < mr; ++i) {
      const V xv = P::loadu(x + i * ldx + k);
      for (int j = 0; j < nr; ++j) acc[i][j] = P::dpbusd(acc[i][j], wu[j], xv);
    }
  }
  if (k < K) {
    // Masked loads read nothing past the row. A masked-off w byte becomes 0 ^ 0x80 = 128 but meets a
    // masked-off x byte of 0, so it adds nothing.
    const P::Mask m = P::tail_mask(K - k);
    V wu[nr];
    for (int j = 0; j < nr; ++j) wu[j] = P::xor_(P::maskz_loadu(m, w + j * ldw + k), flip);
    for (int i = 0; i < mr; ++i) {
      const V xv = P::maskz_loadu(m, x + i * ldx + k);
      for (int j = 0; j < nr; ++j) acc[i][j] = P::dpbusd(acc[i][j], wu[j], xv);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j)
      c[i * ldc + j] = static_cast<int32_t>(P::reduce_add(acc[i][j]) - static_cast<uint32_t>(xsum[i]));
}

using TileFn = void (*)(const int8_t*, int64_t, const int32_t*, const int8_t*, int64_t, int64_t, int32_t*, int64_t);

PTQRT_VNNI_TARGET void block_panel(const W8A8Block& b);

PTQRT_VNNI_TARGET void block(const W8A8Block& b) {
  if (b.xquads) return block_panel(b);
  static const TileFn tiles[kMR][kNR] = {
      {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
      {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
      {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
      {tile<4, 1>, tile<4, 2>, tile<4, 3>, tile<4, 4>},
  };
  for (int64_t m0 = 0; m0 < b.mb; m0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, b.mb - m0);
    for (int64_t n0 = 0; n0 < b.nb; n0 += kNR) {
      const int64_t nr = std::min<int64_t>(kNR, b.nb - n0);
      tiles[mr - 1][nr - 1](b.x + m0 * b.ldx, b.ldx, b.xsum + m0, b.w + n0 * b.ldw, b.ldw, b.K,
                            b.c + m0 * b.ldc + n0, b.ldc);
    }
  }
}

// ------------------------------------------------------------------------------------ panel form
// From kVnniPanelMinRows rows (on the cached quads: the GEMV form below up to kVnniGemvRows rows,
// this from there): lanes are output columns, as in the AVX2 panel kernel. A zmm of weights
// holds 16 columns x one k quad (4 bytes each), x ^ 0x80 (u8) is broadcast 4 bytes at a time, and one
// vpdpbusd adds a row's 4 products into each column's lane: an 8 x 32 tile keeps 16 accumulators,
// reads 2 weight vectors + 8 broadcasts per 16 vpdpbusd, needs no horizontal sum and no per-load
// xor. The offset's correction is per column: sum_k (x + 128) w - 128 sum_k w, the second term one
// vpdpbusd of 128s against each weight vector per tile column and K chunk, subtracted up front.
// x is packed once per call (w8a8_gemm). The weights come from the packed-weight cache
// (pack_cache.h: the whole weight in that order plus each column's 128 * sum_k w over all of K,
// packed on the weight's first call), or, with nothing cached, are repacked per call 32 columns x
// one K chunk at a time. Both are portable byte copies, shared by the native and the emulated build,
// so the emulated tests cover the layout the native kernel reads.
constexpr int kVR = 8, kVC = 32;

// Weight rows [0, nr) (ldw apart), k [k0, k0 + kc) -> wq [ceil(kc / 4)][32][4], zeros past nr and kc.
inline void pack_w_quads(const int8_t* w, int64_t ldw, int64_t nr, int64_t k0, int64_t kc, int8_t* wq) {
  const int64_t nq = ceil_div(kc, 4);
  for (int64_t j = 0; j < kVC; ++j) {
    const int8_t* row = w + j * ldw + k0;
    for (int64_t q = 0; q < nq; ++q) {
      int8_t* d = wq + q * 4 * kVC + 4 * j;
      if (j < nr && 4 * q + 4 <= kc) {
        std::memcpy(d, row + 4 * q, 4);
      } else {
        for (int t = 0; t < 4; ++t) d[t] = j < nr && 4 * q + t < kc ? row[4 * q + t] : 0;
      }
    }
  }
}

// The whole weight for the cache: [ceil(N / 32)][ceil(K / 4)][32][4], then int32 [ceil(N / 32) * 32]
// with 128 * sum_k w per column (wrapping; 0 past N).
inline int64_t packed_quads_bytes(int64_t N, int64_t K) {
  const int64_t panels = ceil_div(N, kVC);
  return panels * ceil_div(K, 4) * 4 * kVC + panels * kVC * 4;
}
inline void pack_w_quads_all(const int8_t* w, int64_t N, int64_t K, int8_t* dst) {
  const int64_t panels = ceil_div(N, kVC), stride = ceil_div(K, 4) * 4 * kVC;
  int32_t* corr = reinterpret_cast<int32_t*>(dst + panels * stride);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nr = std::min<int64_t>(kVC, N - p * kVC);
      pack_w_quads(w + p * kVC * K, K, nr, 0, K, dst + p * stride);
      for (int64_t j = 0; j < kVC; ++j) {
        uint32_t s = 0;
        if (j < nr)
          for (int64_t k = 0; k < K; ++k) s += static_cast<uint32_t>(int32_t(w[(p * kVC + j) * K + k]) * 128);
        corr[p * kVC + j] = static_cast<int32_t>(s);
      }
    }
  });
}

// c [mr, 32] (ldc) = (add ? c : 0) + sum over nq quads of x . w, where corr0 / corr1 hold 128 * the
// columns' weight sums over the same quads (the offset's share). The pf_n lines from pf are
// prefetched into L2, one a quad (pf_n <= nq; 0: none).
template <int mr>
PTQRT_VNNI_TARGET void panel(const uint8_t* xq, const int8_t* wq, int64_t nq, V corr0, V corr1, int32_t* c,
                             int64_t ldc, bool add, const int8_t* pf, int64_t pf_n) {
  V acc[mr][2];
  const V zero = P::zero();
  for (int i = 0; i < mr; ++i) {
    const int8_t* ci = reinterpret_cast<const int8_t*>(c + i * ldc);
    acc[i][0] = P::sub_i32(add ? P::loadu(ci) : zero, corr0);
    acc[i][1] = P::sub_i32(add ? P::loadu(ci + 64) : zero, corr1);
  }
  for (int64_t q = 0; q < nq; ++q) {
    const V w0 = P::loadu(wq + q * 4 * kVC), w1 = P::loadu(wq + q * 4 * kVC + 64);
    if (q < pf_n) P::prefetch_l2(pf + q * 64);
    for (int i = 0; i < mr; ++i) {
      const V xb = P::bcast4(xq + (q * kVR + i) * 4);
      acc[i][0] = P::dpbusd(acc[i][0], xb, w0);
      acc[i][1] = P::dpbusd(acc[i][1], xb, w1);
    }
  }
  for (int i = 0; i < mr; ++i) {
    int8_t* ci = reinterpret_cast<int8_t*>(c + i * ldc);
    P::storeu(ci, acc[i][0]);
    P::storeu(ci + 64, acc[i][1]);
  }
}

using PanelFn = void (*)(const uint8_t*, const int8_t*, int64_t, V, V, int32_t*, int64_t, bool, const int8_t*,
                         int64_t);

// The GEMV form, for blocks of 1-6 rows on the cached quads: up to 4 panels (128 columns) at once
// over the whole K, so the weights arrive as several sequential streams (a panel's quads are
// contiguous) and each row has 2 * np independent vpdpbusd chains. One panel at a time, the panel
// kernel's two chains a row waited on the instruction's latency, and one stream drew less from the
// L3 than four (2 threads on a Zen 4, 1 x 4096 x 4096: 165 -> 127 us, the dot tiles on the original
// rows 157; 4 and 6 rows 1.05-1.16x the panel kernel). Panels at once by rows (mr * (2 np + 1) + 1
// of the 32 zmm registers): 4 up to 3 rows, 3 at 4, 2 at 5-6.
constexpr int kGemvPanels[kVnniGemvRows] = {4, 4, 4, 3, 2, 2};
// c [mr, np * 32] (ldc) = sum over all nq quads of x . w for np panels pstride bytes apart, less corr
// [np * 32] (128 * the columns' weight sums). ahead > 0: each stream prefetches into L2 the line that
// many bytes on, within its panel, once a quad: every other 64-byte line (a quad is 128 bytes), the
// form the Zen 4 measurements were made with; prefetching both lines measured 0.95-1.0x of none on a
// Zen 5, where this one ran 0.65-0.9x (bench/NOTES.md).
template <int mr, int np>
PTQRT_VNNI_TARGET void gemv(const uint8_t* xq, const int8_t* wq, int64_t pstride, int64_t nq, const int32_t* corr,
                            int32_t* c, int64_t ldc, int64_t ahead) {
  V acc[mr][np][2];
  for (int p = 0; p < np; ++p)
    for (int h = 0; h < 2; ++h) {
      const V neg = P::sub_i32(P::zero(), P::loadu(reinterpret_cast<const int8_t*>(corr + p * kVC + 16 * h)));
      for (int i = 0; i < mr; ++i) acc[i][p][h] = neg;
    }
  for (int64_t q = 0; q < nq; ++q) {
    if (ahead && q * 4 * kVC + ahead < pstride)
      for (int p = 0; p < np; ++p) P::prefetch_l2(wq + p * pstride + q * 4 * kVC + ahead);
    V xb[mr];
    for (int i = 0; i < mr; ++i) xb[i] = P::bcast4(xq + (q * kVR + i) * 4);
    for (int p = 0; p < np; ++p)
      for (int h = 0; h < 2; ++h) {
        const V w = P::loadu(wq + p * pstride + q * 4 * kVC + 64 * h);
        for (int i = 0; i < mr; ++i) acc[i][p][h] = P::dpbusd(acc[i][p][h], xb[i], w);
      }
  }
  for (int i = 0; i < mr; ++i)
    for (int p = 0; p < np; ++p)
      for (int h = 0; h < 2; ++h) P::storeu(reinterpret_cast<int8_t*>(c + i * ldc + p * kVC + 16 * h), acc[i][p][h]);
}

using GemvFn = void (*)(const uint8_t*, const int8_t*, int64_t, int64_t, const int32_t*, int32_t*, int64_t, int64_t);

PTQRT_VNNI_TARGET void block_gemv(const W8A8Block& b) {
  static const GemvFn fns[kVnniGemvRows][4] = {
      {gemv<1, 1>, gemv<1, 2>, gemv<1, 3>, gemv<1, 4>}, {gemv<2, 1>, gemv<2, 2>, gemv<2, 3>, gemv<2, 4>},
      {gemv<3, 1>, gemv<3, 2>, gemv<3, 3>, gemv<3, 4>}, {gemv<4, 1>, gemv<4, 2>, gemv<4, 3>, nullptr},
      {gemv<5, 1>, gemv<5, 2>, nullptr, nullptr},       {gemv<6, 1>, gemv<6, 2>, nullptr, nullptr},
  };
  const int64_t nq = ceil_div(b.K, 4), stride = nq * 4 * kVC, most = kGemvPanels[b.mb - 1];
  const int64_t whole = b.nb / kVC;  // panels with all 32 columns inside the output
  for (int64_t p = 0; p < whole; p += most) {
    const int64_t np = std::min(most, whole - p);
    fns[b.mb - 1][np - 1](b.xquads, b.wquads + p * stride, stride, nq, b.wcorr + p * kVC, b.c + p * kVC, b.ldc,
                          b.gemv_ahead);
  }
  if (const int64_t nr = b.nb - whole * kVC) {  // the last, partial panel on a scratch tile
    alignas(64) int32_t tile[kVnniGemvRows * kVC];
    fns[b.mb - 1][0](b.xquads, b.wquads + whole * stride, stride, nq, b.wcorr + whole * kVC, tile, kVC,
                     b.gemv_ahead);
    scratch_out(b.c + whole * kVC, b.ldc, b.mb, nr, tile, kVC);
  }
}

PTQRT_VNNI_TARGET void block_panel(const W8A8Block& b) {
  static const PanelFn panels[kVR] = {panel<1>, panel<2>, panel<3>, panel<4>, panel<5>, panel<6>, panel<7>, panel<8>};
  if (b.wquads && b.mb <= kVnniGemvRows) return block_gemv(b);
  const int64_t groups = ceil_div(b.mb, kVR), nq_all = ceil_div(b.K, 4);
  // The groups' x of one chunk <= ~256 KiB; a multiple of 64 so only the last chunk has a ragged end.
  const int64_t kc_max = std::clamp<int64_t>((256 * 1024) / (groups * kVR) / 64 * 64, 256, 4096);
  int8_t* wbuf = nullptr;
  if (!b.wquads) {
    thread_local std::vector<int8_t> wq_buf;
    if (static_cast<int64_t>(wq_buf.size()) < kVC * kc_max + 64) wq_buf.resize(kVC * kc_max + 64);
    wbuf = align64(wq_buf.data());
  }
  alignas(64) int32_t tile[kVR * kVC];
  const V u128 = P::set1_u8(0x80);
  for (int64_t k0 = 0; k0 < b.K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, b.K - k0), nq = ceil_div(kc, 4);
    const bool add = k0 > 0;
    for (int64_t n0 = 0; n0 < b.nb; n0 += kVC) {
      const int64_t nr = std::min<int64_t>(kVC, b.nb - n0);
      const int8_t* wq;
      V corr0 = P::zero(), corr1 = P::zero();
      if (b.wquads) {  // cached: the whole K's correction, taken once (with the first chunk)
        wq = b.wquads + ((n0 / kVC) * nq_all + k0 / 4) * 4 * kVC;
        if (k0 == 0) {
          corr0 = P::loadu(reinterpret_cast<const int8_t*>(b.wcorr + n0));
          corr1 = P::loadu(reinterpret_cast<const int8_t*>(b.wcorr + n0 + 16));
        }
      } else {
        pack_w_quads(b.w + n0 * b.ldw, b.ldw, nr, k0, kc, wbuf);
        wq = wbuf;
        for (int64_t q = 0; q < nq; ++q) {
          corr0 = P::dpbusd(corr0, u128, P::loadu(wq + q * 4 * kVC));
          corr1 = P::dpbusd(corr1, u128, P::loadu(wq + q * 4 * kVC + 64));
        }
      }
      // 9-32 rows on the cached quads: the first group's pass streams this panel from memory and the
      // later ones run from L2, so the first two prefetch the panel chunk read next into L2, half
      // each, keeping memory busy through all of them (2 threads on a Zen 4, 16 x 11008 x 4096:
      // 1.14x; 16 x 4096 x 4096 1.02x; no gain from 64 rows, where the arithmetic per panel hides the
      // stream). That chunk: the next panel's in this chunk, the block's first panel's at the next
      // chunk, or after the block's last, the next n-block's first (b.wquads_next; none past the
      // last), each its own number of quads, two lines a quad.
      const int8_t* next = nullptr;
      int64_t lines = 0;
      if (b.wquads && groups >= 2 && groups <= 4) {
        if (n0 + kVC < b.nb) {
          next = wq + nq_all * 4 * kVC;
          lines = 2 * nq;
        } else if (k0 + kc < b.K) {
          next = b.wquads + ((k0 + kc) / 4) * 4 * kVC;
          lines = 2 * ceil_div(std::min(kc_max, b.K - k0 - kc), 4);
        } else if (b.wquads_next) {
          next = b.wquads_next;
          lines = 2 * ceil_div(std::min(kc_max, b.K), 4);
        }
      }
      const int64_t half = ceil_div(lines, 2);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m0 = g * kVR, mr = std::min<int64_t>(kVR, b.mb - m0);
        const uint8_t* xg = b.xquads + (g * nq_all + k0 / 4) * 4 * kVR;
        int32_t* c = b.c + m0 * b.ldc + n0;
        const int8_t* pf = g < 2 && lines ? next + g * half * 64 : nullptr;
        const int64_t pf_n = g == 0 ? std::min(half, nq) : g == 1 ? std::min(lines - half, nq) : 0;
        if (nr == kVC) {
          panels[mr - 1](xg, wq, nq, corr0, corr1, c, b.ldc, add, pf, pf_n);
          continue;
        }
        scratch_in(c, b.ldc, mr, nr, add, tile, kVC);
        panels[mr - 1](xg, wq, nq, corr0, corr1, tile, kVC, add, pf, pf_n);
        scratch_out(c, b.ldc, mr, nr, tile, kVC);
      }
    }
  }
}

}  // namespace PTQRT_VNNI_NS
