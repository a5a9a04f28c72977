// The AVX-512 w8a16 kernels: the dot-product tile (below kW8A16PanelMinRows rows: the decode case)
// and the 32-column panel kernel (from there), written once against a small policy of 16-float
// vector operations, like gemm_w8a8_vnni.h.
//
// Included twice by gemm_w8a16.cpp (deliberately no include guard):
//   PTQRT_W16_NS = w16_avx512,   PTQRT_W16_POLICY = F16x_avx512,  PTQRT_W16_TARGET = PTQRT_AVX512
//   PTQRT_W16_NS = w16_emulated, PTQRT_W16_POLICY = F16xEmulated, PTQRT_W16_TARGET = (nothing)
// The second runs the same code with every intrinsic replaced by a portable model, so the tiling,
// group segments and masked tails are tested on CPUs without AVX-512 (under avx512-emulated).
//
// Same scheme as tile_avx2 at twice the width: per 16 k, each of nr weight rows is loaded as 16 int8,
// widened and converted (scaled by its group's scale when per group), and meets mr rows of x in
// fp32 FMAs; a group's last < 16 values use masked loads, which read nothing past them.

namespace PTQRT_W16_NS {

using P = PTQRT_W16_POLICY;
using V = P::V;

template <int mr, int nr>
PTQRT_W16_TARGET void tile(const W8A16Block& b) {
  V acc[mr][nr];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) acc[i][j] = P::zero();
  const int64_t nseg = b.G ? b.G : 1, seg = b.G ? b.gsize : b.K;
  for (int64_t g = 0; g < nseg; ++g) {
    const int64_t k1 = (g + 1) * seg;
    V sv[nr];
    for (int j = 0; j < nr; ++j) sv[j] = P::set1(b.G ? b.ws[j * b.G + g] : 1.0f);
    int64_t k = g * seg;
    for (; k + 16 <= k1; k += 16) {
      V wv[nr];
      for (int j = 0; j < nr; ++j) {
        wv[j] = P::load_i8(b.w + j * b.ldw + k);
        if (b.G) wv[j] = P::mul(wv[j], sv[j]);
      }
      for (int i = 0; i < mr; ++i) {
        const V xv = P::loadu(b.xf + i * b.ldxf + k);
        for (int j = 0; j < nr; ++j) acc[i][j] = P::fmadd(xv, wv[j], acc[i][j]);
      }
    }
    if (k < k1) {  // the segment's last k1 - k < 16 values; lanes past them are zero on both sides
      const int64_t n = k1 - k;
      V wv[nr];
      for (int j = 0; j < nr; ++j) {
        wv[j] = P::load_i8_masked(b.w + j * b.ldw + k, n);
        if (b.G) wv[j] = P::keep_first(P::mul(wv[j], sv[j]), n);  // (0 * an infinite scale would be NaN)
      }
      for (int i = 0; i < mr; ++i) {
        const V xv = P::loadu_masked(b.xf + i * b.ldxf + k, n);
        for (int j = 0; j < nr; ++j) acc[i][j] = P::fmadd(xv, wv[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      const float y = P::hsum(acc[i][j]);
      b.c[i * b.ldc + j] = b.G ? y : y * b.ws[j];
    }
}

// From kW8A16PanelMinRows rows: the outer-product (panel) kernel of block_panel_avx2 at twice the
// width. Per K chunk, 32 columns of weights are dequantized once (two [kc][16] fp32 panels, scales
// applied) and every 6-row group of x (pack_x_rows6's [K][6] layout) runs against them: 12
// accumulators of 16 lanes, per k 2 weight loads + 6 broadcasts per 12 FMAs.
constexpr int kFR = 6, kFC = 16;

// c [R, 32] (ldc) = (add ? c : 0) + xg . [w0 | w1] over kc values of k (xg [kc][6], w0 / w1 [kc][16]).
template <int R>
PTQRT_W16_TARGET void fpanel(const float* xg, const float* w0, const float* w1, int64_t kc, float* c, int64_t ldc,
                             bool add) {
  V acc[R][2];
  for (int i = 0; i < R; ++i) {
    acc[i][0] = add ? P::loadu(c + i * ldc) : P::zero();
    acc[i][1] = add ? P::loadu(c + i * ldc + kFC) : P::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const V a = P::loadu(w0 + k * kFC), b = P::loadu(w1 + k * kFC);
    for (int i = 0; i < R; ++i) {
      const V xb = P::set1(xg[k * kFR + i]);
      acc[i][0] = P::fmadd(xb, a, acc[i][0]);
      acc[i][1] = P::fmadd(xb, b, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    P::storeu(c + i * ldc, acc[i][0]);
    P::storeu(c + i * ldc + kFC, acc[i][1]);
  }
}

using FPanel = void (*)(const float*, const float*, const float*, int64_t, float*, int64_t, bool);
inline const FPanel fpanels[kFR] = {fpanel<1>, fpanel<2>, fpanel<3>, fpanel<4>, fpanel<5>, fpanel<6>};

// c [mb, nb] (fp32, ldc) through panels, as block_panel_avx2: x packed once per call (xp: this
// m-block's 6-row groups), K in chunks (the groups' x of one chunk ~256 KiB), 32 columns dequantized at
// a time; a panel cut short by nb runs on a scratch tile, so nothing outside c's [mb, nb] is written.
inline void block_panel(const float* xp, int64_t mb, const int8_t* w, const float* ws, int64_t nb, int64_t G,
                        int64_t gsize, int64_t K, float* c, int64_t ldc, std::vector<float>& wbuf) {
  const int64_t groups = ceil_div(mb, kFR);
  const int64_t kc_max = std::clamp<int64_t>((256 * 1024) / (groups * kFR * 4) / 8 * 8, 64, 4096);
  if (static_cast<int64_t>(wbuf.size()) < 2 * kFC * kc_max + 16) wbuf.resize(2 * kFC * kc_max + 16);
  float* const wp0 = align64(wbuf.data());
  float* const wp1 = wp0 + kFC * kc_max;
  alignas(64) float tile[kFR * 2 * kFC];
  const int64_t gs = G ? G : 1;
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    const bool add = k0 > 0;
    for (int64_t n0 = 0; n0 < nb; n0 += 2 * kFC) {
      const int64_t nr = std::min<int64_t>(2 * kFC, nb - n0);
      P::dequant(w + n0 * K, K, std::min<int64_t>(kFC, nr), ws + n0 * gs, G, gsize, k0, kc, wp0);
      // (past nb the second panel is zeros: computed, never stored)
      const int64_t nr1 = std::max<int64_t>(0, nr - kFC);
      P::dequant(nr1 ? w + (n0 + kFC) * K : w, K, nr1, nr1 ? ws + (n0 + kFC) * gs : ws, G, gsize, k0, kc, wp1);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m0 = g * kFR, mr = std::min<int64_t>(kFR, mb - m0);
        const float* xg = xp + (g * K + k0) * kFR;
        float* cg = c + m0 * ldc + n0;
        if (nr == 2 * kFC) {
          fpanels[mr - 1](xg, wp0, wp1, kc, cg, ldc, add);
          continue;
        }
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < 2 * kFC; ++j) tile[i * 2 * kFC + j] = add && j < nr ? cg[i * ldc + j] : 0.0f;
        fpanels[mr - 1](xg, wp0, wp1, kc, tile, 2 * kFC, add);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j) cg[i * ldc + j] = tile[i * 2 * kFC + j];
      }
    }
  }
}

using Tile = void (*)(const W8A16Block&);
// [mr - 1][nr - 1] for mr <= 4, nr <= 3; and one row against 1-8 columns (eight FMA chains).
inline const Tile tiles[4][3] = {
    {tile<1, 1>, tile<1, 2>, tile<1, 3>},
    {tile<2, 1>, tile<2, 2>, tile<2, 3>},
    {tile<3, 1>, tile<3, 2>, tile<3, 3>},
    {tile<4, 1>, tile<4, 2>, tile<4, 3>},
};
inline const Tile row_tiles[8] = {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>,
                                  tile<1, 5>, tile<1, 6>, tile<1, 7>, tile<1, 8>};

}  // namespace PTQRT_W16_NS
