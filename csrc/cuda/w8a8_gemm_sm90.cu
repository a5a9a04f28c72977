// Launcher of the sm_90a w8a8 GEMM (kernels/w8a8_gemm_sm90.cuh): TMA tensor maps, grid, dtype dispatch.
#include "launch.h"
#include "kernels/w8a8_gemm_sm90.cuh"

#include "tma.h"

namespace ptqrt {
namespace cuda {
namespace {

template <typename OutT, int BN>
cudaError_t launch(const W8A8Args& a, cudaStream_t stream) {
  using C = sm90::W8A8Sm90<BN>;
  // [rows, K] int8 (K % 16 == 0, 16-byte aligned) as boxes of rows x 128 bytes in 128-byte swizzled rows.
  CUtensorMap tx, tw;
  if (!make_map_2d(&tx, a.x, a.M, a.K, C::kBK, C::kBM, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map_2d(&tw, a.w, a.N, a.K, C::kBK, C::kBN, CU_TENSOR_MAP_SWIZZLE_128B))
    return cudaErrorNotSupported;
  auto kernel = sm90::w8a8_gemm_sm90_kernel<OutT, BN>;
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, C::kSmemBytes, granted);
  if (e != cudaSuccess) return e;
  const int tiles = ceil_div(a.M, C::kBM) * ceil_div(a.N, C::kBN);
  const dim3 grid(a.ctas > 0 && a.ctas < tiles ? a.ctas : tiles, 1, a.splits);
  W8A8Epilogue epi{a.x_scale, a.x_scale_stride, a.w_scale, a.bias};
  int32_t* partial = a.splits > 1 ? a.partial : nullptr;
  PTQRT_LAUNCH(kernel, grid, C::kThreads, C::kSmemBytes, stream)(tx, tw, epi, static_cast<OutT*>(a.out), partial,
                                                                a.M, a.N, a.K);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t launch_bn(int bn, const W8A8Args& a, cudaStream_t stream) {
  return bn == 128 ? launch<OutT, 128>(a, stream) : bn == 256 ? launch<OutT, 256>(a, stream) : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t w8a8_gemm_sm90(DType out, int bn, const W8A8Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.K == 0) return cudaErrorInvalidValue;  // a tensor map needs a non-empty K; the host uses mma.sync
  switch (out) {
    case DType::F16: return launch_bn<__half>(bn, a, stream);
    case DType::BF16: return launch_bn<__nv_bfloat16>(bn, a, stream);
    case DType::F32: return launch_bn<float>(bn, a, stream);
    case DType::I32: return launch_bn<int32_t>(bn, a, stream);
  }
  return cudaErrorInvalidValue;
}

int w8a8_sm90_tile_n(int M, int N, int sms, bool waves) {
  const int64_t tiles_m = ceil_div(M, sm90::W8A8Sm90<256>::kBM);
  if (waves) {
    // One CTA per SM: a grid takes ceil(tiles / sms) rounds of its tile's time. Pick the width with
    // fewer rounds x cost, a 128-wide tile costing 0.6 of a 256-wide one (it reloads x twice as often;
    // fitted to an H100: 512 x 11008 ran 62.4 us in 2 rounds of 256-wide tiles and 48.6 in 3 of
    // 128-wide ones, 512 x 28672 194 us in 4 rounds and 204 in 7: 0.52 and 0.60 of a round).
    const int64_t r256 = ceil_div64(tiles_m * ceil_div(N, 256), sms), r128 = ceil_div64(tiles_m * ceil_div(N, 128), sms);
    return r128 * 3 < r256 * 5 ? 128 : 256;
  }
  // 256-wide tiles (fewer B reloads per A tile) unless they leave SMs idle where 128-wide ones would not.
  return tiles_m * ceil_div(N, 256) < sms && ceil_div(N, 256) < ceil_div(N, 128) ? 128 : 256;
}

void w8a8_sm90_tile_shape(int* bm, int* bk) {
  *bm = sm90::W8A8Sm90<256>::kBM;
  *bk = sm90::W8A8Sm90<256>::kBK;
}

}  // namespace cuda
}  // namespace ptqrt
