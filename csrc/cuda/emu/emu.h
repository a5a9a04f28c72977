// A small SIMT emulator that runs ptqrt's CUDA kernels, unchanged, on the CPU.
//
// Why: the kernels must be right before they ever meet a GPU, and most kernel bugs are index bugs --
// a fragment mapped to the wrong row, a tail not predicated, a collective called by half a warp, a
// stage read before its copy landed. This header gives the kernels what nvcc would: threadIdx and
// friends, __syncthreads, __shfl_xor_sync, and the PTX operations the kernels wrap (cp.async,
// ldmatrix, mma.sync) with the fragment layouts of the PTX ISA. Every CUDA thread is a coroutine
// (ucontext); a CTA runs its threads round-robin, switching at every collective, so:
//   * ldmatrix / mma / shuffles need all 32 lanes of the warp, calling the same operation -- a
//     divergent or partial collective is reported as an error (on hardware it is undefined);
//   * __syncthreads needs every live thread of the CTA; a deadlock is reported, not hung;
//   * cp.async copies land only at the cp.async.wait_group that allows them to (the latest moment
//     the hardware may pick), so a stage read too early reads stale data;
//   * ldmatrix and cp.async check 16-byte alignment;
//   * a launch checks its grid against a GPU's limits (lowerable for tests: see Launch).
// Dynamic shared memory starts filled with 0xff bytes (NaN as float) so reads of unwritten shared
// memory show. Not emulated: memory-model races beyond these, timing, atomics (unused).
//
// Build: define PTQRT_CUDA_EMU and include this header before any kernel header; see
// csrc/cuda/emu/emu_kernels.cpp. Single-threaded, and only for tests.
#pragma once

#ifndef PTQRT_CUDA_EMU
#define PTQRT_CUDA_EMU 1
#endif

// Execution-space qualifiers vanish: every kernel and device function becomes a host function.
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Static __shared__ arrays: one copy shared by the threads of the CTA being run (CTAs run one at a time).
#undef __shared__
#define __shared__ static

namespace ptqrt {
namespace emu {

struct Thread {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  int linear = 0;
  bool done = false;
  // cp.async groups not yet landed: the open group, and the committed ones (oldest first).
  struct Copy {
    void* dst;
    const void* src;
    bool pred;
    int bytes = 16;
  };
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};

struct Warp {
  int arrived = 0;
  uint64_t gen = 0;
  const char* op = nullptr;
  const void* addr[32];
  uint32_t in[32][12];   // per lane: A fragment 0-3, B 4-5, C 6-9 (or a shuffled word and its lane operand)
  uint32_t out[32][12];
};

struct Block {
  uint3 bid;
  dim3 bdim, gdim;
  int nthreads = 0, live = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  uint64_t events = 0;  // bumped on any progress; a scheduler pass without progress is a deadlock
  std::vector<uint8_t> smem;
  std::shared_ptr<void> sm90;  // Hopper state (warpgroups, mbarriers), created by emu_sm90.h on first use
  std::function<void()> body;
  ucontext_t sched;
  std::string error;
};

inline Block* g_block = nullptr;
inline Thread* g_thread = nullptr;

// Coroutine stacks, allocated once (uninitialized) and reused by every CTA.
constexpr size_t kStackBytes = 256 * 1024;
inline char* stack_for(int i) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (static_cast<int>(pool.size()) <= i) pool.emplace_back(new char[kStackBytes]);
  return pool[i].get();
}

[[noreturn]] inline void fail(const std::string& msg) {
  // Called on a coroutine stack: record, hand control back to the scheduler for good.
  std::ostringstream s;
  s << "ptqrt CUDA emulator: block (" << g_block->bid.x << "," << g_block->bid.y << "," << g_block->bid.z
    << ") thread " << g_thread->linear << ": " << msg;
  g_block->error = s.str();
  g_thread->done = true;
  swapcontext(&g_thread->ctx, &g_block->sched);
  std::abort();  // never resumed
}

inline void yield() { swapcontext(&g_thread->ctx, &g_block->sched); }

inline void* dynamic_smem() { return g_block->smem.data(); }

// ------------------------------------------------------------------ cp.async
inline void land(const Thread::Copy& c) {
  if (c.pred)
    std::memcpy(c.dst, c.src, c.bytes);
  else
    std::memset(c.dst, 0, c.bytes);
}
inline void land_groups(Thread* t, size_t keep) {
  while (t->groups.size() > keep) {
    for (const auto& c : t->groups.front()) land(c);
    t->groups.erase(t->groups.begin());
  }
}

// ------------------------------------------------------------------ collectives
// A collective over threads [first, first + size) of the CTA, whose state is `S` (arrived, gen, op):
// each thread has written its inputs into S; returns once all `size` threads have arrived, after
// `compute` (run by the last to arrive) has produced the outputs.
template <class State, class F>
inline void group_collective(State& S, int first, int size, const char* op, F&& compute) {
  Block* b = g_block;
  if (S.arrived == 0) {
    S.op = op;
  } else if (std::strcmp(S.op, op) != 0) {
    fail(std::string("divergent collective: ") + op + " while other threads of the group wait in " + S.op);
  }
  for (int l = 0; l < size; ++l)
    if (first + l >= b->nthreads || b->threads[first + l].done)
      fail(std::string(op) + " called while thread " + std::to_string(first + l) + " of the group has exited");
  ++S.arrived;
  ++b->events;
  if (S.arrived == size) {
    compute(S);
    S.arrived = 0;
    ++S.gen;
    return;
  }
  const uint64_t gen = S.gen;
  while (S.gen == gen) yield();
}

template <class F>
inline void warp_collective(const char* op, F&& compute) {
  const int w = g_thread->linear / 32;
  group_collective(g_block->warps[w], w * 32, 32, op, std::forward<F>(compute));
}

inline void syncthreads() {
  Block* b = g_block;
  ++b->bar_arrived;
  ++b->events;
  if (b->bar_arrived == b->live) {
    b->bar_arrived = 0;
    ++b->bar_gen;
    return;
  }
  const uint64_t gen = b->bar_gen;
  while (b->bar_gen == gen) yield();
}

inline int lane_id() { return g_thread->linear % 32; }

// ------------------------------------------------------------------ running a grid
inline void (*g_exit_hook)() = nullptr;  // emu_sm90.h: no wgmma may be left in flight at exit

inline void thread_entry() {
  Thread* t = g_thread;
  g_block->body();
  land_groups(t, 0);
  if (g_exit_hook != nullptr) g_exit_hook();
  t->done = true;
  Block* b = g_block;
  --b->live;
  ++b->events;
  Warp& W = b->warps[t->linear / 32];
  if (W.arrived > 0) fail(std::string("exited while other lanes of its warp wait in ") + W.op);
  if (b->bar_arrived > 0 && b->bar_arrived == b->live) {  // exited threads do not hold a barrier back
    b->bar_arrived = 0;
    ++b->bar_gen;
  }
  swapcontext(&t->ctx, &b->sched);
}

inline void run_block(Block& b) {
  g_block = &b;
  const int n = b.nthreads;
  if (n % 32 != 0) throw std::runtime_error("ptqrt CUDA emulator: block size must be a multiple of 32");
  b.threads.assign(n, Thread{});
  b.warps.assign(n / 32, Warp{});
  b.live = n;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    t.tid = make_uint3(i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y));
    t.stack = stack_for(i);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &b.sched;
    makecontext(&t.ctx, reinterpret_cast<void (*)()>(&thread_entry), 0);
  }
  int remaining = n;
  while (remaining > 0) {
    const uint64_t before = b.events;
    for (int i = 0; i < n; ++i) {
      Thread& t = b.threads[i];
      if (t.done) continue;
      g_thread = &t;
      swapcontext(&b.sched, &t.ctx);
      if (!b.error.empty()) throw std::runtime_error(b.error);
    }
    remaining = 0;
    for (const Thread& t : b.threads) remaining += t.done ? 0 : 1;
    if (remaining > 0 && b.events == before) {
      std::ostringstream s;
      s << "ptqrt CUDA emulator: deadlock in block (" << b.bid.x << "," << b.bid.y << "," << b.bid.z << "): "
        << remaining << " threads wait (barrier arrivals " << b.bar_arrived << " of " << b.live << ")";
      for (const Warp& w : b.warps)
        if (w.arrived) s << "; a warp waits in " << w.op << " with " << w.arrived << " lanes";
      throw std::runtime_error(s.str());
    }
  }
  g_thread = nullptr;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), per kernel: a
// launch with more than 48 KiB of dynamic shared memory needs it on hardware, so it fails here without
// it. (Static shared memory counts toward that limit too; the emulator does not see its size.)
inline std::map<const void*, size_t>& smem_granted() {
  static std::map<const void*, size_t> granted;
  return granted;
}
template <class Kernel>
inline cudaError_t func_set_attribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    smem_granted()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// The grid limits of a CUDA GPU (gridDim.x <= 2^31 - 1, gridDim.y and gridDim.z <= 65535); a launch past
// them, or with an empty grid, fails here as it does on hardware. PTQRT_EMU_GRID_X / PTQRT_EMU_GRID_YZ
// lower them (never raise them), so that tests reach the launchers' pieces at small sizes.
inline int64_t grid_limit(const char* name, int64_t hw) {
  const char* s = std::getenv(name);
  const long long v = s != nullptr ? std::atoll(s) : 0;
  return v > 0 && v < hw ? v : hw;
}
inline int64_t max_grid_x() { return grid_limit("PTQRT_EMU_GRID_X", 2147483647); }
inline int64_t max_grid_yz() { return grid_limit("PTQRT_EMU_GRID_YZ", 65535); }

template <class Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args... args) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > max_grid_x() || grid.y > max_grid_yz() ||
        grid.z > max_grid_yz()) {
      std::ostringstream s;
      s << "ptqrt CUDA emulator: grid (" << grid.x << ", " << grid.y << ", " << grid.z
        << ") is empty or past the limits (" << max_grid_x() << ", " << max_grid_yz() << ", " << max_grid_yz() << ")";
      throw std::runtime_error(s.str());
    }
    if (smem > 48 * 1024) {
      const auto it = smem_granted().find(reinterpret_cast<const void*>(kernel));
      if (it == smem_granted().end() || it->second < smem)
        throw std::runtime_error("ptqrt CUDA emulator: a launch with " + std::to_string(smem) +
                                 " bytes of dynamic shared memory (above 48 KiB) without cudaFuncSetAttribute("
                                 "cudaFuncAttributeMaxDynamicSharedMemorySize) for that kernel");
    }
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          Block b;
          b.bid = make_uint3(x, y, z);
          b.bdim = block;
          b.gdim = grid;
          b.nthreads = static_cast<int>(block.x * block.y * block.z);
          b.smem.assign(smem, 0xff);
          auto k = kernel;
          b.body = [k, args...]() { k(args...); };
          run_block(b);
        }
    g_block = nullptr;
  }
};
template <class Kernel>
inline Launch<Kernel> launcher(Kernel kernel, dim3 grid, dim3 block, size_t smem) {
  return Launch<Kernel>{kernel, grid, block, smem};
}

}  // namespace emu
}  // namespace ptqrt

// ------------------------------------------------------------------ CUDA built-ins
#define threadIdx (::ptqrt::emu::g_thread->tid)
#define blockIdx (::ptqrt::emu::g_block->bid)
#define blockDim (::ptqrt::emu::g_block->bdim)
#define gridDim (::ptqrt::emu::g_block->gdim)

inline void __syncthreads() { ptqrt::emu::syncthreads(); }

namespace ptqrt {
namespace emu {
// A full-warp 32-bit shuffle: lane l receives the value of lane src(l, arg of lane l).
template <typename T, typename F>
inline T shuffle(unsigned mask, T v, int arg, int width, const char* op, F src) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu || width != 32) fail("only full-warp shuffles are emulated");
  Warp& W = g_block->warps[g_thread->linear / 32];
  const int lane = lane_id();
  std::memcpy(&W.in[lane][0], &v, 4);
  std::memcpy(&W.in[lane][1], &arg, 4);
  warp_collective(op, [src](Warp& w) {
    for (int l = 0; l < 32; ++l) {
      int a;
      std::memcpy(&a, &w.in[l][1], 4);
      w.out[l][0] = w.in[src(l, a)][0];
    }
  });
  T r;
  std::memcpy(&r, &W.out[lane][0], 4);
  return r;
}
}  // namespace emu
}  // namespace ptqrt

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ptqrt::emu::shuffle(mask, v, lane_mask, width, "shfl.xor", [](int l, int a) { return (l ^ a) & 31; });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ptqrt::emu::shuffle(mask, v, src_lane, width, "shfl.idx", [](int, int a) { return a & 31; });
}

// A full-warp vote: bit l set where lane l's predicate is non-zero.
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) ptqrt::emu::fail("only full-warp __ballot_sync is emulated");
  ptqrt::emu::Warp& W = ptqrt::emu::g_block->warps[ptqrt::emu::g_thread->linear / 32];
  const int lane = ptqrt::emu::lane_id();
  W.in[lane][0] = pred != 0;
  ptqrt::emu::warp_collective("vote.ballot", [](ptqrt::emu::Warp& w) {
    uint32_t b = 0;
    for (int l = 0; l < 32; ++l) b |= (w.in[l][0] & 1u) << l;
    for (int l = 0; l < 32; ++l) w.out[l][0] = b;
  });
  return W.out[lane][0];
}

// A full-warp barrier: every lane's shared-memory writes before it are seen by every lane after it. (The
// lanes run one at a time between collectives, so without it a lane reading a write of a lane that
// runs after it reads what was there before: lane 0 always does.)
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ptqrt::emu::fail("only full-warp __syncwarp is emulated");
  ptqrt::emu::warp_collective("syncwarp", [](ptqrt::emu::Warp&) {});
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }  // default mode: ties to even
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }  // volatile: never contracted
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }

// Device min/max overloads that CUDA provides for mixed int widths.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// Runtime calls the launchers make.
// Runtime calls the launchers make; kernel failures surface as exceptions from the launch instead.
namespace ptqrt {
namespace emu {
inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
}  // namespace emu
}  // namespace ptqrt
#define cudaGetLastError() (cudaSuccess)
#define cudaFuncSetAttribute(kernel, attr, value) ::ptqrt::emu::func_set_attribute(kernel, attr, value)
#define cudaGetDevice(p) ::ptqrt::emu::get_device(p)

// ------------------------------------------------------------------ the PTX operations of common.cuh
namespace ptqrt {
namespace cuda {

inline void cp_async16(void* dst, const void* src, bool pred) {
  if ((reinterpret_cast<uintptr_t>(dst) & 15) || (pred && (reinterpret_cast<uintptr_t>(src) & 15)))
    emu::fail("cp.async with a misaligned 16-byte address");
  emu::g_thread->open.push_back({dst, src, pred});
}
inline void cp_async_small(void* dst, const void* src, int bytes) {
  if ((reinterpret_cast<uintptr_t>(dst) % bytes) || (reinterpret_cast<uintptr_t>(src) % bytes))
    emu::fail("cp.async with a misaligned " + std::to_string(bytes) + "-byte address");
  emu::g_thread->open.push_back({dst, src, true, bytes});
}
inline void cp_async4(void* dst, const void* src) { cp_async_small(dst, src, 4); }
inline void cp_async8(void* dst, const void* src) { cp_async_small(dst, src, 8); }
inline void cp_async_commit() {
  emu::g_thread->groups.push_back(std::move(emu::g_thread->open));
  emu::g_thread->open.clear();
}
template <int N>
inline void cp_async_wait() { emu::land_groups(emu::g_thread, N); }

// ldmatrix .x4 .b16: lane l gives the row address of matrix l / 8, row l % 8; register j of lane l
// receives bytes 4 (l % 4) .. +3 of row l / 4 of matrix j.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15) emu::fail("ldmatrix row address not 16-byte aligned");
  auto& W = emu::g_block->warps[emu::g_thread->linear / 32];
  const int lane = emu::lane_id();
  W.addr[lane] = p;
  emu::warp_collective("ldmatrix.x4", [](emu::Warp& w) {
    for (int l = 0; l < 32; ++l)
      for (int j = 0; j < 4; ++j)
        std::memcpy(&w.out[l][j], static_cast<const uint8_t*>(w.addr[j * 8 + l / 4]) + 4 * (l % 4), 4);
  });
  for (int j = 0; j < 4; ++j) r[j] = W.out[lane][j];
}

// mma.m16n8k32 s8: A reg i byte e -> (row g + 8 (i & 1), k 4t + e + 16 (i >> 1)); B reg j byte e ->
// (k 4t + e + 16 j, col g); C reg r -> (row g + 8 (r >> 1), col 2t + (r & 1)); g = lane / 4, t = lane % 4.
inline void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& W = emu::g_block->warps[emu::g_thread->linear / 32];
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) W.in[lane][i] = a[i];
  W.in[lane][4] = b0;
  W.in[lane][5] = b1;
  for (int r = 0; r < 4; ++r) W.in[lane][6 + r] = static_cast<uint32_t>(d[r]);
  emu::warp_collective("mma.m16n8k32.s8", [](emu::Warp& w) {
    int8_t A[16][32], B[32][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i)
        for (int e = 0; e < 4; ++e)
          A[g + 8 * (i & 1)][4 * t + e + 16 * (i >> 1)] = static_cast<int8_t>((w.in[l][i] >> (8 * e)) & 0xff);
      for (int j = 0; j < 2; ++j)
        for (int e = 0; e < 4; ++e) B[4 * t + e + 16 * j][g] = static_cast<int8_t>((w.in[l][4 + j] >> (8 * e)) & 0xff);
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
        int32_t s = static_cast<int32_t>(w.in[l][6 + r]);
        for (int k = 0; k < 32; ++k) s += int32_t(A[row][k]) * int32_t(B[k][col]);
        w.out[l][r] = static_cast<uint32_t>(s);
      }
    }
  });
  for (int r = 0; r < 4; ++r) d[r] = static_cast<int>(W.out[lane][r]);
}

// Low / high 16-bit element of a packed pair, as float.
inline float emu_lo(uint32_t v, __half*) { __half_raw r; r.x = static_cast<unsigned short>(v & 0xffff); return __half2float(__half(r)); }
inline float emu_hi(uint32_t v, __half*) { __half_raw r; r.x = static_cast<unsigned short>(v >> 16); return __half2float(__half(r)); }
inline float emu_lo(uint32_t v, __nv_bfloat16*) {
  __nv_bfloat16_raw r;
  r.x = static_cast<unsigned short>(v & 0xffff);
  return __bfloat162float(__nv_bfloat16(r));
}
inline float emu_hi(uint32_t v, __nv_bfloat16*) {
  __nv_bfloat16_raw r;
  r.x = static_cast<unsigned short>(v >> 16);
  return __bfloat162float(__nv_bfloat16(r));
}

// mma.m16n8k16 f16/bf16 -> f32: A reg i half e -> (row g + 8 (i & 1), k 2t + e + 8 (i >> 1)); B reg j
// half e -> (k 2t + e + 8 j, col g); C as above.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& W = emu::g_block->warps[emu::g_thread->linear / 32];
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) W.in[lane][i] = a[i];
  W.in[lane][4] = b0;
  W.in[lane][5] = b1;
  for (int r = 0; r < 4; ++r) std::memcpy(&W.in[lane][6 + r], &d[r], 4);
  emu::warp_collective("mma.m16n8k16", [](emu::Warp& w) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        A[g + 8 * (i & 1)][2 * t + 8 * (i >> 1)] = emu_lo(w.in[l][i], static_cast<T*>(nullptr));
        A[g + 8 * (i & 1)][2 * t + 1 + 8 * (i >> 1)] = emu_hi(w.in[l][i], static_cast<T*>(nullptr));
      }
      for (int j = 0; j < 2; ++j) {
        B[2 * t + 8 * j][g] = emu_lo(w.in[l][4 + j], static_cast<T*>(nullptr));
        B[2 * t + 1 + 8 * j][g] = emu_hi(w.in[l][4 + j], static_cast<T*>(nullptr));
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
        double s = 0;  // products of fp16/bf16 are exact in fp32; the sum is rounded once
        for (int k = 0; k < 16; ++k) s += double(A[row][k]) * double(B[k][col]);
        float c;
        std::memcpy(&c, &w.in[l][6 + r], 4);
        const float v = c + static_cast<float>(s);
        std::memcpy(&w.out[l][r], &v, 4);
      }
    }
  });
  for (int r = 0; r < 4; ++r) std::memcpy(&d[r], &W.out[lane][r], 4);
}

}  // namespace cuda
}  // namespace ptqrt

#include "emu_sm90.h"
