// int8_kv_decode_attention instances for __nv_bfloat16 queries.
#include "kernels/decode_attention_launch.cuh"

namespace ptqrt {
namespace cuda {
template cudaError_t run_decode<__nv_bfloat16>(const DecodeArgs&, cudaStream_t);
}  // namespace cuda
}  // namespace ptqrt
