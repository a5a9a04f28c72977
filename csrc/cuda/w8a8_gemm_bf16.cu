// w8a8_gemm instances with __nv_bfloat16 output (one file per output dtype: parallel, incremental builds).
#include "kernels/w8a8_gemm_launch.cuh"

namespace ptqrt {
namespace cuda {
template cudaError_t run_w8a8<__nv_bfloat16>(Tile, const W8A8Args&, cudaStream_t);
template cudaError_t run_w8a8_split_reduce<__nv_bfloat16>(const W8A8Args&, cudaStream_t);
template cudaError_t run_w8a8_gemv<__nv_bfloat16>(const W8A8Args&, cudaStream_t);
}  // namespace cuda
}  // namespace ptqrt
