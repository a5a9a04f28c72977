// w8a16_gemm tensor-core instances for __half activations.
#include "kernels/w8a16_mma_launch.cuh"

namespace ptqrt {
namespace cuda {
template cudaError_t run_w8a16_mma<__half>(Tile, const W8A16Args&, cudaStream_t);
}  // namespace cuda
}  // namespace ptqrt
