// The paged int8 KV cache: kv_cache_append (quantize new keys/values into their slots) and
// int8_kv_decode_attention (one query per sequence against the cache).
//
// Cache layout: int8 [num_blocks, block_size, Hkv, D]; a token at position l of sequence b lives in
// slot block_table[b][l / block_size] * block_size + l % block_size. Scales are float32, either
// dynamic per token-head [num_blocks, block_size, Hkv] or static per channel [Hkv, D].
//
// Attention splits each sequence into chunks of positions (split-K decoding): a task takes one chunk
// and every head, computes its scores, an exp against the chunk's own max (vectorized exp) and the
// value sums; a last pass combines a sequence's chunks with the usual max/sum rescaling. The G =
// Hq / Hkv query heads that share a kv head are served together, so each int8 K and V row is
// widened to fp32 once for all of them. Scales are folded where they are constant: sm_scale and a
// static K scale into q, a dynamic K scale into each score, a dynamic V scale into each
// probability, a static V scale into the output.
#include <tuple>
#include <utility>

#include "quant_rows.h"

namespace ptqrt_cpu {

namespace {

bool is_dynamic(const at::Tensor& scale) { return scale.dim() == 3; }

void check_cache_scale(const at::Tensor& scale, const at::Tensor& cache, const char* op, const char* name) {
  const int64_t nb = cache.size(0), bs = cache.size(1), h = cache.size(2), d = cache.size(3);
  const bool ok = scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  ((scale.dim() == 3 && scale.size(0) == nb && scale.size(1) == bs && scale.size(2) == h) ||
                   (scale.dim() == 2 && scale.size(0) == h && scale.size(1) == d));
  TORCH_CHECK(ok, "ptqrt_cpu.", op, ": ", name, " must be contiguous float32 [num_blocks, block_size, Hkv] = [", nb,
              ", ", bs, ", ", h, "] or [Hkv, D] = [", h, ", ", d, "]; got ", scale.sizes(), " ", scale.scalar_type());
}

void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kChar && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kChar && v_cache.is_contiguous(),
              "ptqrt_cpu.", op, ": k_cache and v_cache must be contiguous int8 [num_blocks, block_size, Hkv, D] of "
              "one shape; got ", k_cache.sizes(), " ", k_cache.scalar_type(), " and ", v_cache.sizes(), " ",
              v_cache.scalar_type());
  TORCH_CHECK(k_cache.size(1) > 0 && k_cache.size(2) > 0 && k_cache.size(3) > 0, "ptqrt_cpu.", op,
              ": k_cache [num_blocks, block_size, Hkv, D] = ", k_cache.sizes(), " needs block_size, Hkv and D >= 1");
}

std::vector<int64_t> int_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

void kv_cache_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& slots) {
  const char* op = "kv_cache_append";
  check_caches(k_cache, v_cache, op);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), H = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && k.size(1) == H && k.size(2) == D && v.sizes() == k.sizes() &&
                  v.is_contiguous(),
              "ptqrt_cpu.", op, ": k and v must be contiguous [T, Hkv, D] = [T, ", H, ", ", D, "]; got ", k.sizes(),
              " and ", v.sizes());
  const int64_t T = k.size(0);
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T &&
                  (slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt),
              "ptqrt_cpu.", op, ": slots must be int64 or int32 [T] = [", T, "]; got ", slots.sizes(), " ",
              slots.scalar_type());
  check_cache_scale(k_scale, k_cache, op, "k_scale");
  check_cache_scale(v_scale, v_cache, op, "v_scale");
  const std::vector<int64_t> sl = int_vector(slots);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(sl[t] < nb * bs, "ptqrt_cpu.", op, ": slots[", t, "] = ", sl[t], " is past the cache's ",
                      nb * bs, " slots (num_blocks ", nb, " x block_size ", bs, ")");
  if (T == 0) return;

  const Isa isa = active_isa();
  struct Side {
    const at::Tensor& src;
    int8_t* cache;
    float* scale;
    bool dynamic;
  };
  const Side sides[2] = {{k, k_cache.data_ptr<int8_t>(), k_scale.data_ptr<float>(), is_dynamic(k_scale)},
                         {v, v_cache.data_ptr<int8_t>(), v_scale.data_ptr<float>(), is_dynamic(v_scale)}};
  for (const Side& s : sides) {
    dispatch_float(s.src.scalar_type(), "k and v", [&](auto tag) {
      using X = decltype(tag);
      const X* xp = reinterpret_cast<const X*>(s.src.data_ptr());
      // One task per head, tokens in order within it: a slot named twice ends with the later token,
      // as in a sequential loop, and no two threads ever write the same row.
      at::parallel_for(0, H, std::max<int64_t>(1, 8192 / std::max<int64_t>(T * D, 1)), [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t t = 0; t < T; ++t) {
            if (sl[t] < 0) continue;  // padding
            const X* row = xp + (t * H + h) * D;
            int8_t* dst = s.cache + (sl[t] * H + h) * D;
            if (s.dynamic) {
              const float sc = absmax_scale(row_absmax(isa, row, nullptr, D));
              s.scale[sl[t] * H + h] = sc;
              row_quant(isa, row, nullptr, sc, dst, D);
            } else {  // x / scale[h, d], then / 1 (exact)
              row_quant(isa, row, s.scale + h * D, 1.0f, dst, D);
            }
          }
      });
    });
  }
}

namespace {

// The cache and the shapes every attention task reads.
struct Attn {
  const int8_t* kc;
  const int8_t* vc;
  const float* ks;  // dynamic: [slots, H] (index slot * H + h); static: [H, D]
  const float* vs;
  bool k_dyn, v_dyn;
  int64_t bs, H, D, D8, G;
};

// One task: positions [l0, l0 + n) of one sequence, every head. Its results are partial softmax
// sums over those positions, combined across the sequence's tasks afterwards (split-K decoding):
//   m[hg] = max score, s[hg] = sum_l exp(score - m), acc[hg][:] = sum_l exp(score - m) * v_l.
// Positions outside, heads inside: the Hkv rows of one token are contiguous, so the cache is read in
// order, a few pages at a time (a loop per head would touch a new page per position and per head).
struct Task {
  int64_t b, l0, n;
};

struct Scratch {
  std::vector<float> scores;  // [H*G, n]
  std::vector<int64_t> tok;   // [n] slot of each position
};

// tok[i] = slot of position l0 + i, walking the block table (no division per position).
void gather_slots(const int32_t* blocks, int64_t bs, int64_t l0, int64_t n, int64_t* tok) {
  for (int64_t i = 0; i < n;) {
    const int64_t l = l0 + i, off = l % bs, cnt = std::min(bs - off, n - i);
    const int64_t base = int64_t(blocks[l / bs]) * bs + off;
    for (int64_t o = 0; o < cnt; ++o) tok[i + o] = base + o;
    i += cnt;
  }
}

// p = exp(s - max) in place over n scores; returns (max, sum). A NaN score makes both NaN.
std::pair<float, float> exp_scalar(float* sc, int64_t n) {
  float mx = -INFINITY;
  for (int64_t l = 0; l < n; ++l) mx = std::isnan(sc[l]) || std::isnan(mx) ? NAN : std::max(mx, sc[l]);
  float sum = 0.0f;
  for (int64_t l = 0; l < n; ++l) sum += (sc[l] = std::exp(sc[l] - mx));
  return {mx, sum};
}

// ------------------------------------------------------------------------------------------ scalar
// qf: [H*G, D8] scaled queries; out: m, s [H*G] and acc [H*G, D8] (zeroed by the caller).
void chunk_scalar(const Attn& a, const int64_t* tok, int64_t n, const float* qf, float* sc, float* m, float* s,
                  float* acc) {
  const int64_t D = a.D, D8 = a.D8, G = a.G, HG = a.H * a.G;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t row = tok[i] * a.H + h;
      const int8_t* kr = a.kc + row * D;
      const float f = a.k_dyn ? a.ks[row] : 1.0f;
      for (int64_t g = 0; g < G; ++g) {
        const float* q = qf + (h * G + g) * D8;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(kr[d]);
        sc[(h * G + g) * n + i] = dot * f;
      }
    }
  for (int64_t hg = 0; hg < HG; ++hg) std::tie(m[hg], s[hg]) = exp_scalar(sc + hg * n, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t row = tok[i] * a.H + h;
      const int8_t* vr = a.vc + row * D;
      const float f = a.v_dyn ? a.vs[row] : 1.0f;
      for (int64_t g = 0; g < G; ++g) {
        const float p = sc[(h * G + g) * n + i] * f;
        float* o = acc + (h * G + g) * D8;
        for (int64_t d = 0; d < D; ++d) o[d] += p * static_cast<float>(vr[d]);
      }
    }
}

#if PTQRT_X86
// ------------------------------------------------------------------------------------------- AVX2
// QK: positions four at a time, each 8-wide slice of four K rows widened once for two query heads
// of the group. PV: with one query head per kv head (MHA), four V rows folded into the output per
// load/store of it; with several (GQA), register tiles of query heads x channels summed over a block
// of positions. A head dim that is not a multiple of 8 ends in a zero-filled partial load.

// acc[g][r] += q_g[d, d + 8) * kv[r] for the GC query heads at qf (rows ldq apart).
template <int GC>
PTQRT_AVX2_INLINE void qk_step(__m256 (&acc)[GC][4], const __m256 (&kv)[4], const float* qf, int64_t ldq, int64_t d) {
  for (int g = 0; g < GC; ++g) {
    const __m256 q = _mm256_loadu_ps(qf + g * ldq + d);  // zero-padded past D
    for (int r = 0; r < 4; ++r) acc[g][r] = _mm256_fmadd_ps(q, kv[r], acc[g][r]);
  }
}

// out[g * ldo + r] = dot(q_g, k_r) for r < nrow (1..4) and GC query heads starting at qf. The main
// loop has no partial loads: with them inside, GCC kept the accumulators on the stack (a store of
// each per 8 channels).
template <int GC>
PTQRT_AVX2 void qk4_avx2(const int8_t* const* kr, int nrow, const float* qf, int64_t ldq, int64_t D, float* out,
                    int64_t ldo) {
  __m256 acc[GC][4];
  for (int g = 0; g < GC; ++g)
    for (int r = 0; r < 4; ++r) acc[g][r] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 kv[4] = {load8_i8(kr[0] + d), load8_i8(kr[1] + d), load8_i8(kr[2] + d), load8_i8(kr[3] + d)};
    qk_step<GC>(acc, kv, qf, ldq, d);
  }
  if (d < D) {
    const __m256 kv[4] = {load8_i8_partial(kr[0] + d, D - d), load8_i8_partial(kr[1] + d, D - d),
                          load8_i8_partial(kr[2] + d, D - d), load8_i8_partial(kr[3] + d, D - d)};
    qk_step<GC>(acc, kv, qf, ldq, d);
  }
  for (int g = 0; g < GC; ++g) {  // four horizontal sums at once
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[g][0], acc[g][1]), _mm256_hadd_ps(acc[g][2], acc[g][3]));
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    alignas(16) float v[4];
    _mm_store_ps(v, s);
    for (int r = 0; r < nrow; ++r) out[g * ldo + r] = v[r];
  }
}

PTQRT_AVX2 std::pair<float, float> exp_avx2(float* sc, int64_t n) {
  __m256 mv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= n; l += 8) {
    const __m256 s = _mm256_loadu_ps(sc + l);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
    mv = _mm256_max_ps(mv, s);
  }
  float mx = _mm256_movemask_ps(nan) ? NAN : hmax(mv);
  for (; l < n; ++l) mx = std::isnan(sc[l]) || std::isnan(mx) ? NAN : std::max(mx, sc[l]);
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (l = 0; l + 8 <= n; l += 8) {
    const __m256 p = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sc + l), mxv));
    _mm256_storeu_ps(sc + l, p);
    sv = _mm256_add_ps(sv, p);
  }
  float sum = hsum(sv);
  for (; l < n; ++l) sum += (sc[l] = std::exp(sc[l] - mx));
  return {mx, sum};
}

constexpr int64_t kPvBlock = 32;  // positions per PV block

// One position of pv_tile: o[g][c] += p[g * ldp] * v[8c, 8c + 8) (Partial: v[0, rem), zeros after).
template <int GC, int NC, bool Partial>
PTQRT_AVX2_INLINE void pv_step(__m256 (&o)[GC][NC], const int8_t* v, int64_t rem, const float* p, int64_t ldp) {
  static_assert(!Partial || NC == 1, "a partial slice is the last one");
  __m256 vv[NC];
  for (int c = 0; c < NC; ++c) vv[c] = Partial ? load8_i8_partial(v, rem) : load8_i8(v + 8 * c);
  for (int g = 0; g < GC; ++g) {
    const __m256 w = _mm256_broadcast_ss(p + g * ldp);
    for (int c = 0; c < NC; ++c) o[g][c] = _mm256_fmadd_ps(w, vv[c], o[g][c]);
  }
}

// acc[g][d, d + 8 * NC) += sum_i p[g][i] * v_i[d, d + 8 * NC) for the GC query heads of one kv head,
// over positions i < n (one block; v_i: that head's V row of position i, at vc + tok[i] * row + off;
// p[g][i] at p + g * ldp + i). The sums stay in registers across the positions, each V slice is
// widened once for the GC heads, and P positions go into P sets of sums (each FMA chain then waits
// on one FMA per P positions: with GC * NC = 4 sums a set, P = 2 keeps the FMA units busy).
// Partial: a last slice of rem < 8 channels (NC = 1).
template <int GC, int NC, int P, bool Partial>
PTQRT_AVX2 void pv_tile(const int8_t* vc, const int64_t* tok, int64_t n, int64_t row, int64_t off,
                        int64_t rem, const float* p, int64_t ldp, float* acc, int64_t D8) {
  __m256 o[P][GC][NC];
  for (int q = 0; q < P; ++q)
    for (int g = 0; g < GC; ++g)
      for (int c = 0; c < NC; ++c) o[q][g][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + P <= n; i += P)
    for (int q = 0; q < P; ++q) pv_step<GC, NC, Partial>(o[q], vc + tok[i + q] * row + off, rem, p + i + q, ldp);
  for (; i < n; ++i) pv_step<GC, NC, Partial>(o[0], vc + tok[i] * row + off, rem, p + i, ldp);
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NC; ++c) {
      __m256 t = o[0][g][c];
      for (int q = 1; q < P; ++q) t = _mm256_add_ps(t, o[q][g][c]);
      float* x = acc + g * D8 + 8 * c;
      _mm256_storeu_ps(x, _mm256_add_ps(_mm256_loadu_ps(x), t));
    }
}

// o[0, D) += sum_r w[r] * v_r over four V rows (MHA). Named values and a main loop without partial
// loads: written as loops over arrays, GCC kept the weights and row pointers on the stack.
PTQRT_AVX2 void pv4_avx2(const int8_t* const* vr, const float* w, int64_t D, float* o) {
  const __m256 p0 = _mm256_set1_ps(w[0]), p1 = _mm256_set1_ps(w[1]), p2 = _mm256_set1_ps(w[2]),
               p3 = _mm256_set1_ps(w[3]);
  const int8_t *v0 = vr[0], *v1 = vr[1], *v2 = vr[2], *v3 = vr[3];
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 x = _mm256_loadu_ps(o + d);
    x = _mm256_fmadd_ps(p0, load8_i8(v0 + d), x);
    x = _mm256_fmadd_ps(p1, load8_i8(v1 + d), x);
    x = _mm256_fmadd_ps(p2, load8_i8(v2 + d), x);
    x = _mm256_fmadd_ps(p3, load8_i8(v3 + d), x);
    _mm256_storeu_ps(o + d, x);
  }
  if (d < D) {  // o is D8 wide; the partial loads give zeros past D (lanes the combine never reads)
    __m256 x = _mm256_loadu_ps(o + d);
    x = _mm256_fmadd_ps(p0, load8_i8_partial(v0 + d, D - d), x);
    x = _mm256_fmadd_ps(p1, load8_i8_partial(v1 + d, D - d), x);
    x = _mm256_fmadd_ps(p2, load8_i8_partial(v2 + d, D - d), x);
    x = _mm256_fmadd_ps(p3, load8_i8_partial(v3 + d, D - d), x);
    _mm256_storeu_ps(o + d, x);
  }
}

// pv_tile over every channel of query heads [g0, g0 + GC) of kv head h: n positions, scores rows
// ldp apart.
template <int GC, int NC, int P>
PTQRT_AVX2_INLINE void pv_heads(const Attn& a, const int64_t* tok, int64_t n, int64_t ldp, int64_t h, int64_t g0,
                                const float* sc, float* acc) {
  const int64_t D = a.D, D8 = a.D8, row = a.H * D;
  const float* p = sc + (h * a.G + g0) * ldp;
  float* o = acc + (h * a.G + g0) * D8;
  int64_t d = 0;
  for (; d + 8 * NC <= D; d += 8 * NC)
    pv_tile<GC, NC, P, false>(a.vc, tok, n, row, h * D + d, 0, p, ldp, o + d, D8);
  for (; d + 8 <= D; d += 8) pv_tile<GC, 1, 2, false>(a.vc, tok, n, row, h * D + d, 0, p, ldp, o + d, D8);
  if (d < D) pv_tile<GC, 1, 2, true>(a.vc, tok, n, row, h * D + d, D - d, p, ldp, o + d, D8);
}

PTQRT_AVX2 void chunk_avx2(const Attn& a, const int64_t* tok, int64_t n, const float* qf, float* sc, float* m,
                           float* s, float* acc) {
  const int64_t D = a.D, D8 = a.D8, G = a.G, H = a.H, HG = H * G;
  for (int64_t i = 0; i < n; i += 4) {
    const int nrow = static_cast<int>(std::min<int64_t>(4, n - i));
    for (int64_t h = 0; h < H; ++h) {
      const int8_t* kr[4];
      for (int r = 0; r < 4; ++r) kr[r] = a.kc + (tok[i + std::min(r, nrow - 1)] * H + h) * D;
      float* out = sc + h * G * n + i;
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) qk4_avx2<2>(kr, nrow, qf + (h * G + g) * D8, D8, D, out + g * n, n);
      if (g < G) qk4_avx2<1>(kr, nrow, qf + (h * G + g) * D8, D8, D, out + g * n, n);
      if (a.k_dyn)
        for (int r = 0; r < nrow; ++r) {
          const float f = a.ks[tok[i + r] * H + h];
          for (int64_t gg = 0; gg < G; ++gg) out[gg * n + r] *= f;
        }
    }
  }
  for (int64_t hg = 0; hg < HG; ++hg) std::tie(m[hg], s[hg]) = exp_avx2(sc + hg * n, n);
  if (G == 1) {  // MHA: each V row meets one query, so the widening decides; four rows a pass
    for (int64_t i = 0; i < n; i += 4) {
      const int nrow = static_cast<int>(std::min<int64_t>(4, n - i));
      for (int64_t h = 0; h < H; ++h) {
        const int8_t* vr[4];
        float w[4];
        for (int r = 0; r < 4; ++r) {
          const int64_t row = tok[i + std::min(r, nrow - 1)] * H + h;
          vr[r] = a.vc + row * D;  // a repeated row (r >= nrow) weighs 0
          w[r] = r < nrow ? sc[h * n + i + r] * (a.v_dyn ? a.vs[row] : 1.0f) : 0.0f;
        }
        pv4_avx2(vr, w, D, acc + h * D8);
      }
    }
    return;
  }
  if (a.v_dyn)  // the weights take the dynamic V scale (s, the softmax denominator, does not)
    for (int64_t hg = 0; hg < HG; ++hg) {
      float* w = sc + hg * n;
      const float* vs = a.vs + hg / G;
      for (int64_t i = 0; i < n; ++i) w[i] *= vs[tok[i] * H];
    }
  // GQA: register tiles of GC query heads x 8 * NC channels (pv_tile). Blocks of positions, every
  // head inside: one position's heads share its rows' pages, so a block touches few pages however
  // long the chunk (a walk over the whole chunk per head would touch a new page per position where
  // Hkv * D >= 4 KiB).
  for (int64_t i0 = 0; i0 < n; i0 += kPvBlock) {
    const int64_t nb = std::min(kPvBlock, n - i0);
    for (int64_t h = 0; h < H; ++h) {
      int64_t g = 0;
      for (; g + 4 <= G; g += 4) pv_heads<4, 2, 1>(a, tok + i0, nb, n, h, g, sc + i0, acc);
      for (; g + 2 <= G; g += 2) pv_heads<2, 4, 1>(a, tok + i0, nb, n, h, g, sc + i0, acc);
      for (; g < G; ++g) pv_heads<1, 4, 2>(a, tok + i0, nb, n, h, g, sc + i0, acc);
    }
  }
}
#endif

}  // namespace

at::Tensor int8_kv_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& k_scale, const at::Tensor& v_scale,
                                    const at::Tensor& block_table, const at::Tensor& seq_lens, double sm_scale) {
  const char* op = "int8_kv_decode_attention";
  check_caches(k_cache, v_cache, op);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), H = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(H > 0 && q.dim() == 3 && q.is_contiguous() && q.size(2) == D && q.size(1) % H == 0, "ptqrt_cpu.", op,
              ": q must be contiguous [B, Hq, D] with D = ", D, " and Hq a multiple of Hkv = ", H, "; got ", q.sizes());
  const int64_t B = q.size(0), G = q.size(1) / H, HG = H * G;
  check_cache_scale(k_scale, k_cache, op, "k_scale");
  check_cache_scale(v_scale, v_cache, op, "v_scale");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && block_table.scalar_type() == at::kInt &&
                  block_table.is_contiguous(),
              "ptqrt_cpu.", op, ": block_table must be contiguous int32 [B, max_blocks] with B = ", B, "; got ",
              block_table.sizes(), " ", block_table.scalar_type());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.scalar_type() == at::kInt, "ptqrt_cpu.", op,
              ": seq_lens must be int32 [B] = [", B, "]; got ", seq_lens.sizes(), " ", seq_lens.scalar_type());
  const int64_t maxb = block_table.size(1);
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const std::vector<int64_t> lens = int_vector(seq_lens);
  for (int64_t b = 0; b < B; ++b) {  // every block a sequence reads must exist: this guards memory
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= maxb * bs, "ptqrt_cpu.", op, ": seq_lens[", b, "] = ", lens[b],
                      " is outside [0, max_blocks * block_size] = [0, ", maxb * bs, "]");
    for (int64_t i = 0; i < ceil_div(lens[b], bs); ++i)
      TORCH_CHECK_VALUE(bt[b * maxb + i] >= 0 && bt[b * maxb + i] < nb, "ptqrt_cpu.", op, ": block_table[", b, "][",
                        i, "] = ", bt[b * maxb + i], " is not a block of the cache (num_blocks ", nb, ")");
  }
  at::Tensor out = at::zeros_like(q);  // a sequence of length 0 attends to nothing: zeros, as the reference
  if (B == 0 || HG == 0 || D == 0) return out;

  const Isa isa = active_isa();
  const int64_t D8 = round_up(D, 8);
  const Attn a{k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scale.data_ptr<float>(),
               v_scale.data_ptr<float>(), is_dynamic(k_scale), is_dynamic(v_scale), bs, H, D, D8, G};

  // Split each sequence into chunks so that even one sequence keeps every thread busy (about four
  // tasks per thread), but never below 64 positions, where the combine step would dominate.
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += lens[b];
  const int64_t want = 4 * at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(64, ceil_div(std::max<int64_t>(total, 1), want));
  std::vector<Task> tasks;
  std::vector<int64_t> first(B + 1, 0);  // tasks of sequence b: [first[b], first[b + 1])
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(tasks.size());
    for (int64_t l0 = 0; l0 < lens[b]; l0 += chunk) tasks.push_back({b, l0, std::min(chunk, lens[b] - l0)});
  }
  first[B] = static_cast<int64_t>(tasks.size());
  const int64_t T = first[B];
  std::vector<float> part_ms(T * HG * 2), part_acc(T * HG * D8, 0.0f);

  const float* ksp = a.ks;
  const float* vsp = a.vs;
  std::vector<float> qf(B * HG * D8, 0.0f);  // q * sm_scale (* static K scale) [B, H*G, D8], zero-padded
  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using X = decltype(tag);
    const X* qp = reinterpret_cast<const X*>(q.data_ptr());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hg = 0; hg < HG; ++hg)
        for (int64_t d = 0; d < D; ++d)
          qf[(b * HG + hg) * D8 + d] = to_f32(qp[(b * HG + hg) * D + d]) * static_cast<float>(sm_scale) *
                                       (a.k_dyn ? 1.0f : ksp[(hg / G) * D + d]);
  });

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    Scratch sc;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = tasks[t];
      if (static_cast<int64_t>(sc.scores.size()) < HG * tk.n) sc.scores.resize(HG * tk.n);
      if (static_cast<int64_t>(sc.tok.size()) < tk.n) sc.tok.resize(tk.n);
      gather_slots(bt + tk.b * maxb, bs, tk.l0, tk.n, sc.tok.data());
      float* m = part_ms.data() + t * HG * 2;
      float* acc = part_acc.data() + t * HG * D8;
      const float* qb = qf.data() + tk.b * HG * D8;
#if PTQRT_X86
      if (isa == Isa::avx2 || isa == Isa::avx512) {
        chunk_avx2(a, sc.tok.data(), tk.n, qb, sc.scores.data(), m, m + HG, acc);
        continue;
      }
#endif
      chunk_scalar(a, sc.tok.data(), tk.n, qb, sc.scores.data(), m, m + HG, acc);
    }
  });

  // Combine a sequence's chunks: out = sum_t e^(m_t - M) acc_t / sum_t e^(m_t - M) s_t (* static V scale).
  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using X = decltype(tag);
    X* op_ = reinterpret_cast<X*>(out.data_ptr());
    at::parallel_for(0, B * HG, 16, [&](int64_t i0, int64_t i1) {
      std::vector<float> o(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / HG, hg = i % HG;
        if (first[b] == first[b + 1]) continue;  // empty sequence: stays zero
        float M = -INFINITY;
        bool nan = false;
        for (int64_t t = first[b]; t < first[b + 1]; ++t) {
          const float mt = part_ms[t * HG * 2 + hg];
          nan |= std::isnan(mt);
          M = std::max(M, mt);
        }
        if (nan) M = NAN;
        float den = 0.0f;
        std::fill(o.begin(), o.end(), 0.0f);
        for (int64_t t = first[b]; t < first[b + 1]; ++t) {
          const float w = std::exp(part_ms[t * HG * 2 + hg] - M);
          den += w * part_ms[t * HG * 2 + HG + hg];
          const float* acc = part_acc.data() + (t * HG + hg) * D8;
          for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
        }
        const float inv = 1.0f / den;
        for (int64_t d = 0; d < D; ++d)
          op_[i * D + d] = static_cast<X>(o[d] * inv * (a.v_dyn ? 1.0f : vsp[(hg / G) * D + d]));
      }
    });
  });
  return out;
}

}  // namespace ptqrt_cpu
