// w8a16_gemm: dtype dispatch, the CUDA-core fallback kernel and the split-K reduction.
#include <algorithm>

#include "kernels/w8a16_mma_launch.cuh"
#include "kernels/w8a16_simple.cuh"

namespace ptqrt {
namespace cuda {

extern template cudaError_t run_w8a16_mma<__half>(Tile, const W8A16Args&, cudaStream_t);
extern template cudaError_t run_w8a16_mma<__nv_bfloat16>(Tile, const W8A16Args&, cudaStream_t);

namespace {

// Row tiles go along grid y (at most max_grid_yz of them); past that, one launch per that many tiles'
// rows, x and out starting at the piece's first row.
template <typename T>
cudaError_t simple(const W8A16Args& a, cudaStream_t stream) {
  auto kernel = w8a16_simple_kernel<T>;
  const int64_t rows = max_grid_yz() * kSimpleBM;
  for (int64_t m0 = 0; m0 < a.M; m0 += rows) {
    const int m = static_cast<int>(std::min<int64_t>(rows, a.M - m0));
    const dim3 grid(ceil_div(a.N, kSimpleBN), ceil_div(m, kSimpleBM));
    PTQRT_LAUNCH(kernel, grid, 256, 0, stream)(static_cast<const T*>(a.x) + m0 * a.K, a.w, a.w_scale, a.bias,
                                               static_cast<T*>(a.out) + m0 * a.N, m, a.N, a.K, a.group_size);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t split_reduce(const W8A16Args& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.M) * a.N;
  const int64_t blocks = total / 256 + 1 < 16384 ? total / 256 + 1 : 16384;
  auto kernel = w8a16_split_reduce_kernel<T>;
  PTQRT_LAUNCH(kernel, static_cast<unsigned>(blocks), 256, 0, stream)(a.partial, a.w_scale, a.bias, static_cast<T*>(a.out),
                                                                      a.M, a.N, a.splits, a.group_size);
  return cudaGetLastError();
}

}  // namespace

cudaError_t w8a16_mma(DType dt, Tile tile, const W8A16Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  switch (dt) {
    case DType::F16: return run_w8a16_mma<__half>(tile, a, stream);
    case DType::BF16: return run_w8a16_mma<__nv_bfloat16>(tile, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t w8a16_split_reduce(DType dt, const W8A16Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  switch (dt) {
    case DType::F16: return split_reduce<__half>(a, stream);
    case DType::BF16: return split_reduce<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

void w8a16_tile_shape(Tile tile, int* bm, int* bn, int* bk) {
  *bm = tile == Tile::Large ? W8A16Large::BM : W8A16Small::BM;
  *bn = tile == Tile::Large ? W8A16Large::BN : W8A16Small::BN;
  *bk = W8A16Large::BK;
}

cudaError_t w8a16_simple(DType dt, const W8A16Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  switch (dt) {
    case DType::F16: return simple<__half>(a, stream);
    case DType::BF16: return simple<__nv_bfloat16>(a, stream);
    case DType::F32: return simple<float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ptqrt
