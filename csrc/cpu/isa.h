// Run-time instruction-set selection for the CPU kernels.
//
// Every translation unit is compiled for the baseline x86-64 (no -march): only functions that carry
// __attribute__((target(...))) use AVX2 or AVX-512, and they are reached only after the cpuid checks
// below say the CPU (and the OS, through XCR0) supports them. So an older CPU never meets an illegal
// instruction; it gets the scalar path.
//
// PTQRT_CPU_ISA (read on every call, so tests can switch it) forces a path:
//   auto (default) | scalar | avx2 | avx512 | avx512-emulated
// "avx512-emulated" runs the AVX-512 VNNI w8a8 kernels' (and the AMX tile kernel's, and the AVX-512
// w8a16 tiles' and panels') exact code with every intrinsic replaced by a portable emulation of the same
// instruction (see gemm_w8a8_vnni.h), so their logic is tested on machines without AVX-512; the other
// ops take the scalar path under it. Asking for an ISA the CPU
// lacks is an error, never a silent downgrade.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define PTQRT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define PTQRT_X86 0
#endif

// Per-function targets: the AVX2 tier needs FMA and F16C too (every AVX2 CPU has them, but say it).
#define PTQRT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PTQRT_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
// Small AVX2 helpers: always inlined into their (AVX2) callers, so that every out-of-line function
// holding AVX code carries _avx2 / _avx512 in its name or lives in vnni_native (a test checks it).
#define PTQRT_AVX2_INLINE PTQRT_AVX2 inline __attribute__((always_inline))

namespace ptqrt_cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_emulated = 3 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_emulated: return "avx512-emulated";
    default: return "scalar";
  }
}

namespace detail {

#if PTQRT_X86
inline uint64_t xgetbv0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

inline Isa detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::scalar;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return Isa::scalar;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Isa::scalar;  // the OS does not save XMM+YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::scalar;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  if (!avx2) return Isa::scalar;
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31), vnni = c & (1u << 11);
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;  // opmask, ZMM_Hi256, Hi16_ZMM saved by the OS
  return (f && bw && vl && vnni && zmm_state) ? Isa::avx512 : Isa::avx2;
}
#else
inline Isa detect() { return Isa::scalar; }
#endif

}  // namespace detail

// The best tier this CPU runs: avx512 (F+BW+VL+VNNI), avx2 (+FMA+F16C) or scalar.
inline Isa best_isa() {
  static const Isa best = detail::detect();
  return best;
}

inline bool supports(Isa want) {
  const Isa best = best_isa();
  switch (want) {
    case Isa::scalar:
    case Isa::avx512_emulated: return true;
    case Isa::avx2: return best == Isa::avx2 || best == Isa::avx512;
    case Isa::avx512: return best == Isa::avx512;
  }
  return false;
}

// AMX-INT8 (the w8a8 tile kernel, gemm_w8a8_amx.h; the default from 16 rows): an AVX-512 VNNI CPU
// with AMX-TILE and AMX-INT8, an OS that saves the tile state (XCR0 bits 17, 18), and, on Linux, this process's
// permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, asked once; kernels >= 5.16).
// The tile instructions are assembled only by compilers whose toolchains know them (GCC 11 and
// clang 12 came with assemblers that do); elsewhere the kernel is left out and has_amx() is false.
#if PTQRT_X86 && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define PTQRT_AMX_NATIVE 1
#else
#define PTQRT_AMX_NATIVE 0
#endif
namespace detail {
#if PTQRT_AMX_NATIVE
inline bool amx_detect() {
  if (best_isa() != Isa::avx512) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  __cpuid_count(7, 0, a, b, c, d);
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);
  if (!(tile && int8) || (xgetbv0() & (3ull << 17)) != (3ull << 17)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
inline bool amx_detect() { return false; }
#endif
}  // namespace detail

inline bool has_amx() {
  static const bool ok = detail::amx_detect();
  return ok;
}

// The x86 family (base + extended, as AMD and Intel number them) of an AMD CPU, 0 for any other:
// 25 (0x19) Zen 3 / Zen 4, 26 (0x1A) Zen 5. Kernel defaults measured to differ between them read it.
inline int amd_family() {
#if PTQRT_X86
  static const int family = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u) return 0;  // "Auth"enticAMD
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int base = (a >> 8) & 0xf;
    return base == 0xf ? base + static_cast<int>((a >> 20) & 0xff) : base;
  }();
  return family;
#else
  return 0;
#endif
}

// The tier the next kernel call uses: PTQRT_CPU_ISA if set (checked), else best_isa().
inline Isa active_isa() {
  const char* env = std::getenv("PTQRT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best_isa();
  Isa want;
  if (std::strcmp(env, "scalar") == 0) want = Isa::scalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(env, "avx512") == 0 || std::strcmp(env, "avx512vnni") == 0) want = Isa::avx512;
  else if (std::strcmp(env, "avx512-emulated") == 0) want = Isa::avx512_emulated;
  else TORCH_CHECK(false, "PTQRT_CPU_ISA must be one of auto, scalar, avx2, avx512, avx512-emulated; got '", env, "'");
  TORCH_CHECK(supports(want), "PTQRT_CPU_ISA=", env, " asks for a path this CPU cannot run (its best is ",
              isa_name(best_isa()), "; avx512 needs AVX-512 F, BW, VL and VNNI)");
  return want;
}

}  // namespace ptqrt_cpu
