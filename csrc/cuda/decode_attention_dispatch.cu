// Query-dtype dispatch for int8_kv_decode_attention; instances live in decode_attention_{f16,bf16,f32}.cu.
#include "launch.h"
#include "kernels/decode_attention_launch.cuh"

namespace ptqrt {
namespace cuda {

extern template cudaError_t run_decode<__half>(const DecodeArgs&, cudaStream_t);
extern template cudaError_t run_decode<__nv_bfloat16>(const DecodeArgs&, cudaStream_t);
extern template cudaError_t run_decode<float>(const DecodeArgs&, cudaStream_t);

size_t decode_attention_smem_bytes(const DecodeArgs& a) {
  return decode_smem_bytes(decode_heads_per_cta(a.Hq / a.Hkv), a.D, a.chunk);
}

int decode_cta_rows(const DecodeArgs& a) { return decode_mma_fits(a) ? kMmaRows : decode_heads_per_cta(a.Hq / a.Hkv); }

int decode_stream_ctas_per_sm(const DecodeArgs& a, size_t smem_per_sm) {
  const int gt = decode_heads_per_cta(a.Hq / a.Hkv);
  const bool mma = decode_mma_fits(a);
  if (!mma && !decode_stream_fits(a, gt)) return 0;
  const size_t dyn = mma ? decode_mma_smem_bytes(a.D) : decode_stream_smem_bytes(decode_stream_cols(gt));
  const size_t per_cta = dyn + 1024;  // + the driver's 1 KB a CTA
  const size_t n = smem_per_sm / per_cta;
  // Registers bound it too: the MMA kernel at D = 128 has 157-160 a thread on sm_90a and sm_80 (3 CTAs of
  // 128 threads in 64 K registers); the others fit 4. (Counts from ptxas -v; revisit when they change.)
  const size_t cap = mma && a.D == 128 ? 3 : 4;
  return static_cast<int>(n < 1 ? 1 : n > cap ? cap : n);
}

cudaError_t launch_int8_kv_decode_attention(DType dt, const DecodeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.Hq == 0 || a.D == 0) return cudaSuccess;
  switch (dt) {
    case DType::F16: return run_decode<__half>(a, stream);
    case DType::BF16: return run_decode<__nv_bfloat16>(a, stream);
    case DType::F32: return run_decode<float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ptqrt
