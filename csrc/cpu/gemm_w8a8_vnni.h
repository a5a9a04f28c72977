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
// result fits in int32 (K <= 133143), hence the wrapped one equals it. Unsigned arithmetic keeps the
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

PTQRT_VNNI_TARGET void block(const W8A8Block& b) {
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

}  // namespace PTQRT_VNNI_NS
