// Hopper (sm_90a) primitives for the wgmma kernels: mbarriers, TMA tile loads, warpgroup MMA control
// (the MMA instructions themselves: sm90_wgmma.cuh, generated).
// Torch-free. On other targets these compile to nothing (callers are guarded by PTQRT_SM90A), and
// under PTQRT_CUDA_EMU the emulator (csrc/cuda/emu/emu_sm90.h) provides them.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing links against the driver library)

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PTQRT_SM90A 1
#endif
#ifdef PTQRT_CUDA_EMU
#define PTQRT_SM90A 1
#endif

namespace ptqrt {
namespace cuda {
namespace sm90 {

// wgmma shared-memory descriptor for a K-major operand stored in 128-byte swizzled rows (the layout
// TMA writes with CU_TENSOR_MAP_SWIZZLE_128B): 8-row groups 1024 bytes apart (stride byte offset);
// the leading byte offset is unused when the instruction's K (32 bytes) stays inside one 128-byte
// row. Stepping K by 32 bytes inside the row is a +32 on the start address: the hardware applies the
// swizzle to the final address bits, exactly as TMA did when it wrote the tile.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr) {
  uint64_t d = 0;
  d |= uint64_t((smem_addr & 0x3FFFF) >> 4);  // bits 0-13: start address / 16
  d |= uint64_t(1) << 16;                     // bits 16-29: leading byte offset / 16 (unused here)
  d |= uint64_t(1024 >> 4) << 32;             // bits 32-45: stride byte offset / 16
  d |= uint64_t(1) << 62;                     // bits 62-63: 1 = 128-byte swizzle
  return d;
}

#ifndef PTQRT_CUDA_EMU
#ifdef PTQRT_SM90A
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// True once the phase of parity `parity` has completed (a fresh barrier counts parity 1 as complete).
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(ok)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return ok != 0;
}
// Box (c0 = K byte offset, c1 = row) of the 2-D tensor map into shared memory; completes `bar`'s
// transaction count by the box's bytes (out-of-bounds parts arrive as zeros).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

// Pins the accumulators: the compiler may not move their reads or writes across this point, which
// keeps register traffic out of the window in which an issued wgmma still owns them.
template <int N>
__device__ __forceinline__ void fence_operands(int (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#endif  // PTQRT_SM90A
#endif  // PTQRT_CUDA_EMU

#ifdef PTQRT_SM90A
// The pipeline both wgmma kernels share: `stages` shared-memory stages, each with a "full" barrier
// (one producer arrival plus the TMA bytes) and an "empty" barrier (one arrival per consumer thread).
// Called by thread 0 before a __syncthreads: prefetches the two tensor maps, initializes the barriers.
__device__ __forceinline__ void init_pipeline(const CUtensorMap* a, const CUtensorMap* b, uint64_t* full,
                                              uint64_t* empty, int stages, int consumer_threads) {
  prefetch_tensormap(a);
  prefetch_tensormap(b);
  for (int s = 0; s < stages; ++s) {
    mbar_init(&full[s], 1);
    mbar_init(&empty[s], consumer_threads);
  }
  fence_barrier_init();
}

// The producer thread: for k tile i = 0 .. nk - 1, the ring's (it0 + i)-th fill (a persistent CTA's
// tiles continue one count), wait until its stage is free, announce the stage's bytes on its "full"
// barrier and issue load(stage base, i, full barrier) (the TMA loads).
template <class Load>
__device__ __forceinline__ void produce(int it0, int nk, int stages, uint8_t* smem, int stage_bytes, uint64_t* full,
                                        uint64_t* empty, Load&& load) {
  for (int i = 0; i < nk; ++i) {
    const int it = it0 + i, s = it % stages;
    while (!mbar_try_wait(&empty[s], ((it / stages) & 1) ^ 1)) {
    }
    mbar_arrive_expect_tx(&full[s], stage_bytes);
    load(smem + s * stage_bytes, i, &full[s]);
  }
}
#endif  // PTQRT_SM90A

}  // namespace sm90
}  // namespace cuda
}  // namespace ptqrt
