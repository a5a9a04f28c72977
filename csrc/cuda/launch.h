// The launchers the host glue calls: raw pointers, sizes and a stream in, a cudaError_t out.
// Torch-free, so the .cu files that define them never parse the ATen headers (fast nvcc builds),
// and the kernels can be driven from any C++ host code.
//
// Every launcher assumes the host glue has already checked dtypes, shapes, contiguity and the
// alignment conditions stated next to it; sizes are element counts.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace ptqrt {
namespace cuda {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, I32 = 3 };

// ---------------------------------------------------------------- quantize (quantize_kernels.cu)
// x [M, K] of `dt`; smooth [K] float32 or null; x_q int8 [M, K]; x_scale float32 [M].
// vec: x, smooth, x_q rows are 16-byte aligned and K is a multiple of 16 (vector loads allowed).
// one_pass: rows of up to 4 vectors a thread kept in registers (the default; PTQRT_CUDA_QUANT_1PASS=0 off).
// recip: multiply by 1 / s, dividing only near half-integers (common.cuh ScaleDivider; the same codes).
cudaError_t launch_quantize_per_token(DType dt, const void* x, const float* smooth, int8_t* x_q, float* x_scale,
                               int64_t M, int64_t K, bool vec, bool one_pass, bool recip, cudaStream_t stream);
// x [M, K] of `dt`; scale: one float32 on the device; smooth [K] float32 or null; x_q int8 [M, K].
cudaError_t launch_quantize_per_tensor(DType dt, const void* x, const float* scale, const float* smooth, int8_t* x_q,
                                int64_t M, int64_t K, bool vec, bool recip, cudaStream_t stream);

// ---------------------------------------------------------------- w8a8_gemm (w8a8_gemm_*.cu)
enum class Tile : int { Small = 0, Large = 1 };

struct W8A8Args {
  const int8_t* x;        // [M, K] int8, K a multiple of 16, 16-byte aligned
  const int8_t* w;        // [N, K] int8, same
  const float* x_scale;   // [M] or [1] (x_scale_stride 1 or 0); unused for int32 output
  int x_scale_stride;
  const float* w_scale;   // [N]
  const float* bias;      // [N] float32 or null
  void* out;              // [M, N] of the output dtype
  int32_t* partial;       // [splits, M, N] int32 when splits > 1, else null
  int M, N, K;
  int splits;             // split-K factor (grid z)
  int ctas = 0;           // sm_90a kernel only: CTAs along grid x, each taking every ctas-th tile (0: one per tile)
};
// The int8 tensor-core GEMM (mma.sync m16n8k32). With splits > 1 it writes raw int32 partial sums
// to args.partial and w8a8_split_reduce applies the epilogue.
cudaError_t w8a8_gemm_mma(DType out, Tile tile, const W8A8Args& args, cudaStream_t stream);
cudaError_t w8a8_split_reduce(DType out, const W8A8Args& args, cudaStream_t stream);
// M <= 16 (decode): one launch, int8 tensor cores fed straight from global memory (kernels/w8a8_gemv.cuh).
// Ignores args.partial / args.splits.
cudaError_t w8a8_gemv(DType out, const W8A8Args& args, cudaStream_t stream);
// Tile sizes, so the host can count tiles when it picks the split factor.
void w8a8_tile_shape(Tile tile, int* bm, int* bn, int* bk);
// The sm_90a kernel: TMA loads and wgmma (kernels/w8a8_gemm_sm90.cuh), CTA tiles 128 x `bn` (128 or
// 256, from w8a8_sm90_tile_n). Only for a compute capability 9.0 device; K > 0. Returns
// cudaErrorNotSupported when the driver offers no tensor-map encoder. Same split-K contract as
// w8a8_gemm_mma.
cudaError_t w8a8_gemm_sm90(DType out, int bn, const W8A8Args& args, cudaStream_t stream);
int w8a8_sm90_tile_n(int M, int N, int sms, bool waves = false);
void w8a8_sm90_tile_shape(int* bm, int* bk);  // tile rows, K bytes per stage (any bn)

// ---------------------------------------------------------------- w8a16_gemm (w8a16_*.cu)
struct W8A16Args {
  const void* x;          // [M, K] of the activation dtype
  const int8_t* w;        // [N, K] int8
  const float* w_scale;   // [N] (group_size 0) or [N, K / group_size]
  const float* bias;      // [N] float32 or null
  void* out;              // [M, N], activation dtype
  float* partial;         // [splits, M, N] float32 when splits > 1, else null
  int M, N, K;
  int group_size;         // 0: per channel
  int splits;
  bool ring;              // M <= 16, fp16 / bf16: the cp.async-ring GEMV (PTQRT_CUDA_GEMV_RING=0: off)
};
// M <= 16; K % 16 == 0 and x, w 16-byte aligned.
cudaError_t w8a16_gemv(DType dt, const W8A16Args& args, cudaStream_t stream);
// dt f16/bf16; K % 16 == 0, x, w 16-byte aligned; group_size 0 or a multiple of 16.
cudaError_t w8a16_mma(DType dt, Tile tile, const W8A16Args& args, cudaStream_t stream);
cudaError_t w8a16_split_reduce(DType dt, const W8A16Args& args, cudaStream_t stream);
void w8a16_tile_shape(Tile tile, int* bm, int* bn, int* bk);
// The sm_90a kernel (kernels/w8a16_gemm_sm90.cuh): TMA loads, wgmma with the weights as the register
// operand. Compute capability 9.0 only; dt f16/bf16, K > 0 and K % 16 == 0, x and w 16-byte aligned,
// group_size 0 or a multiple of 16; `bt` tokens per CTA (64, 128 or 256, from
// w8a16_sm90_tokens_per_cta). Split-K contract of w8a16_mma. cudaErrorNotSupported when the driver
// offers no tensor-map encoder.
cudaError_t w8a16_gemm_sm90(DType dt, int bt, const W8A16Args& args, cudaStream_t stream);
int w8a16_sm90_tokens_per_cta(int M, int N, int sms);
void w8a16_sm90_tile_shape(int* bn, int* bk);  // weight rows per CTA, k per stage
// Any shape, alignment and group size (CUDA cores, fp32 FMA): odd shapes and fp32 activations.
cudaError_t w8a16_simple(DType dt, const W8A16Args& args, cudaStream_t stream);

// ---------------------------------------------------------------- kv_cache_append (kv_cache_kernels.cu)
struct KvStream {           // one of k / v
  const void* src;          // [T, H, D] of the source dtype
  int8_t* cache;            // [num_blocks, block_size, H, D]
  float* scale;             // dynamic: [num_blocks, block_size, H] (written); static: [H, D] (read)
  bool dynamic;
};
// kv_cache_append's kernels (kernels/kv_cache.cuh): a warp a row, a CTA a token.
enum class AppendKernel { Row, Token };
struct KvAppendArgs {
  KvStream kv[2];
  int streams;              // 1 or 2 (k and v in one launch when their dtypes agree)
  const void* slots;        // [T] int64 or int32; negative = padding, skipped
  bool slots_i64;
  int T, H, D;
  int64_t num_slots;        // num_blocks * block_size: slots at or past it are skipped (never written)
  AppendKernel kernel = AppendKernel::Row;  // the host's choice (kv_cache_append.cpp)
  bool recip = false;       // the token kernel's dynamic rows through ScaleDivider (PTQRT_CUDA_QUANT_RECIPROCAL=1)
};
cudaError_t launch_kv_cache_append(DType dt, const KvAppendArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------- int8_kv_decode_attention (decode_attention_*.cu)
struct DecodeArgs {
  const void* q;              // [B, Hq, D]
  const int8_t* k_cache;      // [num_blocks, block_size, Hkv, D]
  const int8_t* v_cache;
  const float* k_scale;       // dynamic [num_blocks, block_size, Hkv] or static [Hkv, D]
  const float* v_scale;
  bool k_dynamic, v_dynamic;
  const int32_t* block_table; // [B, max_blocks]
  const int32_t* seq_lens;    // [B]
  void* out;                  // [B, Hq, D], q's dtype
  float* part_acc;            // [B, Hq, splits, D] float32 when splits > 1
  float* part_ml;             // [B, Hq, splits, 2] float32 (running max, sum of exp) when splits > 1
  int B, Hq, Hkv, D;
  int num_blocks, block_size, max_blocks;
  float sm_scale;
  int splits, chunk;          // the KV range [0, max_blocks * block_size) cut into `splits` chunks of `chunk` tokens
  bool vec;                   // k_cache and v_cache start 16-byte aligned (vector loads when D allows)
  bool stream;                // the streaming kernel (decode_stream.cuh) where it fits; else decode_attention.cuh
  bool mma = false;           // the tensor-core kernel (decode_mma.cuh; 16 query heads a CTA) where it fits:
                              // set when it is switched on and q is fp16 / bf16 (decode_mma_fits has the rest)
};
// Query heads one CTA serves: the GQA group size rounded up to 1, 2, 4 or 8; a group larger than 8 is
// served by several CTAs, each of which reads the kv head again.
inline int decode_heads_per_cta(int group) { return group <= 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8; }
// Query heads one CTA of the kernel that serves `a` takes: 16 for the tensor-core kernel where it fits
// (decode_mma_fits), else decode_heads_per_cta(Hq / Hkv).
int decode_cta_rows(const DecodeArgs& a);
// Largest chunk one CTA handles (its scores live in shared memory).
constexpr int kDecodeMaxChunk = 1024;
cudaError_t launch_int8_kv_decode_attention(DType dt, const DecodeArgs& args, cudaStream_t stream);
// Dynamic shared memory the attention kernel needs for these sizes (args.chunk included), so the host
// can shrink the chunk, or refuse, when it does not fit the device.
size_t decode_attention_smem_bytes(const DecodeArgs& args);
// CTAs of the streaming (or tensor-core) decode kernel one SM holds (by its shared memory, at most 4),
// or 0 where neither serves `a` (a.D, a.stream, a.mma, a.vec, a.num_blocks, a.block_size, the scales'
// kinds, a.Hq / a.Hkv read).
int decode_stream_ctas_per_sm(const DecodeArgs& a, size_t smem_per_sm);

}  // namespace cuda
}  // namespace ptqrt
