// Launcher of the sm_90a w8a16 GEMM (kernels/w8a16_gemm_sm90.cuh): TMA tensor maps, grid, dtype and
// token-tile dispatch.
#include "launch.h"
#include "kernels/w8a16_gemm_sm90.cuh"

#include "tma.h"

namespace ptqrt {
namespace cuda {
namespace {

template <typename T, int BT>
cudaError_t launch_tile(const W8A16Args& a, cudaStream_t stream) {
  using C = sm90::W8A16Sm90<BT>;
  CUtensorMap tx, tw;
  // x: [M, 2K] bytes in boxes of BT rows x 128 bytes; w: [N, K] bytes in boxes of 128 rows x 64 bytes.
  if (!make_map_2d(&tx, a.x, a.M, int64_t(a.K) * 2, 2 * C::BK, BT, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map_2d(&tw, a.w, a.N, a.K, C::BK, C::BN, CU_TENSOR_MAP_SWIZZLE_64B))
    return cudaErrorNotSupported;
  auto kernel = sm90::w8a16_gemm_sm90_kernel<T, BT>;
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, C::kSmemBytes, granted);
  if (e != cudaSuccess) return e;
  const dim3 grid(ceil_div(a.M, BT) * ceil_div(a.N, C::BN), 1, a.splits);
  PTQRT_LAUNCH(kernel, grid, C::kThreads, C::kSmemBytes, stream)(tx, tw, a.w_scale, a.bias, static_cast<T*>(a.out),
                                                                a.splits > 1 ? a.partial : nullptr, a.M, a.N, a.K,
                                                                a.group_size);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bt(int bt, const W8A16Args& a, cudaStream_t stream) {
  switch (bt) {
    case 64: return launch_tile<T, 64>(a, stream);
    case 128: return launch_tile<T, 128>(a, stream);
    case 256: return launch_tile<T, 256>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t w8a16_gemm_sm90(DType dt, int bt, const W8A16Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.K == 0) return cudaErrorInvalidValue;  // a tensor map needs a non-empty K
  switch (dt) {
    case DType::F16: return launch_bt<__half>(bt, a, stream);
    case DType::BF16: return launch_bt<__nv_bfloat16>(bt, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

int w8a16_sm90_tokens_per_cta(int M, int N, int sms) {
  // The widest token tile that still gives every SM a CTA (wider tiles reuse each converted weight
  // fragment over more tokens); split-K fills the GPU when even 64 does not.
  const int bn = sm90::W8A16Sm90<64>::BN;
  for (int bt : {256, 128}) {
    if (M > bt / 2 && int64_t(ceil_div(M, bt)) * ceil_div(N, bn) >= sms) return bt;
  }
  return M > 64 ? 128 : 64;
}

void w8a16_sm90_tile_shape(int* bn, int* bk) {
  *bn = sm90::W8A16Sm90<64>::BN;
  *bk = sm90::W8A16Sm90<64>::BK;
}

}  // namespace cuda
}  // namespace ptqrt
