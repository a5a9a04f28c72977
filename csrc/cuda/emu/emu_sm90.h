// Hopper operations for the CPU emulator (included by emu.h): mbarriers with phases and transaction
// counts, TMA 2-D box loads into 64- or 128-byte swizzled shared memory, and wgmma (s8 m64n256k32 from
// shared memory; fp16 / bf16 m64nNk16 with A from registers) as a warpgroup collective whose groups
// execute only at the wgmma.wait_group that lets them complete -- so a stage released to the producer
// too early is overwritten before the emulated MMA reads it, and the result shows it. Register A
// operands are copied when the wgmma is issued (a correct program leaves them alone until then).
//
// Layouts follow the PTX ISA: the shared-memory matrix descriptor (start address / 16 in bits 0-13,
// stride byte offset / 16 in bits 32-45, swizzle mode in bits 62-63), the 128-byte swizzle (address
// bits 4-6 XOR bits 7-9), the 64-byte swizzle (bits 4-5 XOR bits 7-8), and the m64nNk32 / m64nNk16
// register fragments.
#pragma once

#include <map>
#include <type_traits>

namespace ptqrt {
namespace emu {

struct Mbar {
  int count = 0, pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // completed phases
};

struct WgmmaOp {
  uint64_t desc_a, desc_b;
  int scale_d;
  int* acc[128];
  int s8_n = 256;        // N of the s8 m64nNk32 form
  // wgmma m64nNk16 with fp16 / bf16 operands, A from registers (copied at issue), fp32 accumulators.
  int rs_n = 0;          // N; 0: the s8 m64nNk32 form above
  bool rs_bf16 = false;
  uint32_t a[128][4];
  float* facc[128];
};

struct WarpGroup {
  int arrived = 0;
  uint64_t gen = 0;
  const char* op = nullptr;
  uint64_t desc_a[128], desc_b[128];
  int scale_d[128];
  int* acc[128];
  uint32_t a[128][4];
  float* facc[128];
  int wait_n[128];
  std::vector<WgmmaOp> open;
  std::vector<std::vector<WgmmaOp>> groups;
};

struct Sm90State {
  std::map<uint32_t, Mbar> bars;
  std::vector<WarpGroup> wgs;
};

inline Sm90State& sm90_state() {
  Block* b = g_block;
  if (!b->sm90) {
    auto st = std::make_shared<Sm90State>();
    st->wgs.resize((b->nthreads + 127) / 128);
    b->sm90 = st;
  }
  return *static_cast<Sm90State*>(b->sm90.get());
}

inline uint32_t smem_offset(const void* p) {
  const uint8_t* base = g_block->smem.data();
  const uint8_t* q = static_cast<const uint8_t*>(p);
  if (q < base || q >= base + g_block->smem.size()) fail("address is not in the CTA's dynamic shared memory");
  return static_cast<uint32_t>(q - base);
}

// The mbarrier at `p` (an address in this CTA's shared memory).
inline Mbar& mbar_at(const void* p) {
  auto& bars = sm90_state().bars;
  auto it = bars.find(smem_offset(p));
  if (it == bars.end()) fail("mbarrier used before mbarrier.init");
  return it->second;
}

inline void mbar_try_complete(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.count;
    ++g_block->events;
  }
}

// What encode_tiled stores in the opaque CUtensorMap.
struct TensorMap2D {
  const uint8_t* base;
  uint64_t dim0, dim1, stride1;
  uint32_t box0, box1;
  int swizzle_bytes;  // 0, 64 or 128
};
static_assert(sizeof(TensorMap2D) <= sizeof(CUtensorMap), "fits the opaque map");

inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* addr,
                             const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                             const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                             CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
  // The constraints the driver enforces, for the cases the kernels use.
  if (dtype != CU_TENSOR_MAP_DATA_TYPE_UINT8 || rank != 2 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE || elem_strides[0] != 1 || elem_strides[1] != 1)
    return CUDA_ERROR_INVALID_VALUE;
  if ((reinterpret_cast<uintptr_t>(addr) & 15) || (strides[0] & 15) || dims[0] == 0 || dims[1] == 0) return CUDA_ERROR_INVALID_VALUE;
  if (box[0] == 0 || box[1] == 0 || box[0] > 256 || box[1] > 256) return CUDA_ERROR_INVALID_VALUE;
  if (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_64B && swizzle != CU_TENSOR_MAP_SWIZZLE_128B)
    return CUDA_ERROR_INVALID_VALUE;
  const int sw = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : swizzle == CU_TENSOR_MAP_SWIZZLE_64B ? 64 : 0;
  if (sw != 0 && box[0] > uint32_t(sw)) return CUDA_ERROR_INVALID_VALUE;  // the inner box fits one swizzle span
  TensorMap2D t{static_cast<const uint8_t*>(addr), dims[0], dims[1], strides[0], box[0], box[1], sw};
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &t, sizeof(t));
  return CUDA_SUCCESS;
}

inline void wgmma_exit_check() {
  if (!g_block->sm90) return;
  auto& wg = sm90_state().wgs[g_thread->linear / 128];
  if (!wg.open.empty() || !wg.groups.empty()) fail("thread exited with wgmma operations still in flight");
}

// A[row][k] of an s8 K-major operand described by `desc`, row < 64 or 256, k < 32.
inline int8_t desc_elem(uint64_t desc, int row, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int mode = static_cast<int>(desc >> 62);
  if (mode != 1) fail("only 128-byte-swizzled wgmma operands are emulated");
  uint32_t off = start + (row / 8) * sbo + (row % 8) * 128 + k;
  off ^= ((off >> 7) & 7) << 4;
  if (off >= g_block->smem.size()) fail("wgmma operand outside shared memory");
  return static_cast<int8_t>(g_block->smem[off]);
}

inline float emu_half_bits(uint16_t b, __half*) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}
inline float emu_half_bits(uint16_t b, __nv_bfloat16*) {
  __nv_bfloat16_raw r;
  r.x = b;
  return __bfloat162float(__nv_bfloat16(r));
}

// B[row][k] of a 16-bit K-major operand (128-byte swizzled rows), as float, row < N, k < 16.
template <typename T>
inline float desc_elem16(uint64_t desc, int row, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  if (static_cast<int>(desc >> 62) != 1) fail("only 128-byte-swizzled wgmma operands are emulated");
  uint32_t off = start + (row / 8) * sbo + (row % 8) * 128 + 2 * k;
  off ^= ((off >> 7) & 7) << 4;
  if (off + 1 >= g_block->smem.size()) fail("wgmma operand outside shared memory");
  uint16_t bits;
  std::memcpy(&bits, &g_block->smem[off], 2);
  return emu_half_bits(bits, static_cast<T*>(nullptr));
}

template <typename T>
inline void run_wgmma_rs(const WgmmaOp& op) {
  static thread_local float A[64][16], B[256][16];
  const int n = op.rs_n;
  for (int i = 0; i < 128; ++i) {  // the A fragment of m64nNk16 (see kernels/sm90_wgmma.cuh)
    const int w = i / 32, l = i % 32, g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int e = 0; e < 2; ++e) {
        const uint16_t bits = static_cast<uint16_t>(op.a[i][r] >> (16 * e));
        A[16 * w + g + 8 * (r & 1)][2 * t + e + 8 * (r >> 1)] = emu_half_bits(bits, static_cast<T*>(nullptr));
      }
  }
  for (int c = 0; c < n; ++c)
    for (int k = 0; k < 16; ++k) B[c][k] = desc_elem16<T>(op.desc_b, c, k);
  for (int i = 0; i < 128; ++i) {
    const int w = i / 32, l = i % 32, g = l / 4, t = l % 4;
    for (int j = 0; j < n / 8; ++j)
      for (int r = 0; r < 4; ++r) {
        const int row = 16 * w + g + 8 * (r >> 1), col = 8 * j + 2 * t + (r & 1);
        double s = 0;  // products of fp16 / bf16 are exact; the sum is rounded once
        for (int k = 0; k < 16; ++k) s += double(A[row][k]) * double(B[col][k]);
        float& d = op.facc[i][4 * j + r];
        d = (op.scale_d ? d : 0.f) + static_cast<float>(s);
      }
  }
}

inline void run_wgmma(const WgmmaOp& op) {
  if (op.rs_n != 0) return op.rs_bf16 ? run_wgmma_rs<__nv_bfloat16>(op) : run_wgmma_rs<__half>(op);
  static thread_local int8_t A[64][32], B[256][32];
  const int n = op.s8_n;
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 32; ++k) A[r][k] = desc_elem(op.desc_a, r, k);
  for (int c = 0; c < n; ++c)
    for (int k = 0; k < 32; ++k) B[c][k] = desc_elem(op.desc_b, c, k);
  for (int i = 0; i < 128; ++i) {
    const int w = i / 32, l = i % 32, g = l / 4, t = l % 4;
    for (int j = 0; j < n / 8; ++j)
      for (int r = 0; r < 4; ++r) {
        const int row = 16 * w + g + 8 * (r >> 1), col = 8 * j + 2 * t + (r & 1);
        int32_t s = op.scale_d ? op.acc[i][4 * j + r] : 0;
        for (int k = 0; k < 32; ++k) s += int32_t(A[row][k]) * int32_t(B[col][k]);
        op.acc[i][4 * j + r] = s;
      }
  }
}

inline WarpGroup& my_warpgroup() { return sm90_state().wgs[g_thread->linear / 128]; }

}  // namespace emu

namespace cuda {
namespace sm90 {

inline uint32_t smem_addr(const void* p) { return emu::smem_offset(p); }
inline void mbar_init(uint64_t* bar, uint32_t count) {
  emu::Mbar m;
  m.count = m.pending = static_cast<int>(count);
  emu::sm90_state().bars[emu::smem_offset(bar)] = m;
  if (emu::g_exit_hook == nullptr) emu::g_exit_hook = &emu::wgmma_exit_check;
}
inline void fence_barrier_init() {}
inline void mbar_arrive(uint64_t* bar) {
  emu::Mbar& m = emu::mbar_at(bar);
  if (--m.pending < 0) emu::fail("mbarrier arrived more often than its count");
  ++emu::g_block->events;
  emu::mbar_try_complete(m);
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  emu::mbar_at(bar).tx += bytes;
  mbar_arrive(bar);
}
inline bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  if ((emu::mbar_at(bar).phase & 1) != parity) return true;
  emu::yield();  // let the others make progress; no event: a barrier nobody completes is a deadlock
  return false;
}
inline void prefetch_tensormap(const CUtensorMap*) {}
// The box lands in this CTA's shared memory at dst and completes bar's transaction bytes.
inline void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  emu::TensorMap2D t;
  std::memcpy(&t, map, sizeof(t));
  const uint32_t off0 = emu::smem_offset(dst);
  if (t.swizzle_bytes == 128 && (off0 & 1023)) emu::fail("TMA destination of a 128-byte swizzled box is not 1024-byte aligned");
  if (t.swizzle_bytes == 64 && (off0 & 511)) emu::fail("TMA destination of a 64-byte swizzled box is not 512-byte aligned");
  if (off0 & 127) emu::fail("TMA destination is not 128-byte aligned");
  if (off0 + t.box0 * t.box1 > emu::g_block->smem.size()) emu::fail("TMA box past the end of shared memory");
  for (uint32_t r = 0; r < t.box1; ++r)
    for (uint32_t e = 0; e < t.box0; ++e) {
      const int64_t x = int64_t(c0) + e, y = int64_t(c1) + r;
      const bool in = x >= 0 && y >= 0 && uint64_t(x) < t.dim0 && uint64_t(y) < t.dim1;
      uint32_t off = off0 + r * t.box0 + e;
      if (t.swizzle_bytes == 128) off ^= ((off >> 7) & 7) << 4;
      if (t.swizzle_bytes == 64) off ^= ((off >> 7) & 3) << 4;
      emu::g_block->smem[off] = in ? t.base[uint64_t(y) * t.stride1 + uint64_t(x)] : 0;
    }
  emu::Mbar& m = emu::mbar_at(bar);
  m.tx -= int64_t(t.box0) * t.box1;
  ++emu::g_block->events;
  emu::mbar_try_complete(m);
}
inline void wgmma_fence() {}
template <int N>
inline void fence_operands(int (&)[N]) {}
template <int N>
inline void fence_operands(float (&)[N]) {}
template <int N>
inline void setmaxnreg_inc() {}
template <int N>
inline void setmaxnreg_dec() {}

template <int N>
inline void wgmma_s8(int (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  emu::WarpGroup& wg = emu::my_warpgroup();
  const int i = emu::g_thread->linear % 128;
  wg.desc_a[i] = desc_a;
  wg.desc_b[i] = desc_b;
  wg.scale_d[i] = scale_d;
  wg.acc[i] = d;
  emu::group_collective(wg, (emu::g_thread->linear / 128) * 128, 128, "wgmma.m64nNk32.s8", [](emu::WarpGroup& w) {
    emu::WgmmaOp op{w.desc_a[0], w.desc_b[0], w.scale_d[0], {}};
    op.s8_n = N;
    for (int j = 0; j < 128; ++j) {
      if (w.desc_a[j] != op.desc_a || w.desc_b[j] != op.desc_b || w.scale_d[j] != op.scale_d)
        emu::fail("wgmma operands differ between the threads of the warpgroup");
      op.acc[j] = w.acc[j];
    }
    w.open.push_back(op);
  });
}
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  emu::WarpGroup& wg = emu::my_warpgroup();
  const int i = emu::g_thread->linear % 128;
  wg.desc_b[i] = desc_b;
  wg.scale_d[i] = scale_d;
  wg.facc[i] = d;
  for (int r = 0; r < 4; ++r) wg.a[i][r] = a[r];
  emu::group_collective(wg, (emu::g_thread->linear / 128) * 128, 128, "wgmma.m64nNk16", [](emu::WarpGroup& w) {
    emu::WgmmaOp op{0, w.desc_b[0], w.scale_d[0], {}};
    op.rs_n = N;
    op.rs_bf16 = std::is_same<T, __nv_bfloat16>::value;
    for (int j = 0; j < 128; ++j) {
      if (w.desc_b[j] != op.desc_b || w.scale_d[j] != op.scale_d)
        emu::fail("wgmma operands differ between the threads of the warpgroup");
      op.facc[j] = w.facc[j];
      for (int r = 0; r < 4; ++r) op.a[j][r] = w.a[j][r];
    }
    w.open.push_back(op);
  });
}
inline void wgmma_commit() {
  emu::WarpGroup& wg = emu::my_warpgroup();
  emu::group_collective(wg, (emu::g_thread->linear / 128) * 128, 128, "wgmma.commit_group", [](emu::WarpGroup& w) {
    w.groups.push_back(std::move(w.open));
    w.open.clear();
  });
}
template <int N>
inline void wgmma_wait() {
  emu::WarpGroup& wg = emu::my_warpgroup();
  emu::group_collective(wg, (emu::g_thread->linear / 128) * 128, 128, "wgmma.wait_group", [](emu::WarpGroup& w) {
    while (w.groups.size() > size_t(N)) {
      for (const auto& op : w.groups.front()) emu::run_wgmma(op);
      w.groups.erase(w.groups.begin());
    }
  });
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ptqrt
