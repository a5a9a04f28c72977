// w8a16_gemm for Hopper (sm_90a): TMA tile loads, warpgroup MMA with the weights dequantized in registers.
//
//   y[m, n] = sum_k x[m, k] * (w[n, k] * s[n, k / g]) + bias[n]   (s[n] when group_size == 0)
//
// Computed transposed, D[n, m] = W[n, :] . X[m, :], so that the int8 weights are wgmma's A operand,
// the one that may come from registers: each consumer thread reads the bytes of its A fragment from
// the TMA-written weight tile, converts them to fp16 / bf16 in registers (per channel: the exact
// integers, the scale applied to the fp32 sum in the epilogue; per group: q * s rounded to the
// activation dtype, as the mma.sync kernel does), and issues wgmma m64nBTk16 whose B operand, the
// activations, the tensor cores read straight from the TMA-written shared memory. No dequantized copy
// of W is ever stored, and the activations never pass through registers.
//
// CTA tile: 128 weight rows (output channels) x BT tokens x 64 k per stage, a ring of STAGES stages:
//   x box: BT rows x 128 bytes (64 values), 128-byte swizzle (the wgmma descriptor's layout);
//   w box: 128 rows x 64 bytes, 64-byte swizzle (the fragment reads below are then bank-conflict free).
// Warpgroup 0 is the producer (one thread: wait "empty", expect the stage's bytes on "full", two TMA
// loads); warpgroups 1 and 2 are consumers for weight rows 0-63 and 64-127, each issuing four wgmma
// per stage with one group left in flight while it converts the next stage's fragments.
// Split-K over grid z writes fp32 partials (before the per-channel scale and the bias), which
// w8a16_split_reduce_kernel finishes in a fixed order, as for the mma.sync kernel.
#pragma once

#include "dequant.cuh"
#include "sm90_wgmma.cuh"

namespace ptqrt {
namespace cuda {
namespace sm90 {

template <int BT_>
struct W8A16Sm90 {
  static constexpr int BT = BT_;         // tokens per CTA: the wgmma N
  static constexpr int BN = 128;         // weight rows per CTA
  static constexpr int BK = 64;          // k per stage
  static constexpr int kThreads = 384;   // producer warpgroup + 2 consumer warpgroups
  static constexpr int kXBytes = BT * BK * 2, kWBytes = BN * BK, kStageBytes = kXBytes + kWBytes;
  static constexpr int kStages = (200 * 1024) / kStageBytes < 8 ? (200 * 1024) / kStageBytes : 8;
  // Stages, 2 * kStages barriers, and slack to align the stages to 1024 bytes (the 128-byte swizzle atom).
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;
  static constexpr int kAcc = BT / 2;    // fp32 accumulators per consumer thread
  static_assert(BT == 64 || BT == 128 || BT == 256, "wgmma N of the generated wrappers");
  static_assert(kStages >= 2 && kXBytes % 1024 == 0, "two stages at least; the w box starts 1024-aligned");
};

// Byte (row, k) of the 64-byte-swizzled weight box: 16-byte chunk bits 4-5 XOR address bits 7-8.
__device__ __forceinline__ int w_box_offset(int row, int k) {
  const int off = row * 64 + k;
  return off ^ (((off >> 7) & 3) << 4);
}

// Two consecutive int8 of weight-box row `row` at even byte k, as the low 16 bits of a word.
__device__ __forceinline__ uint32_t w_pair(const uint8_t* box, int row, int k) {
  return *reinterpret_cast<const uint16_t*>(box + w_box_offset(row, k));
}

// grid: (tiles_m * tiles_n, 1, splits); block kThreads; dynamic smem kSmemBytes.
// K % 16 == 0; group_size 0 or a multiple of 16 (each k16 step lies in one group).
template <typename T, int BT>
__global__ void __launch_bounds__(384, 1) w8a16_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tma_x,
                                                                 const __grid_constant__ CUtensorMap tma_w,
                                                                 const float* __restrict__ w_scale,
                                                                 const float* __restrict__ bias, T* __restrict__ out,
                                                                 float* __restrict__ partial, int M, int N, int K,
                                                                 int group_size) {
#ifdef PTQRT_SM90A
  using C = W8A16Sm90<BT>;
  PTQRT_DYNAMIC_SMEM(uint8_t, smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kStages * C::kStageBytes);
  uint64_t* empty = full + C::kStages;

  const int tiles_m = ceil_div(M, BT), tiles_n = ceil_div(N, C::BN);
  int tm, tn;
  grouped_tile(blockIdx.x, tiles_m, tiles_n, 8, tm, tn);
  const int m0 = tm * BT, n0 = tn * C::BN;
  int kt_begin, nk;
  split_k_tiles(K, C::BK, kt_begin, nk);

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) init_pipeline(&tma_x, &tma_w, full, empty, C::kStages, 256);
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0)
      produce(0, nk, C::kStages, smem, C::kStageBytes, full, empty, [&](uint8_t* st, int it, uint64_t* bar) {
        const int k = (kt_begin + it) * C::BK;
        tma_load_2d(st, &tma_x, 2 * k, m0, bar);  // the x map is addressed in bytes
        tma_load_2d(st + C::kXBytes, &tma_w, k, n0, bar);
      });
    return;
  }

  setmaxnreg_inc<232>();
  const int lane = threadIdx.x % kWarp, warp = (threadIdx.x % 128) / kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = 64 * (wg - 1) + 16 * warp + g;  // box rows of this thread's fragment: r0 and r0 + 8
  const int groups = group_size > 0 ? K / group_size : 1;

  float acc[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) acc[i] = 0.f;
  float s_lo = 1.f, s_hi = 1.f;  // per-group scales of rows r0, r0 + 8 (per channel: unused here)
  int cur_group = -1;

  // One stage: convert the fragments of its four k16 steps into `a`, issue the four wgmma, keep this
  // group in flight and release the previous stage (whose group, and fragment registers, are done).
  auto consume = [&](int it, uint32_t(&a)[4][4]) {
    const int s = it % C::kStages;
    while (!mbar_try_wait(&full[s], (it / C::kStages) & 1)) {
    }
    const uint8_t* wbox = smem + s * C::kStageBytes + C::kXBytes;
    const int k0 = (kt_begin + it) * C::BK;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int k = 16 * kk + 2 * t;
      const uint32_t w_k = w_pair(wbox, r0, k) | (w_pair(wbox, r0 + 8, k) << 16);            // k 2t, 2t+1
      const uint32_t w_k8 = w_pair(wbox, r0, k + 8) | (w_pair(wbox, r0 + 8, k + 8) << 16);   // k 2t+8, 2t+9
      if (group_size > 0) {
        const int grp = (k0 + 16 * kk) / group_size;
        if (grp != cur_group && k0 + 16 * kk < K) {
          cur_group = grp;
          s_lo = n0 + r0 < N ? w_scale[int64_t(n0 + r0) * groups + grp] : 0.f;
          s_hi = n0 + r0 + 8 < N ? w_scale[int64_t(n0 + r0 + 8) * groups + grp] : 0.f;
        }
        int8x4_scaled_rows<T>(w_k, s_lo, s_hi, a[kk][0], a[kk][1]);
        int8x4_scaled_rows<T>(w_k8, s_lo, s_hi, a[kk][2], a[kk][3]);
      } else {
        int8x4_to_pairs<T>(w_k, a[kk][0], a[kk][1]);
        int8x4_to_pairs<T>(w_k8, a[kk][2], a[kk][3]);
      }
    }
    const uint32_t xbox = smem_addr(smem + s * C::kStageBytes);
    fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs<T, BT>(acc, a[kk], make_desc(xbox + 32 * kk), 1);
    wgmma_commit();
    wgmma_wait<1>();
    fence_operands(acc);
    if (it > 0) mbar_arrive(&empty[(it - 1) % C::kStages]);
  };
  // Two fragment buffers, alternating, so that converting stage it + 1 never writes registers that
  // stage it's wgmma group (still in flight) reads.
  uint32_t a0[4][4], a1[4][4];
  int it = 0;
  for (; it + 1 < nk; it += 2) {
    consume(it, a0);
    consume(it + 1, a1);
  }
  if (it < nk) consume(it, a0);
  wgmma_wait<0>();
  fence_operands(acc);

  // Epilogue: register 4j + r is (weight row r0 + 8 (r >> 1), token 8j + 2t + (r & 1)).
  const int n_lo = n0 + r0, n_hi = n_lo + 8;
  float sc[2] = {1.f, 1.f}, bi[2] = {0.f, 0.f};
  if (partial == nullptr) {
    if (group_size == 0) {
      sc[0] = n_lo < N ? w_scale[n_lo] : 0.f;
      sc[1] = n_hi < N ? w_scale[n_hi] : 0.f;
    }
    if (bias != nullptr) {
      bi[0] = n_lo < N ? bias[n_lo] : 0.f;
      bi[1] = n_hi < N ? bias[n_hi] : 0.f;
    }
  }
#pragma unroll
  for (int j = 0; j < BT / 8; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int h = r >> 1;
      const int n = h ? n_hi : n_lo;
      const int m = m0 + 8 * j + 2 * t + (r & 1);
      if (m >= M || n >= N) continue;
      float v = acc[4 * j + r];
      if (partial != nullptr) {
        partial[int64_t(blockIdx.z) * M * N + int64_t(m) * N + n] = v;
      } else {
        if (group_size == 0) v *= sc[h];
        if (bias != nullptr) v += bi[h];
        out[int64_t(m) * N + n] = from_float<T>(v);
      }
    }
  }
#else
  // Built for another architecture: this kernel must never be launched there (the host checks).
  __trap();
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ptqrt
