// Host side of the TMA loads of the sm_90a kernels: cuTensorMapEncodeTiled, reached through the
// runtime (nothing links against the driver library), and 2-D byte-addressed tensor maps. Torch-free.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>

namespace ptqrt {
namespace cuda {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's encoder, or null when the driver offers none (callers then use another kernel).
inline EncodeTiled encode_tiled() {
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

// A [rows, row_bytes] byte matrix (rows `row_bytes` apart: a multiple of 16, base 16-byte aligned)
// loaded as boxes of box_rows x box_bytes into shared memory with `swizzle`; out-of-bounds bytes
// arrive as zeros. Element types wider than a byte are addressed in bytes (c0 = k * sizeof(T)).
inline bool make_map_2d(CUtensorMap* map, const void* base, int64_t rows, int64_t row_bytes, int box_bytes,
                        int box_rows, CUtensorMapSwizzle swizzle) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_bytes), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace cuda
}  // namespace ptqrt
