// Output-dtype dispatch for w8a8_gemm; the instances live in w8a8_gemm_{f16,bf16,f32,i32}.cu.
#include "kernels/w8a8_gemm_launch.cuh"

namespace ptqrt {
namespace cuda {

// Explicitly instantiated in the per-dtype files; declared here so this file instantiates nothing.
extern template cudaError_t run_w8a8<__half>(Tile, const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8<__nv_bfloat16>(Tile, const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8<float>(Tile, const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8<int32_t>(Tile, const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_split_reduce<__half>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_split_reduce<__nv_bfloat16>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_split_reduce<float>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_split_reduce<int32_t>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_gemv<__half>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_gemv<__nv_bfloat16>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_gemv<float>(const W8A8Args&, cudaStream_t);
extern template cudaError_t run_w8a8_gemv<int32_t>(const W8A8Args&, cudaStream_t);

cudaError_t w8a8_gemm_mma(DType out, Tile tile, const W8A8Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  switch (out) {
    case DType::F16: return run_w8a8<__half>(tile, a, stream);
    case DType::BF16: return run_w8a8<__nv_bfloat16>(tile, a, stream);
    case DType::F32: return run_w8a8<float>(tile, a, stream);
    case DType::I32: return run_w8a8<int32_t>(tile, a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t w8a8_gemv(DType out, const W8A8Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.M > 16) return cudaErrorInvalidValue;
  switch (out) {
    case DType::F16: return run_w8a8_gemv<__half>(a, stream);
    case DType::BF16: return run_w8a8_gemv<__nv_bfloat16>(a, stream);
    case DType::F32: return run_w8a8_gemv<float>(a, stream);
    case DType::I32: return run_w8a8_gemv<int32_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t w8a8_split_reduce(DType out, const W8A8Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  switch (out) {
    case DType::F16: return run_w8a8_split_reduce<__half>(a, stream);
    case DType::BF16: return run_w8a8_split_reduce<__nv_bfloat16>(a, stream);
    case DType::F32: return run_w8a8_split_reduce<float>(a, stream);
    case DType::I32: return run_w8a8_split_reduce<int32_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

void w8a8_tile_shape(Tile tile, int* bm, int* bn, int* bk) {
  *bm = tile == Tile::Large ? W8A8Large::BM : W8A8Small::BM;
  *bn = tile == Tile::Large ? W8A8Large::BN : W8A8Small::BN;
  *bk = W8A8Large::BK;
}

}  // namespace cuda
}  // namespace ptqrt
