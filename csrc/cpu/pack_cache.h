// Weights in a kernel's packed layout, kept between calls ("packed weights prepared once at load
// time"): the first w8a8_gemm call with a weight packs it, later calls with the same weight reuse
// the copy (AVX2: 16-column panels of k pairs; VNNI: 32-column panels of k quads plus each column's
// offset correction). The ops keep their [N, K] contract, so the cache is keyed by the weight itself.
//
// An entry is valid while its weight's storage is alive (a weak reference), at the same address,
// with the same shape and the same version counter (an in-place write to the weight bumps it, so
// the next call repacks; the version is read before packing, so a write during the packing is seen
// too). Entries are keyed by address, kernel layout and shape: a weight and a view of its leading
// rows are cached side by side. Entries of freed weights are dropped at the next insert and every
// 256 lookups. Writes that bypass the version counter (through `.data`, a numpy view or the raw
// storage) are not seen: `ptqrt.prepack` (pack_weight, `snapshot`) packs afresh, replacing any copy.
// Inference tensors track no version, so a call never caches one; `ptqrt.prepack` packs them as
// snapshots, which calls then use as they are: a later in-place write to such a weight (possible
// only inside inference mode) is not seen until it is packed again, as with any prepacked weight
// (fbgemm's included). The copies take memory beside the weights: at most a budget of bytes, from
// PTQRT_CPU_PACK_MB (MiB; 0 turns the cache off), by default a quarter of physical memory (or of the
// container's cgroup limit, where lower); a weight that does not fit is simply not cached.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace ptqrt_cpu {

// The packed copy of w (contiguous, [N, K]) in `layout` (a kernel's tag; `bytes` long, written by `pack`),
// or an undefined tensor when it is not cached (budget; an inference tensor that was not packed by
// `snapshot`). snapshot (pack_weight, at load time): packed afresh even where a copy is cached (an
// inference tensor's is then kept without a version check). Thread-safe; the packing itself runs
// outside the lock.
at::Tensor packed_weight(const at::Tensor& w, int layout, int64_t bytes,
                         const std::function<void(const at::Tensor& w, int8_t* dst)>& pack, bool snapshot = false);

// {entries, bytes held, budget in bytes}.
std::vector<int64_t> pack_cache_info();
void pack_cache_clear();
// Sets the budget (bytes, >= 0), drops every entry, returns the previous budget.
int64_t pack_cache_set_budget(int64_t bytes);

}  // namespace ptqrt_cpu
