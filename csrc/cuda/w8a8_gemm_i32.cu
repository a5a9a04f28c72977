// w8a8_gemm instances with int32_t output (one file per output dtype: parallel, incremental builds).
#include "kernels/w8a8_gemm_launch.cuh"

namespace ptqrt {
namespace cuda {
template cudaError_t run_w8a8<int32_t>(Tile, const W8A8Args&, cudaStream_t);
template cudaError_t run_w8a8_split_reduce<int32_t>(const W8A8Args&, cudaStream_t);
template cudaError_t run_w8a8_gemv<int32_t>(const W8A8Args&, cudaStream_t);
}  // namespace cuda
}  // namespace ptqrt
