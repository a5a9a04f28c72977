// Host glue of w8a8_gemm: check, pad odd K, pick the tile and split-K factor, launch.
#include "host.h"
#include "ops.h"

namespace ptqrt {
namespace cuda {

namespace {
constexpr int64_t kMaxK = ((int64_t(1) << 31) - 1) / (128 * 128);  // 128*128*K < 2^31: no int32 overflow, -128 included

// [rows, K] int8 -> [rows, K16] with zero columns appended: zeros add nothing to the int32 sums, and
// 16-byte rows are what the cp.async tile loads need. Only odd K (or unaligned storage) pays this copy.
at::Tensor pad_k(const at::Tensor& t, int64_t k16) {
  at::Tensor p = at::zeros({t.size(0), k16}, t.options());
  p.narrow(1, 0, t.size(1)).copy_(t);
  return p;
}
}  // namespace

at::Tensor w8a8_gemm(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "w8a8_gemm";
  check_tensor(op, "x_q", x_q, {at::kChar}, 2);
  const at::Device dev = x_q.device();
  check_tensor(op, "w_q", w_q, {at::kChar}, 2, &dev);
  const int64_t M = x_q.size(0), K = x_q.size(1), N = w_q.size(0);
  TORCH_CHECK(w_q.size(1) == K, "ptqrt_cuda.", op, ": x_q is [M, K] = ", x_q.sizes(), " but w_q is [N, K] = ",
              w_q.sizes(), ": K differs");
  TORCH_CHECK(K <= kMaxK, "ptqrt_cuda.", op, ": K = ", K, " can overflow the int32 accumulator (K must be <= ", kMaxK,
              "); split K into chunks and add the float results");
  check_int32_range(op, "M", M);
  check_int32_range(op, "N", N);
  check_tensor(op, "x_scale", x_scale, {at::kFloat}, 1, &dev);
  TORCH_CHECK(x_scale.size(0) == M || x_scale.size(0) == 1, "ptqrt_cuda.", op, ": x_scale must be [M] = [", M,
              "] or [1]; got ", describe(x_scale));
  check_tensor(op, "w_scale", w_scale, {at::kFloat}, 1, &dev);
  check_shape(op, "w_scale", w_scale, {N}, "(one scale per output channel N)");
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat || out_dtype == at::kInt,
              "ptqrt_cuda.", op, ": out_dtype must be float16, bfloat16, float32 or int32; got ", out_dtype);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(out_dtype != at::kInt, "ptqrt_cuda.", op, ": out_dtype=int32 returns the raw accumulator; bias must be None");
    check_tensor(op, "bias", *bias, kFloats(), 1, &dev);
    check_shape(op, "bias", *bias, {N});
    b = as_float32(*bias);
  }

  const DeviceGuard guard(dev);
  at::Tensor out = at::empty({M, N}, x_q.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  const int64_t k16 = (K + 15) / 16 * 16;
  const bool direct = k16 == K && aligned16(x_q) && aligned16(w_q);
  const at::Tensor x = direct ? x_q : pad_k(x_q, k16);
  const at::Tensor w = direct ? w_q : pad_k(w_q, k16);

  const cudaStream_t stream = current_stream();
  const DType dt = to_dtype(out_dtype);
  if (M <= 16) {  // decode: GEMV-shaped, one launch, no split-K
    W8A8Args g{x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), x_scale.data_ptr<float>(), x_scale.size(0) == 1 ? 0 : 1,
               w_scale.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr(), nullptr,
               static_cast<int>(M), static_cast<int>(N), static_cast<int>(k16), 1};
    check_launch(op, w8a8_gemv(dt, g, stream));
    return out;
  }

  const Tile tile = M <= 64 ? Tile::Small : Tile::Large;
  // sm_90a from 65 rows, and from 17 where N alone gives a wave of 128-wide tiles: its 128-row tile
  // is mostly padding there (zeros from TMA, no memory read), but it streams the weights faster than
  // the mma.sync kernel's 64-row tiles (on an H100, 32 x 28672 x 8192: 90.1 us against 106.8; at
  // 32 x 11008 x 4096, 86 tiles on 132 SMs, 28.5 against 27.9: left on mma.sync).
  const bool wide_n = (N + 127) / 128 >= sm_count();
  const bool hopper = (tile == Tile::Large || wide_n) && k16 > 0 && wgmma_enabled();
  int bm, bn, bk;
  if (hopper) {
    bn = w8a8_sm90_tile_n(static_cast<int>(M), static_cast<int>(N), sm_count(), tile_waves_enabled());
    w8a8_sm90_tile_shape(&bm, &bk);
  } else {
    w8a8_tile_shape(tile, &bm, &bn, &bk);
  }
  const int64_t tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  // The sm_90a kernel's splits never go past one wave (a second round of CTAs costs a whole tile's fixed
  // cost again: 128 x 11008 x 4096 ran 40.5 us on an H100 as 86 tiles x 2 splits, 24.2 as 86 tiles;
  // Triton 23.8).
  const int64_t sms = sm_count();
  const int splits = pick_splits(tiles, (k16 + bk - 1) / bk, split_target(hopper, tile), hopper ? sms : 0);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, M, N}, x_q.options().dtype(at::kInt));

  W8A8Args a{};
  a.x = x.data_ptr<int8_t>();
  a.w = w.data_ptr<int8_t>();
  a.x_scale = x_scale.data_ptr<float>();
  a.x_scale_stride = x_scale.size(0) == 1 ? 0 : 1;
  a.w_scale = w_scale.data_ptr<float>();
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.partial = splits > 1 ? partial.data_ptr<int32_t>() : nullptr;
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(k16);
  a.splits = splits;
  // A persistent grid (one CTA per SM looping over the tiles; PTQRT_CUDA_SM90_PERSISTENT=0: one CTA a
  // tile) where no split-K is needed.
  a.ctas = hopper && splits == 1 && sm90_persistent_enabled() ? static_cast<int>(sms) : 0;
  cudaError_t e = hopper ? w8a8_gemm_sm90(dt, bn, a, stream) : cudaErrorNotSupported;
  if (e == cudaErrorNotSupported) e = w8a8_gemm_mma(dt, tile, a, stream);  // no tensor-map encoder: mma.sync
  check_launch(op, e);
  if (splits > 1) check_launch(op, w8a8_split_reduce(dt, a, stream));
  return out;
}

}  // namespace cuda
}  // namespace ptqrt
