// The CPU emulator build of every ptqrt CUDA kernel and launcher: the .cu files, compiled as C++
// against emu.h. Built only by the CPU tests (tests/test_cuda_backend.py), never into the extension
// (_build compiles csrc/cuda/*.cpp and *.cu, not this folder).
#include "emu.h"

// Files that declare `extern template` come before the files that instantiate those templates.
#include "../decode_attention_dispatch.cu"
#include "../w8a16_simple.cu"
#include "../w8a8_gemm_dispatch.cu"

#include "../decode_attention_bf16.cu"
#include "../decode_attention_f16.cu"
#include "../decode_attention_f32.cu"
#include "../kv_cache_kernels.cu"
#include "../quantize_kernels.cu"
#include "../w8a16_gemm_sm90.cu"
#include "../w8a16_gemv.cu"
#include "../w8a16_mma_bf16.cu"
#include "../w8a16_mma_f16.cu"
#include "../w8a8_gemm_bf16.cu"
#include "../w8a8_gemm_f16.cu"
#include "../w8a8_gemm_f32.cu"
#include "../w8a8_gemm_i32.cu"
#include "../w8a8_gemm_sm90.cu"
