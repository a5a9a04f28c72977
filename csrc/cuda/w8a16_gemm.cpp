// Host glue of w8a16_gemm: check, then pick the path -- tensor-core GEMV (M <= 16), tensor-core GEMM
// (fp16/bf16, M > 16: on sm_90 the TMA + wgmma kernel unless PTQRT_CUDA_WGMMA_W8A16=0, else mma.sync),
// or the CUDA-core kernels for fp32 activations and odd shapes.
#include "host.h"
#include "ops.h"

namespace ptqrt {
namespace cuda {

at::Tensor w8a16_gemm(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, int64_t group_size) {
  const char* op = "w8a16_gemm";
  check_tensor(op, "x", x, kFloats(), 2);
  const at::Device dev = x.device();
  check_tensor(op, "w_q", w_q, {at::kChar}, 2, &dev);
  const int64_t M = x.size(0), K = x.size(1), N = w_q.size(0);
  TORCH_CHECK(w_q.size(1) == K, "ptqrt_cuda.", op, ": x is [M, K] = ", x.sizes(), " but w_q is [N, K] = ", w_q.sizes(),
              ": K differs");
  check_int32_range(op, "M", M);
  check_int32_range(op, "N", N);
  check_int32_range(op, "K", K);
  check_tensor(op, "w_scale", w_scale, {at::kFloat}, -1, &dev);
  TORCH_CHECK(group_size >= 0, "ptqrt_cuda.", op, ": group_size must be 0 (per channel) or a positive divisor of K; got ",
              group_size);
  if (group_size == 0) {
    check_shape(op, "w_scale", w_scale, {N}, "(per-channel scales, group_size=0)");
  } else {
    TORCH_CHECK(K % group_size == 0, "ptqrt_cuda.", op, ": group_size=", group_size, " does not divide K=", K);
    check_shape(op, "w_scale", w_scale, {N, K / group_size}, "(per-group scales)");
  }
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_tensor(op, "bias", *bias, kFloats(), 1, &dev);
    check_shape(op, "bias", *bias, {N});
    b = as_float32(*bias);
  }

  const DeviceGuard guard(dev);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  W8A16Args a{};
  a.x = x.data_ptr();
  a.w = w_q.data_ptr<int8_t>();
  a.w_scale = w_scale.data_ptr<float>();
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.group_size = static_cast<int>(group_size);
  a.splits = 1;
  a.ring = gemv_ring_enabled();
  const cudaStream_t stream = current_stream();
  const DType dt = to_dtype(x.scalar_type());

  const bool aligned = K % 16 == 0 && aligned16(x) && aligned16(w_q);
  const bool whole_groups = group_size == 0 || group_size % 16 == 0;  // a 16-wide k step never straddles two groups
  if (M <= 16 && aligned && (dt == DType::F32 || whole_groups)) {
    check_launch(op, w8a16_gemv(dt, a, stream));
  } else if (dt != DType::F32 && aligned && whole_groups) {
    const Tile tile = M <= 64 ? Tile::Small : Tile::Large;
    const bool hopper = K > 0 && w8a16_wgmma_enabled();  // a tensor map needs a non-empty K
    int bm, bn, bk, bt = 0;
    if (hopper) {
      bt = w8a16_sm90_tokens_per_cta(a.M, a.N, sm_count());
      bm = bt;
      w8a16_sm90_tile_shape(&bn, &bk);
    } else {
      w8a16_tile_shape(tile, &bm, &bn, &bk);
    }
    const int64_t tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
    a.splits = pick_splits(tiles, (K + bk - 1) / bk, split_target(hopper, tile),
                           hopper && w8a16_wave_cap_enabled() ? sm_count() : 0);
    at::Tensor partial;
    if (a.splits > 1) {
      partial = at::empty({a.splits, M, N}, x.options().dtype(at::kFloat));
      a.partial = partial.data_ptr<float>();
    }
    cudaError_t e = hopper ? w8a16_gemm_sm90(dt, bt, a, stream) : cudaErrorNotSupported;
    if (e == cudaErrorNotSupported) e = w8a16_mma(dt, tile, a, stream);  // no tensor-map encoder: mma.sync
    check_launch(op, e);
    if (a.splits > 1) check_launch(op, w8a16_split_reduce(dt, a, stream));
  } else {
    check_launch(op, w8a16_simple(dt, a, stream));
  }
  return out;
}

}  // namespace cuda
}  // namespace ptqrt
