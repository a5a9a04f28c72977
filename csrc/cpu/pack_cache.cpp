// The packed-weight cache (see pack_cache.h).
#include "pack_cache.h"

#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unistd.h>

namespace ptqrt_cpu {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const c10::StorageImpl* storage_raw;
  int64_t version;  // -1: an inference tensor's snapshot (no version counter to compare)
  at::Tensor data;
  int64_t bytes;
};

int64_t default_budget() {
  if (const char* env = std::getenv("PTQRT_CPU_PACK_MB")) {
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && errno == 0 && mb >= 0 && mb <= (INT64_MAX >> 20),
                "PTQRT_CPU_PACK_MB must be a whole number of MiB from 0 to ", INT64_MAX >> 20, "; got '", env, "'");
    return static_cast<int64_t>(mb) << 20;
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  int64_t mem = pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : int64_t(16) << 30;
  // A container's memory limit, where it is lower (cgroup v2, then v1; "max" or a huge value: none).
  for (const char* path : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    if (FILE* f = std::fopen(path, "r")) {
      long long limit = 0;
      if (std::fscanf(f, "%lld", &limit) == 1 && limit > 0 && limit < mem) mem = limit;
      std::fclose(f);
    }
  }
  return mem / 4;
}

struct Cache {
  std::mutex mu;
  // By address, layout and shape: a weight and a view of its leading rows (a fused QKV weight and its
  // Q part) start at one address and are cached side by side.
  std::map<std::tuple<const void*, int, int64_t, int64_t>, Entry> entries;  // (address, layout, N, K)
  int64_t bytes = 0;
  int64_t budget = -1;  // read from the environment on first use
  uint32_t lookups = 0;
  uint64_t generation = 0;  // bumped when everything is dropped (clear, new budget)

  void sweep() {  // drop the entries of freed weights
    for (auto it = entries.begin(); it != entries.end();) {
      if (it->second.storage.expired()) {
        bytes -= it->second.bytes;
        it = entries.erase(it);
      } else {
        ++it;
      }
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no teardown order against torch's allocator
  return *c;
}

bool same_weight(const Entry& e, const at::Tensor& w) {
  const c10::StorageImpl* impl = w.storage().unsafeGetStorageImpl();
  if (e.storage_raw != impl) return false;  // (the shape is part of the key)
  if (e.version != (w.is_inference() ? -1 : static_cast<int64_t>(w._version()))) return false;
  const auto alive = e.storage.lock();  // expired or replaced by another storage at the same address
  return alive.get() == impl;
}

}  // namespace

at::Tensor packed_weight(const at::Tensor& w, int layout, int64_t bytes,
                         const std::function<void(const at::Tensor& w, int8_t* dst)>& pack, bool snapshot) {
  TORCH_CHECK(w.dim() == 2, "ptqrt_cpu: the packed-weight cache takes [N, K] weights; got ", w.sizes());
  if (!w.has_storage()) return at::Tensor();
  const bool inference = w.is_inference();
  // The version the copy is made from, read before packing: a write that lands while it is being
  // packed bumps the weight's version past it, so the next call repacks.
  const int64_t version = inference ? -1 : static_cast<int64_t>(w._version());
  Cache& c = cache();
  const auto key = std::make_tuple(static_cast<const void*>(w.data_ptr()), layout, w.size(0), w.size(1));
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.budget < 0) c.budget = default_budget();
    if (c.budget == 0) return at::Tensor();
    if (++c.lookups % 256 == 0) c.sweep();
    auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      if (same_weight(it->second, w) && it->second.bytes == bytes && !snapshot) return it->second.data;
      c.bytes -= it->second.bytes;  // stale (the weight was written in place or freed), or packed afresh
      c.entries.erase(it);
    }
    if (inference && !snapshot) return at::Tensor();  // no version to check later: only pack_weight packs these
    c.sweep();
    if (c.bytes + bytes > c.budget) return at::Tensor();
    c.bytes += bytes;  // reserved while packing
    generation = c.generation;
  }
  // Packed outside the lock (it runs at::parallel_for, and other weights' lookups need not wait).
  at::Tensor data;
  try {
    data = at::empty({bytes}, w.options().dtype(at::kChar));
    pack(w, data.data_ptr<int8_t>());
  } catch (...) {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.generation == generation) c.bytes -= bytes;
    throw;
  }
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.generation != generation) return data;  // cleared meanwhile (the reservation went with it)
  c.bytes -= bytes;
  auto it = c.entries.find(key);
  if (it != c.entries.end()) {
    // Packed twice at once: keep the other copy unless this one was asked for afresh.
    if (same_weight(it->second, w) && it->second.bytes == bytes && it->second.version == version && !snapshot)
      return it->second.data;
    c.bytes -= it->second.bytes;
    c.entries.erase(it);
  }
  c.entries.emplace(key, Entry{w.storage().getWeakStorageImpl(), w.storage().unsafeGetStorageImpl(), version, data,
                               bytes});
  c.bytes += bytes;
  return data;
}

std::vector<int64_t> pack_cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.budget < 0) c.budget = default_budget();
  c.sweep();
  return {static_cast<int64_t>(c.entries.size()), c.bytes, c.budget};
}

void pack_cache_clear() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
  c.bytes = 0;
  ++c.generation;
}

int64_t pack_cache_set_budget(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "ptqrt_cpu.pack_cache_set_budget: the budget must be >= 0 bytes; got ", bytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int64_t old = c.budget < 0 ? default_budget() : c.budget;
  c.entries.clear();
  c.bytes = 0;
  ++c.generation;
  c.budget = bytes;
  return old;
}

}  // namespace ptqrt_cpu
