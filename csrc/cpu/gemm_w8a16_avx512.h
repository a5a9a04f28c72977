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

// From kW8A16PanelMinRows rows: the AVX2 panel kernel at twice the width (panel_driver<2>): two
// dequantized [kc][16] panels a step against each 6-row group, 12 accumulators of 16 lanes, per k 2
// weight loads + 6 broadcasts per 12 FMAs.

// c [R, 32] (ldc) = (add ? c : 0) + xg . [w0 | w1] over kc values of k (xg [kc][6], w0 / w1 [kc][16]).
template <int R>
PTQRT_W16_TARGET void fpanel(const float* xg, const float* w0, const float* w1, int64_t kc, float* c, int64_t ldc,
                             bool add) {
  V acc[R][2];
  for (int i = 0; i < R; ++i) {
    acc[i][0] = add ? P::loadu(c + i * ldc) : P::zero();
    acc[i][1] = add ? P::loadu(c + i * ldc + kPC) : P::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const V a = P::loadu(w0 + k * kPC), b = P::loadu(w1 + k * kPC);
    for (int i = 0; i < R; ++i) {
      const V xb = P::set1(xg[k * kPR + i]);
      acc[i][0] = P::fmadd(xb, a, acc[i][0]);
      acc[i][1] = P::fmadd(xb, b, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    P::storeu(c + i * ldc, acc[i][0]);
    P::storeu(c + i * ldc + kPC, acc[i][1]);
  }
}

using FPanel = void (*)(const float*, const float*, const float*, int64_t, float*, int64_t, bool);
inline const FPanel fpanels[kPR] = {fpanel<1>, fpanel<2>, fpanel<3>, fpanel<4>, fpanel<5>, fpanel<6>};

inline void block_panel(const float* xp, int64_t mb, const int8_t* w, const float* ws, int64_t nb, int64_t G,
                        int64_t gsize, int64_t K, float* c, int64_t ldc, std::vector<float>& wbuf) {
  panel_driver<2>(xp, mb, w, ws, nb, G, gsize, K, c, ldc, wbuf, P::dequant,
                  [](int64_t rows, const float* xg, const float* const* panels, int64_t kc, float* cc, int64_t ld,
                     bool add) { fpanels[rows - 1](xg, panels[0], panels[1], kc, cc, ld, add); });
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
