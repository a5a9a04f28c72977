// Host glue of int8_kv_decode_attention: check, choose the split-KV factor, launch.
#include "host.h"
#include "ops.h"

namespace ptqrt {
namespace cuda {

namespace {
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

at::Tensor int8_kv_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& block_table,
                                    const at::Tensor& seq_lens, double sm_scale) {
  const char* op = "int8_kv_decode_attention";
  check_tensor(op, "q", q, kFloats(), 3);
  const at::Device dev = q.device();
  check_tensor(op, "k_cache", k_cache, {at::kChar}, 4, &dev);
  check_tensor(op, "v_cache", v_cache, {at::kChar}, 4, &dev);
  check_shape(op, "v_cache", v_cache, k_cache.sizes(), "(same layout as k_cache)");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "ptqrt_cuda.", op, ": head dim of q is ", D, " but the cache holds ",
              k_cache.size(3), " (k_cache ", describe(k_cache), ")");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "ptqrt_cuda.", op, ": query heads ", Hq, " must be a multiple of kv heads ", Hkv,
              " (GQA); q ", describe(q), ", k_cache ", describe(k_cache));
  const bool k_dyn = check_kv_scale(op, "k_scale", k_scale, k_cache);
  const bool v_dyn = check_kv_scale(op, "v_scale", v_scale, v_cache);
  check_tensor(op, "block_table", block_table, {at::kInt}, 2, &dev);
  TORCH_CHECK(block_table.size(0) == B, "ptqrt_cuda.", op, ": block_table must have B = ", B, " rows; got ",
              describe(block_table));
  check_tensor(op, "seq_lens", seq_lens, {at::kInt}, 1, &dev);
  check_shape(op, "seq_lens", seq_lens, {B});
  TORCH_CHECK(sm_scale > 0, "ptqrt_cuda.", op, ": sm_scale must be positive; got ", sm_scale);
  const int64_t max_blocks = block_table.size(1);
  const int64_t max_len = max_blocks * bs;
  check_int32_range(op, "max_blocks * block_size", max_len);
  check_int32_range(op, "num_blocks", nb);
  check_int32_range(op, "D", D);
  check_int32_range(op, "B", B);
  check_int32_range(op, "Hq", Hq);

  const DeviceGuard guard(dev);
  at::Tensor out = at::empty_like(q);
  if (B == 0 || Hq == 0 || D == 0) return out;

  DecodeArgs a{};
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr<int8_t>();
  a.v_cache = v_cache.data_ptr<int8_t>();
  a.k_scale = k_scale.data_ptr<float>();
  a.v_scale = v_scale.data_ptr<float>();
  a.k_dynamic = k_dyn;
  a.v_dynamic = v_dyn;
  a.block_table = block_table.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.B = static_cast<int>(B);
  a.Hq = static_cast<int>(Hq);
  a.Hkv = static_cast<int>(Hkv);
  a.D = static_cast<int>(D);
  a.num_blocks = static_cast<int>(nb);
  a.block_size = static_cast<int>(bs);
  a.max_blocks = static_cast<int>(max_blocks);
  a.sm_scale = static_cast<float>(sm_scale);
  a.vec = aligned16(k_cache) && aligned16(v_cache);
  a.stream = decode_stream_enabled();
  a.mma = decode_mma_enabled() && (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
  // Query-head chunks of a kv head: one CTA each (16 heads for the tensor-core kernel where it fits).
  const int64_t gchunks = cdiv(Hq / Hkv, decode_cta_rows(a));

  // Split the KV range so that about two waves of CTAs run, each on >= 64 tokens, none on more than a
  // chunk's worth of scores in shared memory. The streaming kernel instead fills the CTA slots of one
  // wave (3 an SM on an H100 at D = 128: its ring's shared memory), each split >= 128 tokens (2 tiles
  // a warp): at B = 1 with 32 heads it ran 9 splits of 456 tokens, 7 tiles a warp one after the
  // other, each tile's arithmetic a chain of dependent instructions with 2-3 warps a scheduler to
  // hide it (Nsight Compute on an H100: 27.7 us for 33.5 MB, 40% of DRAM bandwidth); with 12 splits
  // and the new combine kernel the op took 28.7 us there instead of 36.6 (Triton 33.4). seq_lens stay
  // on the device (no sync, graph-safe), so the split is sized for the table's capacity; CTAs past a
  // sequence's end only write an empty partial.
  const int64_t ctas = B * Hkv * gchunks;
  const int64_t per_sm = decode_stream_ctas_per_sm(a, smem_per_sm());
  const int64_t want = per_sm > 0 ? std::max<int64_t>(1, per_sm * sm_count() / ctas) : cdiv(2 * sm_count(), ctas);
  int64_t splits = std::max<int64_t>(cdiv(max_len, kDecodeMaxChunk),
                                     std::min<int64_t>(want, cdiv(max_len, per_sm > 0 ? 128 : 64)));
  splits = std::max<int64_t>(splits, 1);
  int64_t chunk = cdiv(max_len, splits);
  const size_t smem_limit = smem_optin();
  a.chunk = static_cast<int>(chunk);
  while (decode_attention_smem_bytes(a) > smem_limit && a.chunk > 64) a.chunk = (a.chunk + 1) / 2;
  TORCH_CHECK(decode_attention_smem_bytes(a) <= smem_limit, "ptqrt_cuda.", op, ": head dim D = ", D,
              " needs more shared memory than this GPU offers");
  chunk = a.chunk;
  a.splits = static_cast<int>(std::max<int64_t>(1, cdiv(max_len, std::max<int64_t>(chunk, 1))));

  at::Tensor part_acc, part_ml;
  if (a.splits > 1) {
    part_acc = at::empty({B, Hq, a.splits, D}, q.options().dtype(at::kFloat));
    part_ml = at::empty({B, Hq, a.splits, 2}, q.options().dtype(at::kFloat));
    a.part_acc = part_acc.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }
  check_launch(op, launch_int8_kv_decode_attention(to_dtype(q.scalar_type()), a, current_stream()));
  return out;
}

}  // namespace cuda
}  // namespace ptqrt

