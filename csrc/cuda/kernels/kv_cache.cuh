// kv_cache_append: quantize new keys / values into the paged int8 cache, in place.
//
//   dynamic (scale [num_blocks, block_size, H]):  s = absmax_d(x[t, h, :]) / 127 (1 if 0), written
//   static  (scale [H, D]):                       s = scale[h, d], read
//   cache[slot, h, d] = rne(x[t, h, d] / s), clamped to [-127, 127], NaN -> 0
//
// One warp per (token, head) row of D values; grid.y picks k or v. A negative slot is padding; a slot
// at or past num_blocks * block_size would write outside the cache and is skipped as well.
#pragma once

#include "../launch.h"
#include "common.cuh"

namespace ptqrt {
namespace cuda {

constexpr int kAppendWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kAppendWarps * kWarp) kv_cache_append_kernel(KvAppendArgs a) {
  const KvStream s = blockIdx.y == 0 ? a.kv[0] : a.kv[1];  // no dynamic index into the parameter space
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t unit = int64_t(blockIdx.x) * kAppendWarps + warp;  // (token, head)
  if (unit >= int64_t(a.T) * a.H) return;
  const int t = static_cast<int>(unit / a.H), h = static_cast<int>(unit % a.H);
  const int64_t slot = a.slots_i64 ? static_cast<const int64_t*>(a.slots)[t] : static_cast<const int32_t*>(a.slots)[t];
  if (slot < 0 || slot >= a.num_slots) return;

  const T* src = static_cast<const T*>(s.src) + unit * a.D;
  int8_t* dst = s.cache + (slot * a.H + h) * a.D;
  if (s.dynamic) {
    float amax = 0.f;
    for (int d = lane; d < a.D; d += kWarp) amax = nan_max(amax, fabsf(to_float(src[d])));
    const float sc = absmax_scale(warp_nan_max(amax));
    if (lane == 0) s.scale[slot * a.H + h] = sc;
    for (int d = lane; d < a.D; d += kWarp) dst[d] = round_clamp_int8(to_float(src[d]) / sc);
  } else {
    const float* sc = s.scale + int64_t(h) * a.D;
    for (int d = lane; d < a.D; d += kWarp) dst[d] = round_clamp_int8(to_float(src[d]) / sc[d]);
  }
}

}  // namespace cuda
}  // namespace ptqrt
