// The ptqrt_cpu ops: the shared schemas (op_schemas.h) plus two ISA queries and the packed-weight
// cache's controls (pack_cache.h), and their CPU kernels.
// Loaded either with torch.ops.load_library (just-in-time build) or imported as the module
// ptqrt._C_cpu (ahead-of-time build), hence the empty module below.
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "op_schemas.h"
#include "pack_cache.h"

namespace ptqrt_cpu {

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const std::optional<at::Tensor>& smooth);
at::Tensor quantize_per_tensor(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& smooth);
at::Tensor w8a8_gemm(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);
at::Tensor w8a16_gemm(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, int64_t group_size);
void kv_cache_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& slots);
at::Tensor int8_kv_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& k_scale, const at::Tensor& v_scale,
                                    const at::Tensor& block_table, const at::Tensor& seq_lens, double sm_scale);

bool pack_weight(const at::Tensor& w);
std::string last_w8a8_path();
std::string last_w8a16_path();

// The path auto picks on this CPU, and the one the next call takes (PTQRT_CPU_ISA honoured).
std::string best_isa_name() { return isa_name(best_isa()); }
std::string active_isa_name() { return isa_name(active_isa()); }
bool has_amx_op() { return has_amx(); }

}  // namespace ptqrt_cpu

TORCH_LIBRARY(ptqrt_cpu, m) {
  ptqrt_define_ops(m);
  m.def("best_isa() -> str", &ptqrt_cpu::best_isa_name);
  m.def("active_isa() -> str", &ptqrt_cpu::active_isa_name);
  m.def("has_amx() -> bool", &ptqrt_cpu::has_amx_op);
  m.def("last_w8a8_path() -> str", &ptqrt_cpu::last_w8a8_path);
  m.def("last_w8a16_path() -> str", &ptqrt_cpu::last_w8a16_path);
  m.def("pack_cache_info() -> int[]", &ptqrt_cpu::pack_cache_info);
  m.def("pack_cache_clear() -> ()", &ptqrt_cpu::pack_cache_clear);
  m.def("pack_cache_set_budget(int bytes) -> int", &ptqrt_cpu::pack_cache_set_budget);
  m.def("pack_weight(Tensor w_q) -> bool", &ptqrt_cpu::pack_weight);
}

TORCH_LIBRARY_IMPL(ptqrt_cpu, CPU, m) {
  m.impl("quantize_per_token", &ptqrt_cpu::quantize_per_token);
  m.impl("quantize_per_tensor", &ptqrt_cpu::quantize_per_tensor);
  m.impl("w8a8_gemm", &ptqrt_cpu::w8a8_gemm);
  m.impl("w8a16_gemm", &ptqrt_cpu::w8a16_gemm);
  m.impl("kv_cache_append", &ptqrt_cpu::kv_cache_append);
  m.impl("int8_kv_decode_attention", &ptqrt_cpu::int8_kv_decode_attention);
}

// setup.py builds this library as the Python extension module ptqrt._C_cpu; importing it is what
// registers the ops above, so the module itself is empty.
static struct PyModuleDef ptqrt_c_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cpu(void) { return PyModule_Create(&ptqrt_c_cpu_module); }
