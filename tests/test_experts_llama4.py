"""Llama-4's fused experts (Llama4TextExperts): every expert runs on every token, the router's weight
multiplied into its input first, so a token not routed to an expert reaches it as a row of zeros.
ptqrt quantizes them as the other fused experts (a QuantExperts child), runs only the routed rows, and
calibrates each expert on the rows routed to it."""
import copy
import io
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ptqrt import PTQConfig, from_pretrained, load_quantized, quantize, save_quantized  # noqa: E402
from ptqrt.integrations import hf_experts  # noqa: E402
from ptqrt.modules.experts import QuantExperts, dense  # noqa: E402
from ptqrt.reference import dequantize_weight  # noqa: E402

VOCAB = 97
STATIC = dict(act_dtype="int8", act_granularity="per_tensor")


def _model(experts=4, top_k=1, seed=0):
    cfg = transformers.Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        num_local_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    for mod in model.modules():  # the zeros __init__ leaves in gate_up_proj: give it values
        if dense(mod):
            mod.gate_up_proj.data = 0.2 * torch.randn(mod.gate_up_proj.shape, generator=g)
    return model


def _experts(model, layer=0):
    return model.model.layers[layer].feed_forward.experts


def _calib(n=4):
    return [torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _ids(seed=1):
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _routed_input(mod, t=13, seed=0):
    """What Llama4TextMoe hands its experts: each token's row scaled by its router weight per expert,
    zero for the experts it is not routed to; one token routed to none."""
    g = torch.Generator().manual_seed(seed)
    e, k = mod.num_experts, mod.hidden_size
    x = torch.randn(t, k, generator=g)
    scores = torch.zeros(e, t)
    for i in range(t - 1):
        chosen = torch.randperm(e, generator=g)[:2]
        scores[chosen, i] = torch.rand(2, generator=g) + 0.1
    return (x.repeat(e, 1) * scores.reshape(-1, 1)), scores


@pytest.mark.parametrize("group", [0, 16])
def test_int8_forward_equals_the_modules_own_forward_on_dequantized_weights(group):
    """W8A16: the int8 forward of the routed rows equals the module's own dense forward (every expert on
    every row) run on the dequantized weights; the rows of zeros give zeros."""
    mod = copy.deepcopy(_experts(_model()))
    x, scores = _routed_input(mod)
    q = QuantExperts.from_float(mod, "W8A16", group)
    ref = copy.deepcopy(mod)
    for p in ("gate_up_proj", "down_proj"):
        w = dequantize_weight(getattr(q, p).reshape(-1, getattr(q, p).shape[-1]), getattr(q, f"{p}_scale").reshape(
            -1, getattr(q, f"{p}_scale").shape[-1]) if group else getattr(q, f"{p}_scale").reshape(-1), group)
        getattr(ref, p).data = w.reshape(getattr(q, p).shape).transpose(1, 2).contiguous()
    hf_experts.attach(mod, q)
    assert "gate_up_proj" not in dict(mod.named_parameters())
    out = mod(x)
    want = ref(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    unrouted = (scores == 0).reshape(-1)
    assert unrouted.any() and torch.equal(out[unrouted], torch.zeros_like(out[unrouted]))


def test_attach_then_detach_gives_the_module_back():
    mod = copy.deepcopy(_experts(_model()))
    x, _ = _routed_input(mod)
    want = mod(x)
    old = hf_experts.attach(mod, QuantExperts.from_float(mod, "W8A16"))
    assert "forward" in vars(mod) and not torch.equal(mod(x), want)
    hf_experts.detach(mod, old)
    assert "forward" not in vars(mod) and hf_experts.CHILD not in dict(mod.named_children())
    assert torch.equal(mod(x), want)

    def wrapped(x):  # a forward of the instance's own (as accelerate's hooks set) comes back too
        return 2 * type(mod).forward(mod, x)

    mod.forward = wrapped
    old = hf_experts.attach(mod, QuantExperts.from_float(mod, "W8A16"))
    hf_experts.detach(mod, old)
    assert mod.forward is wrapped and torch.equal(mod(x), 2 * want)


def test_a_hook_that_wraps_the_forward_keeps_running():
    """accelerate's hooks (offloading, device alignment) replace the module's forward by a wrapper that calls
    `_old_forward`: the int8 forward goes there, the wrapper stays, and detach gives the old one back."""
    import functools

    mod = copy.deepcopy(_experts(_model()))
    x, _ = _routed_input(mod)
    want = mod(x)
    calls = []

    class Hook:
        def pre_forward(self, module, *args, **kwargs):
            calls.append("pre")
            return args, kwargs

    def new_forward(module, *args, **kwargs):
        args, kwargs = module._hf_hook.pre_forward(module, *args, **kwargs)
        return module._old_forward(*args, **kwargs)

    original = mod.forward
    mod._old_forward, mod._hf_hook = original, Hook()
    mod.forward = functools.partial(new_forward, mod)
    q = QuantExperts.from_float(mod, "W8A16")
    old = hf_experts.attach(mod, q)
    got = mod(x)
    assert calls == ["pre"] and not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    hf_experts.detach(mod, old)
    assert mod._old_forward == original and torch.equal(mod(x), want) and calls == ["pre", "pre"]


@pytest.mark.parametrize("config, tol", [
    (PTQConfig(), 0.04), (PTQConfig(act_dtype="int8"), 0.06), (PTQConfig(**STATIC, outliers="smooth"), 0.15),
    (PTQConfig(precision_recovery="gptq"), 0.04), (PTQConfig(**STATIC, act_observer="percentile"), 0.15)])
def test_every_expert_is_quantized_and_the_model_stays_close(config, tol):
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(copy.deepcopy(model), config, _calib(), quiet=True)
    assert not [w for w in caught if "float tensors outside linears" in str(w.message)]
    for layer in range(2):
        ex = _experts(q, layer)
        assert isinstance(ex.ptqrt_experts, QuantExperts) and ex.ptqrt_experts.mode == config.mode
        assert not list(ex.parameters(recurse=False))
    ids = _ids()
    want, got = model(ids).logits, q(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < tol, rel
    assert torch.equal(q.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[:, :9], ids)


def test_each_expert_is_calibrated_on_the_rows_routed_to_it(monkeypatch):
    """Static W8A8: expert e records exactly the nonzero rows the model hands it (the router's weight
    multiplied in) over every calibration sample, and its input scale is their absmax: not the zero rows
    of the tokens routed elsewhere, and not a padded position's (the pad token's embedding is made large).
    (The first layer's: the later ones see the quantized layers before them.)"""
    import ptqrt.layerwise_experts as lwe

    model = _model(top_k=2)
    model.model.embed_tokens.weight.data[0] *= 100  # the pad token; the calibration ids are 1 ..
    seen = {}

    def record(mod, args):
        x = args[0].reshape(mod.num_experts, -1, args[0].shape[-1])
        for e in range(mod.num_experts):
            seen.setdefault(e, []).append(x[e][(x[e] != 0).any(-1)])

    handle = _experts(model).register_forward_pre_hook(record)
    calib = _calib(3)
    for ids in calib:
        model(ids)
    handle.remove()
    padded = calib + [{"input_ids": torch.cat([calib[0], torch.zeros(2, 4, dtype=torch.long)], 1),
                       "attention_mask": torch.cat([torch.ones(2, 12), torch.zeros(2, 4)], 1).long()}]
    recorded = {}
    original = lwe._record

    def spy(st, key, x2, cfg):
        if key[0] == "model.layers.0.feed_forward.experts" and key[1] == "gate_up_proj":
            recorded.setdefault(key[2], []).append(x2.clone())
        return original(st, key, x2, cfg)

    monkeypatch.setattr(lwe, "_record", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(copy.deepcopy(model), PTQConfig(**STATIC), padded, quiet=True)
    qe = _experts(q).ptqrt_experts
    for e in range(4):
        rows = torch.cat(seen[e])
        assert rows.shape[0]
        want = torch.cat([rows, torch.cat(seen[e][:1])])  # the padded sample: calib[0]'s rows once more
        torch.testing.assert_close(torch.cat(recorded[e]), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(qe.gate_up_proj_input_scale[e], rows.abs().max() / 127, rtol=1e-6, atol=0)


def test_saved_loaded_pickled_and_copied_models_are_the_same(tmp_path):
    q = quantize(_model(), PTQConfig(**STATIC, outliers="smooth"), _calib(), quiet=True)
    ids = _ids()
    want = q(ids).logits
    save_quantized(q, tmp_path / "packed")
    assert torch.equal(from_pretrained(tmp_path / "packed")(ids).logits, want)
    assert torch.equal(load_quantized(_model(seed=5), tmp_path / "packed")(ids).logits, want)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(ids).logits, want)
    c = copy.deepcopy(q)
    assert _experts(c).forward.args[0] is _experts(c)  # the copy runs its own QuantExperts
    assert torch.equal(c(ids).logits, want)
