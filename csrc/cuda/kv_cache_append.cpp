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
  if (append_vec4_enabled() && D % 4 == 0 && D <= 512) {
    // 4 values a lane: the sources aligned to 4 of their values, the caches to 4 bytes, a static
    // scale to 16 bytes (rows of D % 4 == 0 values keep every row so).
    auto aligned = [](const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    a.vec4 = aligned(k.data_ptr(), 4 * k.element_size()) && aligned(v.data_ptr(), 4 * v.element_size()) &&
             aligned(a.kv[0].cache, 4) && aligned(a.kv[1].cache, 4) && (k_dyn || aligned(a.kv[0].scale, 16)) &&
             (v_dyn || aligned(a.kv[1].scale, 16));
  }
  const cudaStream_t stream = current_stream();
  if (k.scalar_type() == v.scalar_type()) {
    a.streams = 2;
    check_launch(op, launch_kv_cache_append(to_dtype(k.scalar_type()), a, stream));
  } else {
    KvAppendArgs b = a;
    a.streams = 1;
    check_launch(op, launch_kv_cache_append(to_dtype(k.scalar_type()), a, stream));
    b.kv[0] = b.kv[1];
    b.streams = 1;
    check_launch(op, launch_kv_cache_append(to_dtype(v.scalar_type()), b, stream));
  }
}

}  // namespace cuda
}  // namespace ptqrt
