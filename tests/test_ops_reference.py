"""The op contracts on hand-computed cases, through the public ops (whatever backend `auto` picks on
the CPU) and through the reference directly; opcheck for every op; bad input."""
import math

import pytest
import torch

import ptqrt.ops as ops
from ptqrt import reference as ref
from tests.util import poison_like, rand_int8, rand_scale

BACKENDS_ON_CPU = ["reference", "auto"]


@pytest.fixture(params=BACKENDS_ON_CPU)
def backend(request):
    ops.set_backend(request.param)
    return request.param


def test_quantize_per_token_by_hand(backend):
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.0, 0.0, 0.0, 0.0], [-0.3, 0.2, 0.1, 0.0]])
    q, s = ops.quantize_per_token(x)
    assert s.dtype == torch.float32 and q.dtype == torch.int8
    assert s.tolist() == pytest.approx([1.0, 1.0, 0.3 / 127])
    assert q[0].tolist() == [1, -2, 0, 127]  # 0.5 rounds half to even
    assert q[1].tolist() == [0, 0, 0, 0]  # all-zero row: scale 1, exact zeros
    assert q[2].tolist() == [-127, round(0.2 / 0.3 * 127), round(0.1 / 0.3 * 127), 0]


def test_quantize_per_token_smooth_is_fused(backend):
    x = torch.randn(5, 12)
    s = torch.rand(12) + 0.5
    q1, sc1 = ops.quantize_per_token(x, s)
    q2, sc2 = ops.quantize_per_token(x / s)
    torch.testing.assert_close(sc1, sc2)
    assert (q1.int() - q2.int()).abs().max() <= 1  # x / s rounding may differ by one step at a tie


def test_quantize_per_tensor_by_hand(backend):
    x = torch.tensor([[0.5, -1.0, 300.0], [2.5, 0.0, -0.49]])
    q = ops.quantize_per_tensor(x, torch.tensor([1.0]))
    assert q.tolist() == [[0, -1, 127], [2, 0, 0]]  # clamps at 127, half to even
    q = ops.quantize_per_tensor(x, torch.tensor(0.5), torch.tensor([1.0, 2.0, 4.0]))
    assert q.tolist() == [[1, -1, 127], [5, 0, 0]]


def test_w8a8_gemm_by_hand(backend):
    x_q = torch.tensor([[1, 2, 3], [-127, 127, 0]], dtype=torch.int8)
    w_q = torch.tensor([[1, 0, -1], [2, 2, 2]], dtype=torch.int8)
    acc = ops.w8a8_gemm(x_q, torch.ones(2), w_q, torch.ones(2), out_dtype=torch.int32)
    assert acc.tolist() == [[-2, 12], [-127, 0]]
    y = ops.w8a8_gemm(x_q, torch.tensor([0.5, 2.0]), w_q, torch.tensor([1.0, 0.25]), torch.tensor([1.0, -1.0]),
                      torch.float32)
    assert y.tolist() == [[-1 * 1.0 + 1, 12 * 0.5 * 0.25 - 1], [-127 * 2.0 + 1, -1.0]]
    y = ops.w8a8_gemm(x_q, torch.tensor([2.0]), w_q, torch.ones(2), None, torch.float16)  # per-tensor scale
    assert y.dtype == torch.float16 and y.tolist() == [[-4, 24], [-254, 0]]


def test_w8a8_int32_exact_near_overflow_bound(backend):
    k = ref.MAX_K_INT32
    x_q = torch.full((3, k), 127, dtype=torch.int8)
    x_q[1] = -127
    x_q[2] = -128  # any int8 input: -128 * -128 * K still fits
    w_q = torch.full((3, k), 127, dtype=torch.int8)
    w_q[2] = -128
    acc = ops.w8a8_gemm(x_q, torch.ones(3), w_q, torch.ones(3), out_dtype=torch.int32)
    assert acc[0, 0].item() == 127 * 127 * k and acc[1, 1].item() == -127 * 127 * k
    assert acc[2, 2].item() == 128 * 128 * k and acc[2, 0].item() == -128 * 127 * k
    with pytest.raises(ValueError, match="exceeds 131071"):
        ops.w8a8_gemm(torch.zeros(1, k + 1, dtype=torch.int8), torch.ones(1), torch.zeros(1, k + 1, dtype=torch.int8),
                      torch.ones(1), out_dtype=torch.int32)


def test_w8a16_gemm_by_hand(backend):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    w_q = torch.tensor([[1, 1, 1, 1], [1, -1, 2, 0]], dtype=torch.int8)
    y = ops.w8a16_gemm(x, w_q, torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.0]), 0)
    assert y.tolist() == [[6.0, 2 * (1 - 2 + 6)]]
    y = ops.w8a16_gemm(x, w_q, torch.tensor([[1.0, 10.0], [1.0, 0.5]]), None, 2)  # per-group of 2
    assert y.tolist() == [[1 + 2 + 10 * (3 + 4), 1 - 2 + 0.5 * 6]]


def test_kv_cache_append_and_decode_by_hand(backend):
    # one block of 4 slots, 1 head, D = 2; dynamic scales
    kc = torch.zeros(2, 4, 1, 2, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(2, 4, 1)
    vs = torch.zeros(2, 4, 1)
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    v = torch.tensor([[[3.0, -3.0]], [[1.0, 1.0]]])
    ops.kv_cache_append(k, v, kc, vc, ks, vs, torch.tensor([5, 6]))  # block 1, offsets 1 and 2
    assert kc[1, 1, 0].tolist() == [127, 0] and kc[1, 2, 0].tolist() == [0, 127]
    assert ks[1, 1, 0].item() == pytest.approx(1 / 127) and vs[1, 1, 0].item() == pytest.approx(3 / 127)
    assert kc[0].abs().sum() == 0  # untouched
    # q attends two keys of block 1 (positions 1, 2) through a block table [1, 0] ... use block 1 first
    ops.kv_cache_append(k[:1] * 0, v[:1] * 0, kc, vc, ks, vs, torch.tensor([4]))  # position 0 of block 1
    q = torch.tensor([[[1.0, 1.0]]])
    out = ops.int8_kv_decode_attention(q, kc, vc, ks, vs, torch.tensor([[1, 0]], dtype=torch.int32),
                                       torch.tensor([3], dtype=torch.int32), 1.0)
    s = torch.tensor([0.0, 1.0, 2.0])
    p = torch.softmax(s, 0)
    expect = p[1] * torch.tensor([3.0, -3.0]) + p[2] * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(out[0, 0], expect, atol=1e-5, rtol=1e-5)


def test_decode_empty_sequence_gives_zeros(backend):
    kc = rand_int8(2, 4, 2, 8)
    ks = rand_scale(2 * 4 * 2).reshape(2, 4, 2)
    out = ops.int8_kv_decode_attention(torch.randn(2, 4, 8), kc, kc.clone(), ks, ks.clone(),
                                       torch.tensor([[0, 1], [1, 0]], dtype=torch.int32),
                                       torch.tensor([0, 5], dtype=torch.int32), 0.3)
    assert out[0].abs().sum() == 0 and out[1].abs().sum() > 0


def test_nan_and_inf_stay_in_their_token(backend):
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    w_q, w_s = ref.quantize_weight(torch.randn(8, 16))
    clean = x.clone()
    clean[1] = 0
    clean[2] = 0
    q, s = ops.quantize_per_token(x)
    y = ops.w8a8_gemm(q, s, w_q, w_s, None, torch.float32)
    qc, sc = ops.quantize_per_token(clean)
    yc = ops.w8a8_gemm(qc, sc, w_q, w_s, None, torch.float32)
    assert torch.equal(y[[0, 3]], yc[[0, 3]])
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).any()
    y16 = ops.w8a16_gemm(x, w_q, w_s, None, 0)
    assert torch.isfinite(y16[[0, 3]]).all() and not torch.isfinite(y16[1]).all()
    qs = ops.quantize_per_tensor(x, torch.tensor([0.01]))
    assert torch.equal(qs[[0, 3]], ops.quantize_per_tensor(clean, torch.tensor([0.01]))[[0, 3]])


def test_zero_rows_and_channels_give_scale_one():
    w = torch.randn(6, 32)
    w[2] = 0
    w_q, w_s = ref.quantize_weight(w)
    assert w_s[2] == 1 and w_q[2].abs().sum() == 0
    w_q, w_s = ref.quantize_weight(w, 16)
    assert (w_s[2] == 1).all() and torch.isfinite(w_s).all()


@pytest.mark.parametrize("group_size", (0, 4))
def test_empty_k_gives_the_bias(backend, group_size):
    """K = 0: every sum is empty, so y is the bias (or 0); per group, w_scale is [N, 0]."""
    bias = torch.randn(5)
    w_q = rand_int8(5, 0)
    y = ops.w8a16_gemm(torch.randn(3, 0), w_q, torch.rand(5, 0) if group_size else rand_scale(5), bias, group_size)
    assert torch.equal(y, bias.expand(3, 5))
    y = ops.w8a8_gemm(rand_int8(3, 0), rand_scale(3), w_q, rand_scale(5), bias, torch.float32)
    assert torch.equal(y, bias.expand(3, 5))


def test_empty_m_gives_empty_output(backend):
    x = torch.randn(0, 24)
    q, s = ops.quantize_per_token(x)
    assert q.shape == (0, 24) and s.shape == (0,)
    w_q = rand_int8(5, 24)
    assert ops.w8a8_gemm(q, s, w_q, rand_scale(5), None, torch.float16).shape == (0, 5)
    assert ops.w8a16_gemm(x, w_q, rand_scale(5), None, 0).shape == (0, 5)


@pytest.mark.parametrize("group_size", (0, 8))
def test_empty_n_gives_empty_output(backend, group_size):
    x = torch.randn(3, 24)
    w_s = torch.rand(0, 24 // group_size) if group_size else torch.rand(0)
    assert ops.w8a16_gemm(x, rand_int8(0, 24), w_s, None, group_size).shape == (3, 0)
    q, s = ops.quantize_per_token(x)
    assert ops.w8a8_gemm(q, s, rand_int8(0, 24), torch.rand(0), None, torch.float32).shape == (3, 0)


@pytest.mark.parametrize("bad, match", [
    (lambda: ops.quantize_per_token(torch.ones(3, 4, dtype=torch.int32)), "dtype"),
    (lambda: ops.quantize_per_token(torch.ones(3)), "2-D"),
    (lambda: ops.quantize_per_token(torch.ones(4, 3).T), "contiguous"),
    (lambda: ops.quantize_per_token(torch.ones(3, 4), torch.ones(5)), r"smooth must have shape \(4,\)"),
    (lambda: ops.w8a8_gemm(rand_int8(2, 8), torch.ones(2), rand_int8(3, 9), torch.ones(3)), "K differs"),
    (lambda: ops.w8a8_gemm(rand_int8(2, 8), torch.ones(3), rand_int8(3, 8), torch.ones(3)), "x_scale"),
    (lambda: ops.w8a8_gemm(rand_int8(2, 8), torch.ones(2), rand_int8(3, 8), torch.ones(4)), "w_scale"),
    (lambda: ops.w8a8_gemm(rand_int8(2, 8).float(), torch.ones(2), rand_int8(3, 8), torch.ones(3)), "x_q must have dtype int8"),
    (lambda: ops.w8a8_gemm(rand_int8(2, 8), torch.ones(2), rand_int8(3, 8), torch.ones(3), None, torch.int8), "out_dtype"),
    (lambda: ops.w8a16_gemm(torch.ones(2, 8), rand_int8(3, 8), torch.ones(3, 3), None, 3), "does not divide"),
    (lambda: ops.w8a16_gemm(torch.ones(2, 8), rand_int8(3, 8), torch.ones(3), None, 4), r"\(3, 2\)"),
    (lambda: ops.w8a16_gemm(torch.ones(2, 8, dtype=torch.float64), rand_int8(3, 8), torch.ones(3), None, 0), "dtype"),
    (lambda: ops.kv_cache_append(torch.ones(1, 2, 8), torch.ones(1, 2, 8), rand_int8(3, 0, 2, 8), rand_int8(3, 0, 2, 8),
                                 torch.ones(2, 8), torch.ones(2, 8), torch.zeros(1, dtype=torch.long)),
     "block_size, Hkv and D of at least 1"),
    (lambda: ops.int8_kv_decode_attention(torch.ones(1, 2, 8), rand_int8(3, 0, 2, 8), rand_int8(3, 0, 2, 8),
                                          torch.ones(2, 8), torch.ones(2, 8), torch.zeros(1, 2, dtype=torch.int32),
                                          torch.ones(1, dtype=torch.int32), 0.5),
     "block_size, Hkv and D of at least 1"),
    (lambda: ops.int8_kv_decode_attention(torch.ones(1, 2, 8), rand_int8(3, 4, 0, 8), rand_int8(3, 4, 0, 8),
                                          torch.ones(0, 8), torch.ones(0, 8), torch.zeros(1, 2, dtype=torch.int32),
                                          torch.ones(1, dtype=torch.int32), 0.5),
     "block_size, Hkv and D of at least 1"),
])
def test_bad_input_is_refused_clearly(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def _kv(nb=4, bs=4):
    kc = rand_int8(nb, bs, 1, 8)
    return kc, kc.clone(), torch.rand(nb, bs, 1) + 0.1, torch.rand(nb, bs, 1) + 0.1


@pytest.mark.parametrize("table, lens, match", [
    ([[0, -1]], [8], r"block_table.*(entry 1|\[0\]\[1\]) = -1 is not a block of the cache \(num_blocks 4\)"),
    ([[0, 4]], [5], r"block_table.*(entry 1|\[0\]\[1\]) = 4 is not a block of the cache"),
    ([[0, 1]], [9], r"9 is outside \[0, max_blocks \* block_size\] = \[0, 8\]"),
    ([[0, 1]], [-1], r"-1 is (negative|outside)"),
])
def test_decode_refuses_a_table_it_cannot_read(backend, table, lens, match):
    """On the CPU every backend refuses what it cannot read: a block id out of range where the sequence
    reads (a negative one included: it must not wrap around to the last block), a length past the
    table's capacity or below 0. (The GPU kernels mask them instead; see kernels/kv_cache.py.)"""
    kc, vc, ks, vs = _kv()
    with pytest.raises(ValueError, match=match):
        ops.int8_kv_decode_attention(torch.randn(1, 2, 8), kc, vc, ks, vs, torch.tensor(table, dtype=torch.int32),
                                     torch.tensor(lens, dtype=torch.int32), 0.3)
    # a -1 past the blocks the sequence reads is padding, not an error
    out = ops.int8_kv_decode_attention(torch.randn(1, 2, 8), kc, vc, ks, vs, torch.tensor([[2, -1]], dtype=torch.int32),
                                       torch.tensor([4], dtype=torch.int32), 0.3)
    assert torch.isfinite(out).all()


def test_append_refuses_a_slot_past_the_cache(backend):
    kc, vc, ks, vs = _kv(2, 4)
    before = kc.clone()
    with pytest.raises(ValueError, match=r"slots\[1\] = 8 is past the cache's 8 slots"):
        ops.kv_cache_append(torch.randn(2, 1, 8), torch.randn(2, 1, 8), kc, vc, ks, vs, torch.tensor([0, 8]))
    assert torch.equal(kc, before)


def test_scalar_arguments_as_the_schema_takes_them(backend):
    """A plain eager call takes what the op's schema does: sm_scale any positive real (an int, a numpy
    float), group_size an int; a float group size (K / groups) or a bool is refused, not truncated."""
    import numpy as np

    kc, vc, ks, vs = _kv()
    args = (torch.randn(1, 2, 8), kc, vc, ks, vs, torch.tensor([[0, 1]], dtype=torch.int32),
            torch.tensor([6], dtype=torch.int32))
    want = ref.int8_kv_decode_attention(*args, 1.0)
    for sm in (1, np.float32(1.0), 1.0):
        torch.testing.assert_close(ops.int8_kv_decode_attention(*args, sm), want)
    for sm in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="sm_scale must be a positive finite number"):
            ops.int8_kv_decode_attention(*args, sm)
    x, w_q = torch.randn(3, 8), rand_int8(5, 8)
    w_s = rand_scale(10).reshape(5, 2)
    torch.testing.assert_close(ops.w8a16_gemm(x, w_q, w_s, None, np.int64(4)), ref.w8a16_gemm(x, w_q, w_s, None, 4))
    for g in (4.0, 2.5, True):
        with pytest.raises(ValueError, match="group_size must be an int"):
            ops.w8a16_gemm(x, w_q, w_s, None, g)


def test_w8a16_inf_channel_scale_gives_inf_as_the_kernels_do(backend):
    """Per channel the scale multiplies the dot product: an Inf scale gives ±Inf (not the NaN of 0 * Inf
    in a dequantized weight), whatever the backend."""
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    w_q = torch.tensor([[0, 3], [1, 1]], dtype=torch.int8)
    y = ops.w8a16_gemm(x, w_q, torch.tensor([float("inf"), 0.5]), None, 0)
    assert y[0, 0] == float("inf") and y[1, 0] == float("inf")
    torch.testing.assert_close(y[:, 1], torch.tensor([1.5, 0.0]))


def _opcheck_cases():
    x = torch.randn(5, 24)
    w_q = rand_int8(7, 24)
    w_s = rand_scale(7)
    q, s = ref.quantize_per_token(x)
    kc = rand_int8(3, 4, 2, 8)
    return [
        (ops.quantize_per_token, (x, None)),
        (ops.quantize_per_token, (x, torch.rand(24) + 0.5)),
        (ops.quantize_per_tensor, (x, torch.tensor([0.02]), None)),
        (ops.w8a8_gemm, (q, s, w_q, w_s, torch.randn(7), torch.float32)),
        (ops.w8a8_gemm, (q, s, w_q, w_s, None, torch.int32)),
        (ops.w8a16_gemm, (x, w_q, w_s, None, 0)),
        (ops.w8a16_gemm, (x.half(), w_q, rand_scale(7 * 3).reshape(7, 3), torch.randn(7, dtype=torch.half), 8)),
        (ops.kv_cache_append, (torch.randn(3, 2, 8), torch.randn(3, 2, 8), kc.clone(), kc.clone(),
                               torch.rand(3, 4, 2), torch.rand(3, 4, 2), torch.tensor([0, 5, -1]))),
        (ops.kv_cache_append, (torch.randn(3, 2, 8), torch.randn(3, 2, 8), kc.clone(), kc.clone(),
                               torch.rand(2, 8), torch.rand(2, 8), torch.tensor([0, 5, 11]))),
        (ops.int8_kv_decode_attention, (torch.randn(2, 4, 8), kc, kc.clone(), torch.rand(3, 4, 2), torch.rand(3, 4, 2),
                                        torch.tensor([[0, 2], [1, 0]], dtype=torch.int32),
                                        torch.tensor([6, 3], dtype=torch.int32), 1 / math.sqrt(8))),
    ]


@pytest.mark.parametrize("i", range(10))
def test_opcheck(i, backend):
    fn, args = _opcheck_cases()[i]
    torch.library.opcheck(fn, args)


# ------------------------------------------------------------------------------------------ eager path
def test_plain_eager_calls_skip_the_dispatcher_and_others_do_not(backend):
    """A plain eager call runs the op's body directly (the dispatcher round trip costs ~35 us); under
    a dispatch mode, with a tensor subclass (FakeTensor) or an input that needs a gradient, the call
    goes through torch.ops.ptqrt as before, and both give the same result."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(5, 24)
    q_plain, s_plain = ops.quantize_per_token(x)
    with Log():
        q_mode, s_mode = ops.quantize_per_token(x)
    assert "ptqrt.quantize_per_token.default" in seen
    assert torch.equal(q_plain, q_mode) and torch.equal(s_plain, s_mode)
    with FakeTensorMode() as mode:
        q_fake, _ = ops.quantize_per_token(mode.from_tensor(x))
    assert q_fake.shape == (5, 24) and q_fake.dtype == torch.int8
    xg = x.clone().requires_grad_()
    q_grad, _ = ops.quantize_per_token(xg)  # through the op, whose output needs no grad
    assert torch.equal(q_grad, q_plain)


def test_plain_eager_kv_cache_append_bumps_versions(backend):
    """In-place arguments get their version counter bumped on the direct path too, as the op does."""
    kc, vc = rand_int8(3, 4, 2, 8), rand_int8(3, 4, 2, 8)
    ks, vs = torch.rand(3, 4, 2), torch.rand(3, 4, 2)
    before = [t._version for t in (kc, vc, ks, vs)]
    ops.kv_cache_append(torch.randn(2, 2, 8), torch.randn(2, 2, 8), kc, vc, ks, vs, torch.tensor([0, 5]))
    assert all(t._version > b for t, b in zip((kc, vc, ks, vs), before))
    ops.kv_cache_append(torch.randn(1, 2, 8), torch.randn(1, 2, 8), k_cache=kc, v_cache=vc, k_scale=ks,
                        v_scale=vs, slots=torch.tensor([1]))
    assert all(t._version > b + 1 for t, b in zip((kc, vc, ks, vs), before))
