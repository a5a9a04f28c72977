// Shared host-side glue for the ptqrt_cuda ops: loud input checks (each names the tensor and prints
// its shape, dtype and device), dtype mapping, and the launch-error check. Only the .cpp host files
// include this; kernels never see torch.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#ifndef PTQRT_CUDA_EMU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "launch.h"

namespace ptqrt {
namespace cuda {

#ifndef PTQRT_CUDA_EMU
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline size_t smem_optin() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
inline size_t smem_per_sm() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor; }
inline bool is_sm90() {
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return p->major == 9 && p->minor == 0;
}
#else
// The CPU emulator build (csrc/cuda/emu): CPU tensors stand in for device tensors, there is no stream,
// and the "GPU" has PTQRT_EMU_SMS multiprocessors (default 8) so that split-K paths run on small shapes.
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream() { return nullptr; }
inline int sm_count() {
  const char* s = std::getenv("PTQRT_EMU_SMS");
  return s != nullptr && std::atoi(s) > 0 ? std::atoi(s) : 8;
}
inline size_t smem_optin() { return 227 * 1024; }
inline size_t smem_per_sm() { return 228 * 1024; }
inline bool is_sm90() { return true; }  // the emulator runs the sm_90a kernels too
#endif

// An environment switch read on every call: "1..." on, "0..." off, unset or anything else `dflt`.
inline bool env_switch(const char* name, bool dflt) {
  const char* s = std::getenv(name);
  if (s != nullptr && s[0] == '1') return true;
  if (s != nullptr && s[0] == '0') return false;
  return dflt;
}

// The sm_90a wgmma + TMA w8a8 kernel runs on compute capability 9.0 (M > 64; validated and measured on
// an H100, bench/NOTES.md: about twice the mma.sync kernel's rate at M >= 512). PTQRT_CUDA_WGMMA=0 turns
// it off (every GPU then runs the mma.sync kernel).
inline bool wgmma_enabled() { return env_switch("PTQRT_CUDA_WGMMA", true) && is_sm90(); }

// The sm_90a w8a16 kernel (TMA + wgmma with the weights dequantized into the register operand) for
// M > 16 on compute capability 9.0 (measured on an H100, bench/NOTES.md: 1.02-3.9x the mma.sync
// kernel, 2.6x geomean over the benchmark's shapes). PTQRT_CUDA_WGMMA_W8A16=0 turns it off (the
// mma.sync kernel then runs, as it does on every other GPU).
inline bool w8a16_wgmma_enabled() { return env_switch("PTQRT_CUDA_WGMMA_W8A16", true) && is_sm90(); }

// The streaming decode kernel (kernels/decode_stream.cuh: one pass, online softmax, coalesced K / V
// rows) serves 1-2 query heads per kv head with D in {64, 128, 256} and groups of 3-4 with D in
// {64, 128}. Measured on an H100 (bench/NOTES.md): 1.3-1.9x the two-phase kernel without GQA, and
// 1.00-1.13x (geomean 1.04) with groups of 4 too. PTQRT_CUDA_DECODE_STREAM=0 turns it off.
inline bool decode_stream_enabled() { return env_switch("PTQRT_CUDA_DECODE_STREAM", true); }

// The tensor-core decode kernel (kernels/decode_mma.cuh: fp16 / bf16 queries, D of 64 or 128, dynamic
// K and V scales, 16 query heads a CTA): opt-in with PTQRT_CUDA_DECODE_MMA=1 until measured on a GPU.
inline bool decode_mma_enabled() { return env_switch("PTQRT_CUDA_DECODE_MMA", false); }

// The fp16 / bf16 w8a16_gemm GEMV (M <= 16) with its weight loads in a per-warp cp.async ring
// (kernels/w8a16_gemv.cuh; measured on an H100, bench/NOTES.md: 1.01-1.44x the register-staged GEMV).
// PTQRT_CUDA_GEMV_RING=0 turns it off. (The w8a8 GEMV's ring ran 0.58x its register-staged GEMV
// there, geomean over the shapes, and was removed.)
inline bool gemv_ring_enabled() { return env_switch("PTQRT_CUDA_GEMV_RING", true); }

// The sm_90a w8a8 GEMM's tile width chosen by rounds of CTAs (w8a8_sm90_tile_n), with the cost of a
// 128-wide tile refitted to the H100 run that measured it: the default; PTQRT_CUDA_TILE_WAVES=0 gives
// the older rule (256-wide unless that leaves SMs idle).
inline bool tile_waves_enabled() { return env_switch("PTQRT_CUDA_TILE_WAVES", true); }

// The sm_90a w8a8 GEMM on a persistent grid, one CTA per SM taking every SMs-th tile, so that its
// producer loads the next tile while the consumers store this one (kernels/w8a8_gemm_sm90.cuh).
// Measured on an H100 (bench/NOTES.md): 1.01-1.07x one CTA a tile at M >= 512, geomean 1.03. The
// default; PTQRT_CUDA_SM90_PERSISTENT=0 gives one CTA a tile.
inline bool sm90_persistent_enabled() { return env_switch("PTQRT_CUDA_SM90_PERSISTENT", true); }

// quantize_per_token with rows of up to 4 16-byte vectors a thread kept in registers (one read of x),
// its loads issued back to back: measured on an H100 (bench/NOTES.md) 1.05-1.12x the two-pass kernel.
// The default; PTQRT_CUDA_QUANT_1PASS=0 gives the two-pass kernel.
inline bool quant_one_pass_enabled() { return env_switch("PTQRT_CUDA_QUANT_1PASS", true); }

// quantize_per_token, quantize_per_tensor and the token append kernel multiplying by 1 / s and dividing
// only near half-integers (kernels/common.cuh, ScaleDivider; the same codes): opt-in with
// PTQRT_CUDA_QUANT_RECIPROCAL=1 until measured on a GPU.
inline bool quant_reciprocal_enabled() { return env_switch("PTQRT_CUDA_QUANT_RECIPROCAL", false); }

// sm_90a w8a16: split-K no further than one wave of CTAs, as the w8a8 kernel does (there a second round
// of CTAs cost 40.5 against 24.2 us on an H100); opt-in with PTQRT_CUDA_W8A16_WAVE_CAP=1 until measured.
inline bool w8a16_wave_cap_enabled() { return env_switch("PTQRT_CUDA_W8A16_WAVE_CAP", false); }

// kv_cache_append's kernel (kernels/kv_cache.cuh), PTQRT_CUDA_APPEND_KERNEL: "token" (a CTA a token,
// 16-byte loads; the default where it applies and tokens x k / v launches are at least the SMs) or "row"
// (a warp a row, a value a lane; also wherever the token kernel does not apply). On an H200 at 4096
// tokens of 32 x 128 (fp16 k and v): token 42.7 us, row 93.6 (Triton 35.7); at 16 tokens row 5.9,
// token 6.8; a kernel with 4 values a lane (65.7 us at 4096 tokens) was removed (bench/NOTES.md).
inline AppendKernel append_kernel_choice() {
  const char* s = std::getenv("PTQRT_CUDA_APPEND_KERNEL");
  const std::string v = s != nullptr ? s : "";
  TORCH_CHECK(v.empty() || v == "token" || v == "row", "ptqrt_cuda.kv_cache_append: PTQRT_CUDA_APPEND_KERNEL must be ",
              "'token' or 'row'; got '", v, "'");
  return v == "row" ? AppendKernel::Row : AppendKernel::Token;
}

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

// A CUDA tensor of one of `dtypes`, with `dim` dimensions (-1: any), contiguous, on `device`.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t, c10::ArrayRef<at::ScalarType> dtypes,
                         int64_t dim, const at::Device* device = nullptr) {
  TORCH_CHECK(t.defined(), "ptqrt_cuda.", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(on_device(t), "ptqrt_cuda.", op, ": ", name, " must be a CUDA tensor; got ", describe(t));
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  if (!ok) {
    std::ostringstream allowed;
    for (auto d : dtypes) allowed << d << " ";
    TORCH_CHECK(false, "ptqrt_cuda.", op, ": ", name, " must have dtype ", allowed.str(), "; got ", describe(t));
  }
  TORCH_CHECK(dim < 0 || t.dim() == dim, "ptqrt_cuda.", op, ": ", name, " must be ", dim, "-D; got ", describe(t));
  TORCH_CHECK(t.is_contiguous(), "ptqrt_cuda.", op, ": ", name, " must be contiguous; got ", describe(t), ", strides ",
              t.strides());
  if (device != nullptr)
    TORCH_CHECK(t.device() == *device, "ptqrt_cuda.", op, ": ", name, " is on ", t.device(), " but the inputs are on ",
                *device);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                        const char* why = "") {
  TORCH_CHECK(t.sizes() == expected, "ptqrt_cuda.", op, ": ", name, " must have shape ", expected, " ", why, "; got ",
              describe(t));
}

inline c10::ArrayRef<at::ScalarType> kFloats() {
  static const at::ScalarType floats[] = {at::kHalf, at::kBFloat16, at::kFloat};
  return floats;
}

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    case at::kInt: return DType::I32;
    default: TORCH_CHECK(false, "ptqrt_cuda: unsupported dtype ", t);
  }
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// KV-cache scales: dynamic per token-head [num_blocks, block_size, H] (true) or static per channel [H, D]
// (false), for a cache [num_blocks, block_size, H, D].
inline bool check_kv_scale(const char* op, const char* name, const at::Tensor& scale, const at::Tensor& cache) {
  const at::Device dev = cache.device();
  check_tensor(op, name, scale, {at::kFloat}, -1, &dev);
  const int64_t nb = cache.size(0), bs = cache.size(1), h = cache.size(2), d = cache.size(3);
  if (scale.dim() == 3 && scale.size(0) == nb && scale.size(1) == bs && scale.size(2) == h) return true;
  if (scale.dim() == 2 && scale.size(0) == h && scale.size(1) == d) return false;
  TORCH_CHECK(false, "ptqrt_cuda.", op, ": ", name, " must be [num_blocks, block_size, Hkv] = [", nb, ", ", bs, ", ", h,
              "] (dynamic per token-head) or [Hkv, D] = [", h, ", ", d, "] (static per channel); got ", describe(scale));
}

inline void check_int32_range(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= INT32_MAX, "ptqrt_cuda.", op, ": ", what, " = ", v, " exceeds the kernels' 32-bit index range");
}

inline void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, "ptqrt_cuda.", op, ": CUDA error: ", cudaGetErrorString(e));
}

// A float32 contiguous copy (or the tensor itself) of an optional [n] float vector: the kernels read fp32.
inline at::Tensor as_float32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The CTAs the tensor-core GEMMs' split-K aims at (w8a8_gemm, w8a16_gemm). Small mma.sync tiles leave
// room for two CTAs per SM: two waves' worth of them; large ones one wave. The sm_90a kernels hold one
// CTA per SM and split only below 3/4 of a wave (a split adds a reduce pass).
inline int64_t split_target(bool sm90, Tile tile) {
  const int64_t sms = sm_count();
  return sm90 ? sms * 3 / 4 : sms * (tile == Tile::Small ? 2 : 1);
}

// Split-K factor for `tiles` CTA tiles of `k_tiles` K steps: enough CTAs to cover `target`, at least 2
// K-tiles per split, <= 16, and where max_ctas > 0 no more than max_ctas CTAs in all (tiles x splits).
inline int pick_splits(int64_t tiles, int64_t k_tiles, int64_t target, int64_t max_ctas = 0) {
  if (tiles >= target || k_tiles < 4) return 1;
  int64_t s = (target + tiles - 1) / tiles;
  s = std::min<int64_t>(s, k_tiles / 2);
  s = std::min<int64_t>(s, 16);
  if (max_ctas > 0) s = std::min<int64_t>(s, max_ctas / tiles);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

}  // namespace cuda
}  // namespace ptqrt
