// Host glue of kv_cache_append: check, then one launch for k and v (two when their dtypes differ).
#include "host.h"
#include "ops.h"

namespace ptqrt {
namespace cuda {

void kv_cache_append(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     at::Tensor& k_scale, at::Tensor& v_scale, const at::Tensor& slots) {
  const char* op = "kv_cache_append";
  check_tensor(op, "k_cache", k_cache, {at::kChar}, 4);
  const at::Device dev = k_cache.device();
  check_tensor(op, "v_cache", v_cache, {at::kChar}, 4, &dev);
  check_shape(op, "v_cache", v_cache, k_cache.sizes(), "(same layout as k_cache)");
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), H = k_cache.size(2), D = k_cache.size(3);
  check_tensor(op, "k", k, kFloats(), 3, &dev);
  const int64_t T = k.size(0);
  check_shape(op, "k", k, {T, H, D}, "([T, Hkv, D] matching the cache)");
  check_tensor(op, "v", v, kFloats(), 3, &dev);
  check_shape(op, "v", v, {T, H, D}, "([T, Hkv, D] matching the cache)");
  const bool k_dyn = check_kv_scale(op, "k_scale", k_scale, k_cache);
  const bool v_dyn = check_kv_scale(op, "v_scale", v_scale, v_cache);
  check_tensor(op, "slots", slots, {at::kLong, at::kInt}, 1, &dev);
  check_shape(op, "slots", slots, {T}, "(one slot per new token)");
  check_int32_range(op, "T", T);
  check_int32_range(op, "Hkv", H);
  check_int32_range(op, "D", D);

  const DeviceGuard guard(dev);
  if (T == 0 || H == 0 || D == 0) return;
  KvAppendArgs a{};
  a.kv[0] = KvStream{k.data_ptr(), k_cache.data_ptr<int8_t>(), k_scale.data_ptr<float>(), k_dyn};
  a.kv[1] = KvStream{v.data_ptr(), v_cache.data_ptr<int8_t>(), v_scale.data_ptr<float>(), v_dyn};
  a.slots = slots.data_ptr();
  a.slots_i64 = slots.scalar_type() == at::kLong;
  a.T = static_cast<int>(T);
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  a.num_slots = nb * bs;
  a.recip = quant_reciprocal_enabled();
  // The kernel for each launch: the token kernel where chosen (the default), with at least as many
  // tokens x streams as SMs (one CTA a token: fewer leave the GPU idle; the row kernel's CTAs of 4
  // rows ran faster at 16 tokens), D = 16 / element bytes x a power of two up to 32 and aligned
  // operands; else the row kernel.
  auto aligned = [](const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  const bool token = append_kernel_choice() == AppendKernel::Token;
  auto pick = [&](const KvAppendArgs& x, int64_t es) {  // es: the launch's source element size
    const int64_t vec = 16 / es, lanes = D / vec;  // values a lane, lanes a row
    bool ok = token && int64_t(x.T) * x.streams >= sm_count() && D % vec == 0 && lanes <= 32 &&
              (lanes & (lanes - 1)) == 0;
    for (int i = 0; i < x.streams; ++i) {
      const KvStream& st = x.kv[i];
      ok = ok && aligned(st.src, 16) && aligned(st.cache, vec) && (st.dynamic || aligned(st.scale, 16));
    }
    return ok ? AppendKernel::Token : AppendKernel::Row;
  };
  const cudaStream_t stream = current_stream();
  if (k.scalar_type() == v.scalar_type()) {
    a.streams = 2;
    a.kernel = pick(a, k.element_size());
    check_launch(op, launch_kv_cache_append(to_dtype(k.scalar_type()), a, stream));
  } else {
    KvAppendArgs b = a;
    a.streams = 1;
    a.kernel = pick(a, k.element_size());
    check_launch(op, launch_kv_cache_append(to_dtype(k.scalar_type()), a, stream));
    b.kv[0] = b.kv[1];
    b.streams = 1;
    b.kernel = pick(b, v.element_size());
    check_launch(op, launch_kv_cache_append(to_dtype(v.scalar_type()), b, stream));
  }
}

}  // namespace cuda
}  // namespace ptqrt
