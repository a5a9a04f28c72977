// The host glue of the ptqrt_cuda ops, built for the CPU emulator: registered as ptqrt_cuda_emu on the
// CPU key, CPU tensors in place of CUDA tensors (see host.h and registration.cpp).
#ifndef PTQRT_CUDA_EMU
#define PTQRT_CUDA_EMU 1
#endif

#include "../decode_attention.cpp"
#include "../kv_cache_append.cpp"
#include "../quantize.cpp"
#include "../registration.cpp"
#include "../w8a16_gemm.cpp"
#include "../w8a8_gemm.cpp"
