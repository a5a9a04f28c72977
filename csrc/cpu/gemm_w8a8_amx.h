// The AMX-INT8 w8a8 block kernel (the default from 16 rows on AMX CPUs; PTQRT_CPU_AMX), written once
// against a small policy of tile operations, like gemm_w8a8_vnni.h.
//
// Included twice by gemm_w8a8.cpp (deliberately no include guard):
//   PTQRT_AMX_NS = amx_native,   PTQRT_AMX_POLICY = AmxNative    (the instructions, x86-64 only)
//   PTQRT_AMX_NS = amx_emulated, PTQRT_AMX_POLICY = AmxEmulated  (a portable model of each one)
// so the tiling, tails and layouts are tested on CPUs without AMX (under avx512-emulated).
//
// tdpbssd multiplies signed by signed int8 and adds groups of four products into int32 lanes:
// C [16 rows][16 int32] += A [16 rows][64 int8] . B [16 quad rows][16 columns][4 int8], exact (no
// offset correction, unlike vpdpbusd's u8 x s8). B is exactly the cached VNNI quads' layout: a
// 32-column panel's quad row is 128 bytes, columns 0-15 then 16-31, so one half of a panel over 16
// quads (64 k) is one B tile, loaded with a 128-byte stride. A is x itself, K-contiguous rows,
// from a per-call copy padded with zeros to a multiple of 64 k and 16 rows past M.
//
// Per 32 rows x 32 columns: 4 accumulator tiles (tmm0-3), 2 x tiles (tmm4-5), 2 weight tiles
// (tmm6-7); per 64 k, 4 loads and 4 tdpbssd (16 x 16 x 64 multiply-adds each). The accumulators
// stay in the tiles over the whole K, and only the block's [mb, nb] part is stored.

namespace PTQRT_AMX_NS {

using T = PTQRT_AMX_POLICY;

// Every tile 16 rows x 64 bytes (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64, "the tile configuration is 64 bytes");

// A tile of C (tmm `t`) to c [rows, cols] (ldc int32s apart): straight when whole, else through
// a scratch tile, so nothing outside the block is written.
template <int t>
inline void store_c(int32_t* c, int64_t ldc, int64_t rows, int64_t cols, int32_t* scratch) {
  if (rows >= 16 && cols >= 16) {
    T::template store<t>(c, ldc * 4);
    return;
  }
  T::template store<t>(scratch, 64);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(c + i * ldc, scratch + i * 16, cols * 4);
}

// c [mb, nb] = x . w^T over all of K. b.xamx: this block's first row of the padded x copy (kp = K
// rounded up to 64 bytes per row, zeros past K and for 16 rows past M); b.wquads: the block's first
// panel of the cached quads (a block starts on a panel). Rows past mb and columns past nb are
// computed from padding or from the neighbours' data, and never stored.
inline void block(const W8A8Block& b) {
  const int64_t kp = round_up(b.K, 64), nkb = kp / 64, nq_all = ceil_div(b.K, 4);
  const int64_t tail = nq_all - (nkb - 1) * 16;  // quad rows in the last 64-k block: 1..16
  alignas(64) int8_t wtail[16 * 128];            // that block's quads, zero rows past `tail`
  alignas(64) int32_t scratch[16 * 16];
  static const TileConfig cfg;
  T::config(&cfg);
  for (int64_t n0 = 0; n0 < b.nb; n0 += 32) {
    const int8_t* wq = b.wquads + (n0 / 32) * nq_all * 128;
    if (tail < 16) {  // the last block's tile would read past the panel: a zero-padded copy instead
      std::memset(wtail, 0, sizeof(wtail));
      std::memcpy(wtail, wq + (nkb - 1) * 16 * 128, tail * 128);
    }
    const int64_t cols = std::min<int64_t>(32, b.nb - n0);
    for (int64_t m0 = 0; m0 < b.mb; m0 += 32) {
      const bool two = b.mb - m0 > 16;  // a second row tile
      const int8_t* x0 = b.xamx + m0 * kp;
      T::template zero<0>();
      T::template zero<1>();
      if (two) {
        T::template zero<2>();
        T::template zero<3>();
      }
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int8_t* wk = (kb == nkb - 1 && tail < 16) ? wtail : wq + kb * 16 * 128;
        T::template load<4>(x0 + kb * 64, kp);
        T::template load<6>(wk, 128);
        T::template load<7>(wk + 64, 128);
        T::template dp<0, 4, 6>();
        T::template dp<1, 4, 7>();
        if (two) {
          T::template load<5>(x0 + 16 * kp + kb * 64, kp);
          T::template dp<2, 5, 6>();
          T::template dp<3, 5, 7>();
        }
      }
      int32_t* c = b.c + m0 * b.ldc + n0;
      const int64_t rows0 = std::min<int64_t>(16, b.mb - m0);
      store_c<0>(c, b.ldc, rows0, cols, scratch);
      if (cols > 16) store_c<1>(c + 16, b.ldc, rows0, cols - 16, scratch);
      if (two) {
        const int64_t rows1 = std::min<int64_t>(16, b.mb - m0 - 16);
        store_c<2>(c + 16 * b.ldc, b.ldc, rows1, cols, scratch);
        if (cols > 16) store_c<3>(c + 16 * b.ldc + 16, b.ldc, rows1, cols - 16, scratch);
      }
    }
  }
  T::release();
}

}  // namespace PTQRT_AMX_NS
