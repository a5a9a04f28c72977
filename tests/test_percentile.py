"""act_observer="percentile": static W8A8 scales from a quantile of |x / s| over the kept calibration
rows instead of the max, for linears, per expert, and inside OSL's search."""
import copy
import math

import pytest
import torch

from ptqrt import PTQConfig, QuantLinear, load_quantized, quantize, save_quantized
from ptqrt.algorithms import osl
from ptqrt.observers import percentile_absmax
from ptqrt.reference import absmax_scale
from tests.models import calib, tiny_net

STATIC = dict(act_dtype="int8", act_granularity="per_tensor")


def _sorted_pick(x, q):
    v = torch.nan_to_num(x.float().abs().flatten(), nan=0.0, posinf=0.0).sort().values
    return v[max(1, math.ceil(q * v.numel() - 1e-9)) - 1]


def test_percentile_absmax_is_the_ranked_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 29, generator=g)
    for q in (0.5, 0.9, 0.99, 0.999, 0.9999, 1.0):
        assert torch.equal(percentile_absmax(x, q), _sorted_pick(x, q)), q
    assert torch.equal(percentile_absmax(x, 1.0), x.abs().max())
    assert percentile_absmax(x, 0.99) < x.abs().max()
    y = x.clone()
    y[0, 0], y[1, 1] = float("nan"), float("inf")
    assert torch.equal(percentile_absmax(y, 1.0), y.nan_to_num(0.0, 0.0).abs().max())
    assert percentile_absmax(torch.tensor([3.0, -4.0]).to(torch.bfloat16), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        percentile_absmax(torch.empty(0, 4), 0.5)


@pytest.mark.parametrize("kw, match", [
    (dict(act_dtype="int8", act_observer="percentile"), r"act_observer='percentile'.*per_tensor"),
    (dict(act_observer="percentile"), r"act_observer='percentile'.*per_tensor"),
    (dict(**STATIC, act_percentile=0.99), r"act_percentile=0.99 is used only with act_observer='percentile'"),
    (dict(**STATIC, act_observer="percentile", act_percentile=0.0), r"act_percentile=0.0 must be a float in \(0, 1\]"),
    (dict(**STATIC, act_observer="percentile", act_percentile=1.5), r"must be a float in \(0, 1\]"),
    (dict(**STATIC, act_observer="percentile", act_percentile=True), r"must be a float in \(0, 1\]"),
    (dict(**STATIC, act_observer="mse"), r"act_observer='mse' is not allowed"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        PTQConfig(**kw)


def test_config_round_trips_and_a_policy_may_set_it():
    cfg = PTQConfig(**STATIC, layer_policies={"blocks.1.": PTQConfig(**STATIC, act_observer="percentile",
                                                                       act_percentile=0.999)})
    assert PTQConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.for_layer("blocks.1.fc1").act_percentile == 0.999 and cfg.for_layer("blocks.0.fc1").act_observer == "minmax"


def _first_block_inputs(model, samples):
    """{linear: its input rows} of blocks.0 in a float run (the first block sees float inputs in calibration)."""
    rows = {"fc1": [], "fc2": []}
    hooks = [getattr(model.blocks[0], n).register_forward_pre_hook(lambda m, a, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in rows]
    with torch.no_grad():
        for s in samples:
            model(s)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


@pytest.mark.parametrize("q", [0.99, 0.999])
def test_static_scale_is_the_quantile_of_the_layers_own_inputs(q):
    model, data = tiny_net(), calib()
    want = _first_block_inputs(model, data)
    pq = quantize(copy.deepcopy(model), PTQConfig(**STATIC, act_observer="percentile", act_percentile=q), data,
                  quiet=True)
    mq = quantize(copy.deepcopy(model), PTQConfig(**STATIC), data, quiet=True)
    for n, x in want.items():
        got = getattr(pq.blocks[0], n).input_scale
        torch.testing.assert_close(got, absmax_scale(_sorted_pick(x, q).reshape(1)), rtol=0, atol=0)
        assert got < getattr(mq.blocks[0], n).input_scale  # clipped below the max
    assert all(isinstance(getattr(b, n), QuantLinear) for b in pq.blocks for n in ("fc1", "fc2"))


def test_quantile_one_is_minmax():
    """q = 1 keeps the max: the model equals the minmax one bit for bit (all 72 tokens are kept)."""
    model, data = tiny_net(), calib()
    for extra in ({}, dict(outliers="smooth"), dict(outliers="osl")):
        a = quantize(copy.deepcopy(model), PTQConfig(**STATIC, **extra), data, quiet=True).state_dict()
        b = quantize(copy.deepcopy(model), PTQConfig(**STATIC, **extra, act_observer="percentile", act_percentile=1.0),
                     data, quiet=True).state_dict()
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (extra, k)


def test_osl_search_scores_with_the_quantile():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    x[3, 5] = 40.0  # one outlier
    w = torch.randn(16, 32, generator=g)
    s = torch.rand(32, generator=g) + 0.5
    got = osl.quantized_output(x, w, None, s, "per_tensor", act_percentile=0.99)[0]
    from ptqrt import reference
    xs = absmax_scale(_sorted_pick(x / s, 0.99).reshape(1))
    w_q, w_s = reference.quantize_weight(w * s)
    want = reference.w8a8_epilogue(reference.quantize_per_tensor(x, xs, s).float() @ w_q.float().T, xs, w_s, None,
                                   torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, osl.quantized_output(x, w, None, s, "per_tensor")[0])
    a_pct = osl.search_alpha(x, w, act_percentile=0.99)[0]
    a_max = osl.search_alpha(x, w)[0]
    assert 0.0 <= a_pct <= 1.0 and 0.0 <= a_max <= 1.0


def test_saved_and_loaded(tmp_path):
    model, data = tiny_net(), calib()
    cfg = PTQConfig(**STATIC, outliers="smooth", act_observer="percentile", act_percentile=0.995)
    q = quantize(copy.deepcopy(model), cfg, data, quiet=True)
    save_quantized(q, tmp_path)
    r = load_quantized(tiny_net(), tmp_path)
    assert r.ptqrt_config == cfg
    assert torch.equal(r(data[0]), q(data[0]))


def test_osl_searches_with_the_configured_quantile(monkeypatch):
    seen = []
    search = osl.search_alpha

    def spy(*a, **k):
        seen.append(k.get("act_percentile"))
        return search(*a, **k)

    monkeypatch.setattr(osl, "search_alpha", spy)
    model, data = tiny_net(), calib()
    quantize(copy.deepcopy(model), PTQConfig(**STATIC, outliers="osl", act_observer="percentile", act_percentile=0.998),
             data, quiet=True)
    assert seen and set(seen) == {0.998}
    seen.clear()
    quantize(copy.deepcopy(model), PTQConfig(**STATIC, outliers="osl"), data, quiet=True)
    assert seen and set(seen) == {None}


def test_quantile_one_is_the_max_over_every_token():
    """More calibration tokens than are kept (2048), the largest in a row a sample would likely miss: q = 1
    still takes it, as minmax does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    data = [torch.randn(1024, 16, generator=torch.Generator().manual_seed(i)) for i in range(10)]  # 10240 tokens
    a = quantize(copy.deepcopy(model), PTQConfig(**STATIC), data, quiet=True)
    b = quantize(copy.deepcopy(model), PTQConfig(**STATIC, act_observer="percentile", act_percentile=1.0), data,
                 quiet=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_a_sparse_input_whose_quantile_is_zero_takes_its_max():
    """A linear behind a ReLU that is zero on most elements: the quantile is 0, so the scale is the max
    (scale 1, a range of +-127, would round every value to 0)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-1.5)  # ~0.5% of the hidden values are positive
    data = [torch.randn(32, 16) for _ in range(4)]
    hidden = torch.cat([model[1](model[0](x)) for x in data]).detach()
    assert 0 < (hidden > 0).float().mean() < 0.01
    q = quantize(copy.deepcopy(model), PTQConfig(**STATIC, act_observer="percentile", act_percentile=0.99), data,
                 quiet=True)
    torch.testing.assert_close(q[2].input_scale, absmax_scale(hidden.abs().amax().reshape(1)), rtol=0, atol=0)
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(64, 32)
    x[0, :3] = torch.rand(3, generator=g) + 0.5
    w = torch.randn(8, 32, generator=g)
    s = torch.ones(32)
    out = osl.quantized_output(x, w, None, s, "per_tensor", act_percentile=0.99)[0]
    torch.testing.assert_close(out, osl.quantized_output(x, w, None, s, "per_tensor")[0])


def test_linears_sharing_an_input_with_different_osl_quantiles_are_warned_about():
    from ptqrt.integrations import hf  # noqa: F401  (transformers present)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    osl_cfg = dict(**STATIC, outliers="osl")
    config = PTQConfig(**osl_cfg, layer_policies={"k_proj": PTQConfig(**osl_cfg, act_observer="percentile")})
    with pytest.warns(RuntimeWarning, match=r"k_proj.*the percentile OSL scores with"):
        quantize(model, config, [torch.randint(0, 64, (2, 8))], quiet=True)
