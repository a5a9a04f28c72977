// Launcher of the sm_90a w8a8 GEMM (kernels/w8a8_gemm_sm90.cuh): TMA tensor maps, grid, dtype dispatch.
#include "launch.h"
#include "kernels/w8a8_gemm_sm90.cuh"

#ifndef PTQRT_CUDA_EMU
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#endif

namespace ptqrt {
namespace cuda {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver through the runtime, so nothing links against libcuda.
EncodeTiled encode_tiled() {
#ifdef PTQRT_CUDA_EMU
  return &emu::encode_tiled;
#else
  static EncodeTiled fn = []() -> EncodeTiled {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status) != cudaSuccess)
      return nullptr;
#else
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &status) != cudaSuccess) return nullptr;
#endif
    return status == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiled>(p) : nullptr;
  }();
  return fn;
#endif
}

// [rows, K] int8, K-contiguous (K % 16 == 0, 16-byte aligned) as boxes of box_rows x 128 bytes, written
// to shared memory in 128-byte swizzled rows; out-of-bounds elements read as zero.
bool make_map(CUtensorMap* map, const int8_t* base, int rows, int K, int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K)};  // bytes between rows
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(sm90::kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename OutT>
cudaError_t launch(const W8A8Args& a, cudaStream_t stream) {
  CUtensorMap tx, tw;
  if (!make_map(&tx, a.x, a.M, a.K, sm90::kBM) || !make_map(&tw, a.w, a.N, a.K, sm90::kBN)) return cudaErrorNotSupported;
  auto kernel = sm90::w8a8_gemm_sm90_kernel<OutT>;
  static bool done[64] = {};  // the shared-memory opt-in is per device
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 64 || !done[dev]) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm90::kSmemBytes);
    if (e != cudaSuccess) return e;
    if (dev < 64) done[dev] = true;
  }
  const dim3 grid(ceil_div(a.M, sm90::kBM) * ceil_div(a.N, sm90::kBN), 1, a.splits);
  W8A8Epilogue epi{a.x_scale, a.x_scale_stride, a.w_scale, a.bias};
  PTQRT_LAUNCH(kernel, grid, sm90::kThreads, sm90::kSmemBytes, stream)(tx, tw, epi, static_cast<OutT*>(a.out),
                                                                      a.splits > 1 ? a.partial : nullptr, a.M, a.N, a.K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t w8a8_gemm_sm90(DType out, const W8A8Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.K == 0) return cudaErrorInvalidValue;  // a tensor map needs a non-empty K; the host uses mma.sync
  switch (out) {
    case DType::F16: return launch<__half>(a, stream);
    case DType::BF16: return launch<__nv_bfloat16>(a, stream);
    case DType::F32: return launch<float>(a, stream);
    case DType::I32: return launch<int32_t>(a, stream);
  }
  return cudaErrorInvalidValue;
}

void w8a8_sm90_tile_shape(int* bm, int* bn, int* bk) {
  *bm = sm90::kBM;
  *bn = sm90::kBN;
  *bk = sm90::kBK;
}

}  // namespace cuda
}  // namespace ptqrt
