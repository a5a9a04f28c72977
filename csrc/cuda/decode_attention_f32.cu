// int8_kv_decode_attention instances for float queries.
#include "kernels/decode_attention_launch.cuh"

namespace ptqrt {
namespace cuda {
template cudaError_t run_decode<float>(const DecodeArgs&, cudaStream_t);
}  // namespace cuda
}  // namespace ptqrt
