"""SmoothQuant, OSL and GPTQ (ptqrt/algorithms): hand-checked values, invariants, and the reference oracle."""
import math

import pytest
import torch
import torch.nn.functional as F

from ptqrt import reference
from ptqrt.algorithms.gptq import accumulate_hessian, gptq_quantize
from ptqrt.algorithms.osl import DEFAULT_GRID, quantized_output, search_alpha
from ptqrt.algorithms.smoothquant import (fold_into_norm, scale_linear_weight, smooth_scales,
                                          weight_absmax_per_in_channel)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated_x(t, k, seed, outlier=None):
    """Tokens with strongly correlated channels (as real hidden states have), optional outlier channel."""
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[:, None]
    x = torch.randn(t, k, generator=g) @ mix + 0.1 * torch.randn(t, k, generator=g)
    if outlier is not None:
        x[:, outlier] *= 60.0
    return x


# ---------------------------------------------------------------- SmoothQuant

def test_smooth_scales_hand_computed():
    act = torch.tensor([4.0, 1.0, 9.0, 0.0, 2.0])
    w = torch.tensor([1.0, 4.0, 1.0, 2.0, 0.0])
    # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4), sqrt(9)/sqrt(1); a zero on either side leaves the channel alone
    assert torch.equal(smooth_scales(act, w, 0.5), torch.tensor([2.0, 0.5, 3.0, 1.0, 1.0]))
    assert smooth_scales(act, w).dtype == torch.float32


def test_smooth_scales_alpha_edges():
    act = torch.tensor([4.0, 0.5, 3.0])
    w = torch.tensor([2.0, 8.0, 0.25])
    torch.testing.assert_close(smooth_scales(act, w, 0.0), 1.0 / w)  # all range moved into the activations
    torch.testing.assert_close(smooth_scales(act, w, 1.0), act)  # all range moved into the weights
    # alpha = 1 makes every smoothed activation channel's max exactly 1
    torch.testing.assert_close(act / smooth_scales(act, w, 1.0), torch.ones(3))


def test_smooth_scales_guards_and_clamp():
    act = torch.tensor([float("nan"), float("inf"), 1e12, 1e-12, 3.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, float("nan")], dtype=torch.float64)
    s = smooth_scales(act, w, 1.0)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.tensor([1.0, 1.0, 1e5, 1e-5, 1.0]))


@pytest.mark.parametrize("bad", [
    dict(act_absmax=torch.ones(3), weight_absmax=torch.ones(4)),
    dict(act_absmax=torch.ones(3, 1), weight_absmax=torch.ones(3, 1)),
    dict(act_absmax=torch.ones(3), weight_absmax=torch.ones(3), alpha=1.5),
    dict(act_absmax=torch.ones(3), weight_absmax=torch.ones(3), alpha=-0.1),
    dict(act_absmax=-torch.ones(3), weight_absmax=torch.ones(3)),
    dict(act_absmax=torch.ones(3, dtype=torch.int32), weight_absmax=torch.ones(3)),
])
def test_smooth_scales_rejects(bad):
    with pytest.raises(ValueError):
        smooth_scales(**bad)


def test_smoothing_preserves_the_float_function():
    g = _gen(1)
    x = torch.randn(17, 37, generator=g, dtype=torch.float64) * torch.logspace(-1, 2, 37, dtype=torch.float64)
    w = torch.randn(23, 37, generator=g, dtype=torch.float64)
    s = smooth_scales(x.abs().amax(0), w.abs().amax(0), 0.5).to(torch.float64)
    assert not torch.allclose(s, torch.ones_like(s))
    w_s = scale_linear_weight(w, s)
    assert w_s.dtype == w.dtype and w_s.shape == w.shape
    torch.testing.assert_close((x / s) @ w_s.T, x @ w.T, rtol=1e-6, atol=1e-6)
    # out of place
    assert not torch.equal(w_s, w)


def test_fold_into_layernorm_and_rmsnorm():
    g = _gen(2)
    k = 29
    x = torch.randn(5, k, generator=g)
    gamma, beta = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    s = torch.rand(k, generator=g) * 4 + 0.1
    nw, nb = fold_into_norm(gamma, beta, s)
    torch.testing.assert_close(F.layer_norm(x, (k,), nw, nb), F.layer_norm(x, (k,), gamma, beta) / s)
    nw2, nb2 = fold_into_norm(gamma.half(), None, s)
    assert nb2 is None and nw2.dtype == torch.float16
    rms = lambda v, wt: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * wt  # noqa: E731
    torch.testing.assert_close(rms(x, nw2.float()), rms(x, gamma.half().float()) / s, rtol=2e-3, atol=2e-3)
    assert torch.equal(gamma, gamma.clone())  # inputs untouched
    with pytest.raises(ValueError, match="s must be"):
        fold_into_norm(gamma, beta, s[:-1])


def test_fold_into_a_one_plus_gamma_norm():
    """Norms that scale by (1 + γ) (Gemma, VaultGemma, Qwen3-Next): γ' = (1 + γ) / s - 1, not γ / s."""
    g = _gen(7)
    k = 19
    x = torch.randn(5, k, generator=g)
    gamma, beta = 0.1 * torch.randn(k, generator=g), torch.randn(k, generator=g)
    s = torch.rand(k, generator=g) * 4 + 0.1
    norm = lambda wt, b: F.layer_norm(x, (k,)) * (1.0 + wt) + (0 if b is None else b)  # noqa: E731
    nw, nb = fold_into_norm(gamma, beta, s, offset=1.0)
    torch.testing.assert_close(norm(nw, nb), norm(gamma, beta) / s)
    torch.testing.assert_close(nw, (1.0 + gamma) / s - 1.0)
    assert torch.equal(fold_into_norm(gamma, None, s, offset=0.0)[0], fold_into_norm(gamma, None, s)[0])


def test_weight_absmax_per_in_channel():
    q = torch.tensor([[1.0, -5.0, 0.0], [2.0, 1.0, 0.0]])
    k = torch.tensor([[-3.0, 1.0, 0.5]])
    assert torch.equal(weight_absmax_per_in_channel([q, k]), torch.tensor([3.0, 5.0, 0.5]))
    assert torch.equal(weight_absmax_per_in_channel(q), torch.tensor([2.0, 5.0, 0.0]))
    with pytest.raises(ValueError, match="K=4"):
        weight_absmax_per_in_channel([q, torch.ones(2, 4)])
    with pytest.raises(ValueError, match="empty"):
        weight_absmax_per_in_channel([])


# ---------------------------------------------------------------- OSL

def _mse(x, ws, bs, s, gran):
    xf = x.float()
    outs = quantized_output(xf, ws, bs, s, gran)
    return sum(((o - (xf @ w.T + (0 if b is None else b))) ** 2).mean().item() for o, w, b in zip(outs, ws, bs))


@pytest.mark.parametrize("gran", ["per_tensor", "per_token"])
def test_osl_picks_the_grid_minimum_and_beats_no_smoothing(gran):
    x = _correlated_x(96, 40, seed=3, outlier=7)
    g = _gen(4)
    w = torch.randn(24, 40, generator=g) * 0.05
    b = torch.randn(24, generator=g)
    alpha, s = search_alpha(x, w, b, act_granularity=gran)
    assert alpha in DEFAULT_GRID and s.shape == (40,) and s.dtype == torch.float32
    act_absmax, w_absmax = x.abs().amax(0), w.abs().amax(0)
    torch.testing.assert_close(s, smooth_scales(act_absmax, w_absmax, alpha), rtol=0, atol=0)
    errs = {a: _mse(x, [w], [b], smooth_scales(act_absmax, w_absmax, a), gran) for a in DEFAULT_GRID}
    assert errs[alpha] == min(errs.values())
    no_smoothing = _mse(x, [w], [b], torch.ones(40), gran)
    assert errs[alpha] < errs[0.0]
    assert errs[alpha] < no_smoothing
    if gran == "per_tensor":  # a 60x outlier channel crushes a per-tensor scale: smoothing must help a lot
        assert errs[alpha] < 0.5 * no_smoothing


def test_osl_shared_input_several_linears():
    x = _correlated_x(64, 32, seed=5, outlier=0)
    g = _gen(6)
    ws = [torch.randn(n, 32, generator=g) for n in (32, 16, 16)]  # q, k, v with GQA
    bs = [torch.randn(32, generator=g), None, torch.randn(16, generator=g)]
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    alpha, s = search_alpha(x, ws, bs, grid=grid)
    w_absmax = weight_absmax_per_in_channel(ws)
    errs = {a: _mse(x, ws, bs, smooth_scales(x.abs().amax(0), w_absmax, a), "per_tensor") for a in grid}
    assert errs[alpha] == min(errs.values())
    # the summed error is not just the first linear's: a different weight set changes the result
    assert min(errs.values()) < _mse(x, ws, bs, torch.ones(32), "per_tensor")
    # a calibration-wide act_absmax replaces x's own
    wide = x.abs().amax(0) * torch.linspace(1, 3, 32)
    alpha2, s2 = search_alpha(x, ws, bs, grid=grid, act_absmax=wide)
    assert torch.equal(s2, smooth_scales(wide, w_absmax, alpha2))


def test_osl_static_scale_comes_from_the_whole_calibration_set():
    """With a subsample, the per-tensor scale the search simulates is the one calibration will store:
    max_j(act_absmax_j / s_j) / 127, not the subsample's own max."""
    x = _correlated_x(32, 16, seed=8)
    w = torch.randn(8, 16, generator=_gen(9))
    s = torch.rand(16, generator=_gen(10)) + 0.5
    wide = x.abs().amax(0) * torch.linspace(1, 4, 16)
    got = quantized_output(x, w, None, s, "per_tensor", act_absmax=wide)[0]
    x_scale = reference.absmax_scale((wide / s).amax()).reshape(1)
    w_q, w_scale = reference.quantize_weight(scale_linear_weight(w, s))
    want = reference.quantize_per_tensor(x, x_scale, s).float() @ w_q.float().T * x_scale * w_scale
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, quantized_output(x, w, None, s, "per_tensor")[0])
    with pytest.raises(ValueError, match="act_absmax"):
        quantized_output(x, w, None, s, "per_tensor", act_absmax=wide[:-1])


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(0, 8)), "no tokens"),
    (dict(x=torch.full((2, 8), float("nan"))), "NaN"),
    (dict(weight=torch.randn(4, 9)), "K="),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(grid=(0.5, 1.5)), "grid"),
    (dict(grid=()), "empty"),
    (dict(act_granularity="per_channel"), "act_granularity"),
    (dict(weight=[torch.randn(4, 8), torch.randn(4, 8)], bias=[None]), "2 weights"),
    (dict(act_absmax=torch.ones(7)), "act_absmax"),
])
def test_osl_rejects(bad, match):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(4, 8), bias=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        search_alpha(**args)


# ---------------------------------------------------------------- GPTQ

def _naive_gptq(w, H, group_size, damp, act_order):
    """Unblocked GPTQ/OBQ in float64: full inverse Hessian, downdated after each column."""
    n, k = w.shape
    W, H = w.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    if group_size and act_order:
        scale = reference.quantize_weight(w.float(), group_size)[1]
    elif group_size:
        scale = torch.ones(n, k // group_size)
    else:
        scale = reference.absmax_scale(w.float().abs().amax(1))
    W, Hinv = W[:, perm], torch.linalg.inv(H[perm][:, perm])
    Q = torch.zeros(n, k, dtype=torch.int8)
    for j in range(k):
        if group_size and not act_order and j % group_size == 0:
            scale[:, j // group_size] = reference.absmax_scale(W[:, j:j + group_size].abs().amax(1).float())
        s = (scale if not group_size else scale[:, int(perm[j]) // group_size]).double()
        q = reference.round_clamp_int8(W[:, j] / s)
        Q[:, j] = q
        err = (W[:, j] - q.double() * s) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q[:, torch.argsort(perm)], scale


def _hessian(x):
    return accumulate_hessian(None, x, 0)[0]


def _out_err(x, w, w_q, w_scale, g):
    return torch.linalg.norm(x @ w.T - x @ reference.dequantize_weight(w_q, w_scale, g).T).item()


@pytest.mark.parametrize("group_size", [0, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_diagonal_hessian_is_rtn(group_size, act_order):
    g = _gen(7)
    w = torch.randn(19, 40, generator=g)
    # diagonal H: the inverse is diagonal, so no column's error reaches another one -> RTN exactly
    for H in (3.0 * torch.eye(40), torch.diag(torch.rand(40, generator=g) + 0.1)):
        q, s = gptq_quantize(w, H, group_size=group_size, block_size=7, act_order=act_order)
        q_ref, s_ref = reference.quantize_weight(w, group_size)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(q, q_ref)
        assert torch.equal(s, s_ref)


@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_unblocked_reference(group_size, act_order):
    """Lazy block updates (block 12 does not align with group 16) give the unblocked algorithm's result."""
    x = _correlated_x(256, 48, seed=8)
    w = torch.randn(21, 48, generator=_gen(9))
    H = _hessian(x)
    q, s = gptq_quantize(w, H, group_size=group_size, block_size=12, act_order=act_order)
    q_ref, s_ref = _naive_gptq(w, H, group_size, 0.01, act_order)
    # float32 vs float64 may flip a rare rounding tie; the rest must agree
    assert (q != q_ref).float().mean().item() < 0.01
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=0)
    # and the blocking itself must not matter
    q_one, s_one = gptq_quantize(w, H, group_size=group_size, block_size=48, act_order=act_order)
    assert (q != q_one).float().mean().item() < 0.01


@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_data(group_size, act_order):
    x = _correlated_x(512, 64, seed=10, outlier=5)
    w = torch.randn(33, 64, generator=_gen(11))
    q, s = gptq_quantize(w, _hessian(x), group_size=group_size, block_size=16, act_order=act_order)
    q_rtn, s_rtn = reference.quantize_weight(w, group_size)
    err, err_rtn = _out_err(x, w, q, s, group_size), _out_err(x, w, q_rtn, s_rtn, group_size)
    assert err < 0.9 * err_rtn, (err, err_rtn)


def test_gptq_dead_columns_and_singular_hessian():
    x = _correlated_x(128, 24, seed=12)
    x[:, [3, 17]] = 0.0  # channels that never fire
    x[:, 5] = x[:, 4]  # and an exact duplicate: H is singular
    w = torch.randn(10, 24, generator=_gen(13))
    q, s = gptq_quantize(w, _hessian(x), block_size=8)
    assert torch.equal(q[:, [3, 17]], torch.zeros(10, 2, dtype=torch.int8))
    assert torch.isfinite(s).all() and q.abs().max() <= 127
    # a rank-1 Hessian with non-zero diagonal: Cholesky hits an exact zero pivot without damping
    ones = torch.ones(6, 6)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(torch.randn(3, 6), ones, damp=0.0)
    q1, _ = gptq_quantize(torch.randn(3, 6), ones, damp=0.01)
    assert q1.shape == (3, 6)


def test_gptq_zero_weights_and_empty():
    q, s = gptq_quantize(torch.zeros(4, 8), torch.eye(8))
    assert torch.equal(q, torch.zeros(4, 8, dtype=torch.int8)) and torch.equal(s, torch.ones(4))
    q, s = gptq_quantize(torch.zeros(0, 8), torch.eye(8), group_size=4)
    assert q.shape == (0, 8) and s.shape == (0, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=5), "group_size"),
    (dict(group_size=-1), "group_size"),
    (dict(block_size=0), "block_size"),
    (dict(damp=-0.1), "damp"),
    (dict(H=torch.eye(7)), "H must be"),
    (dict(H=torch.full((8, 8), float("nan"))), "NaN"),
    (dict(H=-torch.eye(8)), "negative"),
    (dict(w=torch.full((4, 8), float("inf"))), "w contains"),
    (dict(w=torch.ones(4, 8, dtype=torch.int8)), "float"),
])
def test_gptq_rejects(kwargs, match):
    args = dict(w=torch.randn(4, 8), H=torch.eye(8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gptq_quantize(**args)


def test_accumulate_hessian_running_average():
    x = torch.randn(2, 50, 12, generator=_gen(14), dtype=torch.float64)  # [batch, seq, K]
    H, n = None, 0
    for part in (x[0, :7], x[0, 7:], x[1:], x[:0]):
        H, n = accumulate_hessian(H, part, n, dtype=torch.float64)
    flat = x.reshape(-1, 12)
    assert n == 100
    torch.testing.assert_close(H, 2.0 / 100 * flat.T @ flat)
    H32, _ = accumulate_hessian(None, x.float(), 0)
    assert H32.dtype == torch.float32
    with pytest.raises(ValueError, match="n_seen"):
        accumulate_hessian(None, x, 5)
    with pytest.raises(ValueError, match="H must be"):
        accumulate_hessian(torch.zeros(3, 3), x, 1)
    assert math.isclose(H.trace().item(), 2.0 * flat.pow(2).mean(0).sum().item(), rel_tol=1e-9)
