// Registers the ptqrt_cuda ops: the shared schemas (op_schemas.h, the ptqrt:: ones of ptqrt/ops.py)
// and their CUDA implementations. Loading the library with torch.ops.load_library needs no GPU.
#ifndef PTQRT_CUDA_EMU
#include <Python.h>
#endif

#include <torch/library.h>

#include "op_schemas.h"
#include "ops.h"

// The CPU emulator build (csrc/cuda/emu) registers the same ops as ptqrt_cuda_emu on the CPU key.
#ifdef PTQRT_CUDA_EMU
#define PTQRT_CUDA_NS ptqrt_cuda_emu
#define PTQRT_CUDA_KEY CPU
#else
#define PTQRT_CUDA_NS ptqrt_cuda
#define PTQRT_CUDA_KEY CUDA
#endif
// One level of indirection so that the namespace macro expands before TORCH_LIBRARY pastes it.
#define PTQRT_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define PTQRT_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

PTQRT_TORCH_LIBRARY(PTQRT_CUDA_NS, m) { ptqrt_define_ops(m); }

PTQRT_TORCH_LIBRARY_IMPL(PTQRT_CUDA_NS, PTQRT_CUDA_KEY, m) {
  m.impl("quantize_per_token", &ptqrt::cuda::quantize_per_token);
  m.impl("quantize_per_tensor", &ptqrt::cuda::quantize_per_tensor);
  m.impl("w8a8_gemm", &ptqrt::cuda::w8a8_gemm);
  m.impl("w8a16_gemm", &ptqrt::cuda::w8a16_gemm);
  m.impl("kv_cache_append", &ptqrt::cuda::kv_cache_append);
  m.impl("int8_kv_decode_attention", &ptqrt::cuda::int8_kv_decode_attention);
}

#ifndef PTQRT_CUDA_EMU
// setup.py's ahead-of-time build imports the library as the Python module ptqrt._C_cuda; importing it
// runs the registrations above. The module itself is empty.
static struct PyModuleDef ptqrt_c_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&ptqrt_c_cuda_module); }
#endif
