"""Layer-by-layer calibration, smoothing (folded or fused), OSL and GPTQ through quantize()."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ptqrt import PTQConfig, QuantLinear, load_quantized, quantize, save_quantized
from ptqrt.layerwise import decoder_layers


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class PreNormLayer(nn.Module):
    """Llama-shaped: norm -> (q, k, v) ; norm -> (gate, up) -> down. Residuals read the pre-norm x."""

    def __init__(self, d=64, h=96):
        super().__init__()
        self.in_norm, self.post_norm = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, scale=1.0):
        hx = self.in_norm(x)
        att = torch.softmax(self.q(hx) @ self.k(hx).transpose(-1, -2) * scale / 8, -1) @ self.v(hx)
        x = x + self.o(att)
        hx = self.post_norm(x)
        return (x + self.down(torch.nn.functional.silu(self.gate(hx)) * self.up(hx)),)


class PostNormLayer(nn.Module):
    """BERT-shaped: the norm's output feeds fc1 *and* the residual, so 1/s must not be folded."""

    def __init__(self, d=64, h=96):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, h), nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Stack(nn.Module):
    def __init__(self, layer, n=3, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, d)
        self.layers = nn.ModuleList([layer() for _ in range(n)])

    def forward(self, x, scale=1.0):
        h = self.inp(x)
        with torch.no_grad():
            h[..., 3] *= 20  # an outlier channel, as LLM activations have
        for layer in self.layers:
            out = layer(h, scale=scale) if isinstance(layer, PreNormLayer) else layer(h)
            h = out[0] if isinstance(out, tuple) else out
        return h


def _calib(n=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 12, 16, generator=g) for _ in range(n)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


STATIC = dict(act_dtype="int8", act_granularity="per_tensor")


def test_decoder_layers_found():
    m = Stack(PreNormLayer)
    name, layers = decoder_layers(m, {"layers.0.q": None})
    assert name == "layers" and len(layers) == 3


def test_smoothing_folds_into_prenorm_and_keeps_the_function():
    model = Stack(PreNormLayer).eval()
    x = _calib()[0]
    ref = model(x)
    q = quantize(copy.deepcopy(model), PTQConfig(outliers="smooth", **STATIC), _calib(), quiet=True)
    layer = q.layers[0]
    for name in ("q", "k", "v", "gate", "up"):  # read a norm's output only: folded
        assert getattr(layer, name).smooth_scale is None, name
    assert not torch.equal(layer.in_norm.weight, model.layers[0].in_norm.weight)
    for name in ("o", "down"):  # no norm in front: fused into the activation quantization
        assert getattr(layer, name).smooth_scale is not None, name
    assert q.inp.smooth_scale is not None  # outside the stack, done with the whole model
    assert _rel(q(x), ref) < 0.05


def test_smoothing_is_exact_before_rounding():
    """Folding 1/s into the norm and s into the weights leaves the float function unchanged: with
    rounding removed (an identity quantizer), the smoothed model equals the float one."""
    from ptqrt import layerwise
    from ptqrt.quantize import set_submodule
    model = Stack(PreNormLayer).eval()
    x = _calib()[0]
    ref = model(x)
    smoothed = copy.deepcopy(model)
    targets = {n: (m, PTQConfig(outliers="smooth", **STATIC)) for n, m in smoothed.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("layers.0.")}
    calls = [((smoothed.inp(c),), {}) for c in _calib()]
    st = layerwise._observe(smoothed.layers[0], "layers.0", {n: c for n, (m, c) in targets.items()}, calls, "cpu", True)
    for group in layerwise._groups(st, {n: t[1] for n, t in targets.items()}):
        mods = [targets[n][0] for n in group]
        from ptqrt.algorithms import smoothquant
        s = smoothquant.smooth_scales(st.absmax[group[0]], smoothquant.weight_absmax_per_in_channel(
            [m.weight.detach() for m in mods]), 0.5)
        norm = st.producer.get(st.input_key[group[0]])
        if norm is None:
            continue
        norm.weight.data = smoothquant.fold_into_norm(norm.weight.data, None, s)[0]
        for n, m in zip(group, mods):
            set_submodule(smoothed, n, layerwise._smoothed_copy(m, s))
    torch.testing.assert_close(smoothed(x), ref, atol=1e-4, rtol=1e-4)


def test_postnorm_residual_blocks_folding():
    model = Stack(PostNormLayer).eval()
    q = quantize(copy.deepcopy(model), PTQConfig(outliers="smooth", **STATIC), _calib(), quiet=True)
    assert all(layer.fc1.smooth_scale is not None for layer in q.layers[1:])
    torch.testing.assert_close(q.layers[0].norm.weight, model.layers[0].norm.weight)  # untouched
    assert _rel(q(_calib()[0]), model(_calib()[0])) < 0.05


def test_osl_beats_naive_static_on_outliers():
    model = Stack(PreNormLayer).eval()
    x = torch.cat(_calib())
    ref = model(x)
    naive = quantize(copy.deepcopy(model), PTQConfig(**STATIC), _calib(), quiet=True)
    osl = quantize(copy.deepcopy(model), PTQConfig(outliers="osl", **STATIC), _calib(), quiet=True)
    assert _rel(osl(x), ref) < _rel(naive(x), ref)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", [dict(), dict(weight_granularity="per_group", group_size=16)])
def test_gptq_no_worse_than_rtn(granularity, act_order):
    model = Stack(PreNormLayer).eval()
    x = torch.cat(_calib())
    ref = model(x)
    rtn = quantize(copy.deepcopy(model), PTQConfig(**granularity), quiet=True)
    g = quantize(copy.deepcopy(model), PTQConfig(precision_recovery="gptq", gptq_act_order=act_order, **granularity),
                 _calib(), quiet=True)
    assert _rel(g(x), ref) <= _rel(rtn(x), ref) * 1.02
    assert not torch.equal(g.layers[1].down.weight, rtn.layers[1].down.weight)


def test_kwargs_reach_every_layer_and_smoothed_model_round_trips(tmp_path):
    model = Stack(PreNormLayer).eval()
    calib = [{"x": c, "scale": 0.5} for c in _calib()]
    q = quantize(copy.deepcopy(model), PTQConfig(outliers="smooth", precision_recovery="gptq", **STATIC), calib, quiet=True)
    save_quantized(q, tmp_path)
    desc = json.loads((tmp_path / "quantization_description.json").read_text())
    assert desc["modules"]["layers.0.o"]["has_smooth"] is True
    loaded = load_quantized(Stack(PreNormLayer), tmp_path)
    x = _calib()[1]
    assert torch.equal(loaded(x, 0.5), q(x, 0.5))


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from torch import nn
    from ptqrt import PTQConfig, quantize
    torch.set_num_threads(1)
    D, n_layers = 512, int(sys.argv[1])
    class L(nn.Module):
        def __init__(s):
            super().__init__(); s.a = nn.Linear(D, D); s.b = nn.Linear(D, D)
        def forward(s, x): return x + s.b(torch.relu(s.a(x)))
    class M(nn.Module):
        def __init__(s, n):
            super().__init__(); s.layers = nn.ModuleList([L() for _ in range(n)])
        def forward(s, x):
            for l in s.layers: x = l(x)
            return x
    cfg = PTQConfig(act_dtype="int8", act_granularity="per_tensor", precision_recovery="gptq")
    calib = [torch.randn(64, D) for _ in range(2)]
    warm = quantize(M(2).eval(), cfg, calib, quiet=True)  # the first use of the ops imports and
    with torch.no_grad():                                 # allocates their machinery once
        warm(calib[0])
    del warm
    m = M(n_layers).eval()
    # The peak from here on: Linux resets a process's peak RSS (VmHWM) when 5 is written to clear_refs;
    # without that, the lifetime peak, which the warm-up above may have set, would hide a smaller one.
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = status("VmRSS"), lambda: status("VmHWM")
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        before = peak()
    quantize(m, cfg, calib, quiet=True)
    print(json.dumps({"growth": peak() - before, "layer": 2 * D * D * 4}))
""")


def _peak_growth(n_layers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n_layers)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PTQRT_BACKEND": "reference",
                                           # a fixed mmap threshold returns freed temporaries to the OS, so
                                           # RSS shows what is held, not what the heap kept for reuse
                                           "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_grows_by_about_one_layer():
    """Static W8A8 + GPTQ calibration of 12 vs 24 float32 layers, each in a fresh process. Layer by
    layer, the peak grows by the int8 copy of each extra layer (a quarter of its size), not by whole
    layers; the fixed part is a few layers' worth of temporaries (GPTQ's K x K matrices)."""
    small, big = _peak_growth(12), _peak_growth(24)
    layer = big["layer"]
    assert big["growth"] - small["growth"] < 12 * layer / 4 + 2 * layer, (small, big)
    assert big["growth"] < 24 * layer / 4 + 8 * layer, big


@pytest.mark.gpu
def test_only_one_layer_on_the_device(monkeypatch):
    """device="cuda" on a CPU model: the GPU peak does not grow with the number of layers (one layer
    and its calibration activations at a time), and the model stays on the CPU."""
    # What runs once per process is not the model's: Triton's autotuner allocates a 256 MB buffer to
    # flush L2 while it times configs (the fixed configs run here instead), and cuBLAS / cuSOLVER
    # allocate their workspaces (a two-layer warm-up: the quantized forward of a layer feeds the next).
    monkeypatch.setenv("PTQRT_TRITON_AUTOTUNE", "0")
    cfg = PTQConfig(precision_recovery="gptq", **STATIC)
    quantize(Stack(PreNormLayer, n=2).eval(), cfg, _calib(), quiet=True, device="cuda")

    def peak(n_layers):
        model = Stack(PreNormLayer, n=n_layers).eval()  # on the CPU
        floats = [m for m in model.modules() if isinstance(m, nn.Linear)]  # replaced by QuantLinears
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        quantize(model, cfg, _calib(), quiet=True, device="cuda")
        assert all(b.device.type == "cpu" for b in model.buffers())
        assert all(p.device.type == "cpu" for p in model.parameters())
        # The float modules went to the GPU with their layer: they come back (held there, they grew
        # the peak by ~140 KB a layer until quantize returned).
        assert all(p.device.type == "cpu" for m in floats for p in m.parameters())
        return torch.cuda.max_memory_allocated() - base, model

    small, _ = peak(2)
    big, model = peak(8)
    layer_bytes = sum(p.numel() * 4 for p in model.layers[0].parameters()) + sum(
        b.numel() * b.element_size() for b in model.layers[0].buffers())
    # Six more layers held on the GPU would add 6 * layer_bytes; one at a time adds nothing.
    assert big - small < 2 * layer_bytes, (small, big, layer_bytes)
    assert big < 8 * layer_bytes + (2 << 20), (big, layer_bytes)


# ---------------------------------------------------------------- fixes: caches, tied weights, errors,
# which norms are folded into, the layer stack, per-layer kwargs, OSL's tokens
from ptqrt import layerwise  # noqa: E402


class _FloatLinear(nn.Module):
    """Stands in for QuantLinear where a test checks smoothing alone: runs the float module it was
    built from (the smoothed copy), dividing its input by smooth_scale when there is one."""

    def __init__(self, mod):
        super().__init__()
        self.mod, self.smooth_scale = mod, None

    @property
    def weight(self):
        return self.mod.weight

    @classmethod
    def from_float(cls, mod, cfg, name="", input_absmax=None, qweight=None):
        return cls(mod)

    def forward(self, x):
        return self.mod(x if self.smooth_scale is None else x / self.smooth_scale.to(x.dtype))


def _smooth_only(model, data, monkeypatch, **cfg):
    """quantize() with SmoothQuant but no rounding: folded or fused, the model must compute what it did."""
    monkeypatch.setattr(layerwise, "QuantLinear", _FloatLinear)
    quantize(model, PTQConfig(act_dtype="int8", outliers="smooth", **cfg), data, quiet=True)
    return model


def _randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if type(m).__name__.endswith(("LayerNorm", "RMSNorm")):
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g)


def _hf(name, **kw):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small, **kw)).eval()
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**small, **kw)).eval()
    if name == "vaultgemma":
        return T.VaultGemmaForCausalLM(T.VaultGemmaConfig(**small, head_dim=8, **kw)).eval()
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0, **kw)).eval()
    if name == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, **kw)).eval()
    raise ValueError(name)


def _ids(batch=2, padded=False):
    ids = torch.randint(0, 100, (batch, 10), generator=torch.Generator().manual_seed(1))
    sample = {"input_ids": ids}
    if padded:
        mask = torch.ones_like(ids)
        mask[-1, :3] = 0
        sample["attention_mask"] = mask
    return sample


def _logits(model, sample):
    with torch.no_grad():
        return model(**sample, use_cache=False).logits


def test_drop_caches_drops_every_cache_whatever_its_name_or_position():
    T = pytest.importorskip("transformers")
    h = torch.randn(1, 3, 8)
    args, kwargs = layerwise._drop_caches((h, T.DynamicCache()), {"cache": T.DynamicCache(), "kv": T.DynamicCache(),
                                                                  "layer_past": (h, h), "use_cache": True, "mask": h})
    assert args[0] is h and args[1] is None
    assert kwargs == {"cache": None, "kv": None, "layer_past": None, "use_cache": False, "mask": h}


@pytest.mark.parametrize("name, kw", [("llama", dict(attn_implementation="eager")), ("llama", {}), ("gpt2", {})])
def test_calibration_runs_layers_without_the_models_kv_cache(name, kw):
    """The model's live cache reached every layer (under `cache`, or positionally in GPT-2): each
    calibration run of a layer appended its keys again, and a padded batch or eager attention crashed."""
    model = _hf(name, **kw)
    seen = []
    attn = "model.layers.1.self_attn" if name == "llama" else "transformer.h.1.attn"
    hook = model.get_submodule(attn).register_forward_pre_hook(
        lambda _m, a, k: seen.append(a + tuple(k.values())), with_kwargs=True)
    q = quantize(model, PTQConfig(**STATIC), [_ids(padded=True)], quiet=True)
    hook.remove()
    caches = layerwise._cache_types()
    assert seen and not any(isinstance(v, caches) for call in seen for v in call)
    assert torch.isfinite(_logits(q, _ids(padded=True))).all()


def test_smoothing_a_tied_lm_head_leaves_the_embedding_alone(monkeypatch):
    """GPT-2's lm_head shares its Parameter with wte: smoothing must scale a copy, not the embedding."""
    model = _hf("gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(torch.rand(32, generator=torch.Generator().manual_seed(2)) * 3)
    wte = model.transformer.wte.weight.detach().clone()
    sample = _ids()
    ref = _logits(model, sample)
    _smooth_only(model, [sample], monkeypatch, skip=[], act_granularity="per_tensor")
    assert torch.equal(model.transformer.wte.weight, wte)
    assert model.transformer.ln_f.weight.dtype == torch.float32 and model.lm_head.smooth_scale is None  # folded
    assert _rel(_logits(model, sample), ref) < 1e-5


class _SkipBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc_a, self.fc_b, self.unused = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc_b(torch.relu(self.fc_a(self.norm(x))))


class _SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_SkipBlock(), _SkipBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _outlier_x():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    x[..., 3] *= 30
    return x


def test_a_static_layer_calibration_never_reached_is_an_error_that_changes_nothing():
    model = _SkipNet().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"never reached \['layers.0.unused'\].*layer_policies"):
        quantize(model, PTQConfig(outliers="smooth", **STATIC), [_outlier_x()], quiet=True)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_dynamic_layer_calibration_never_reached_is_quantized_without_statistics():
    model = _SkipNet().eval()
    x = _outlier_x()
    ref = model(x)
    with pytest.warns(RuntimeWarning, match=r"never reached \['layers.0.unused'\]"):
        q = quantize(model, PTQConfig(act_dtype="int8", outliers="smooth", precision_recovery="gptq"), [x], quiet=True)
    assert isinstance(q.layers[0].unused, QuantLinear) and q.layers[0].unused.smooth_scale is None
    assert _rel(q(x), ref) < 0.05


def test_a_layer_goes_back_home_when_quantizing_it_fails(monkeypatch):
    model = _SkipNet().eval()
    moves = []
    layer = model.layers[0]
    monkeypatch.setattr(layer, "to", lambda *a, **k: moves.append(a) or nn.Module.to(layer, *a, **k))

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(layerwise, "quantize_block", boom)
    with pytest.raises(RuntimeError, match="boom"):
        quantize(model, PTQConfig(**STATIC), [_outlier_x()], quiet=True, device="cpu")
    assert moves[-1] == (torch.device("cpu"),)
    with pytest.raises(ValueError, match="meta"):  # moving a layer there would lose its weights
        quantize(model, PTQConfig(**STATIC), [_outlier_x()], quiet=True, device="meta")
    assert all(p.device.type == "cpu" for p in model.parameters())


class _TwiceBlock(nn.Module):
    """One norm module read twice: in one block (twice=True), or shared between blocks."""

    def __init__(self, d=16, norm=None, twice=False):
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(d)
        self.fc_a, self.fc_b, self.twice = nn.Linear(d, d), nn.Linear(d, d), twice

    def forward(self, x):
        x = x + self.fc_a(self.norm(x))
        return x + self.fc_b(self.norm(x) if self.twice else torch.relu(x))


@pytest.mark.parametrize("shared", [False, True])
def test_a_norm_used_twice_is_not_folded_into(shared, monkeypatch):
    torch.manual_seed(0)
    norm = nn.LayerNorm(16) if shared else None
    model = _Seq2([_TwiceBlock(norm=norm, twice=not shared), _TwiceBlock(norm=norm, twice=not shared)]).eval()
    _randomize_norms(model)
    x = _outlier_x()
    ref = model(x)
    weights = [b.norm.weight.detach().clone() for b in model.layers]
    _smooth_only(model, [x], monkeypatch)
    assert _rel(model(x), ref) < 1e-5
    assert all(torch.equal(b.norm.weight, w) for b, w in zip(model.layers, weights))
    assert model.layers[0].fc_a.smooth_scale is not None


class _Seq2(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.layers = nn.ModuleList(list(seq))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Expert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x)


class _MoELayer(nn.Module):
    def __init__(self, d=16, n=4):
        super().__init__()
        self.norm, self.experts = nn.LayerNorm(d), nn.ModuleList([_Expert(d) for _ in range(n)])

    def forward(self, x):
        h = self.norm(x)
        return x + sum(e(h) for e in self.experts)


def test_the_layer_stack_is_the_outermost_list_of_blocks():
    """An MoE layer's expert list (4) is longer than the stack (2): it was taken for the stack, and
    expert i calibrated on expert i-1's output."""
    torch.manual_seed(0)
    model = _Seq2([_MoELayer(), _MoELayer()]).eval()
    x = torch.randn(2, 8, 16)
    true = {}
    def record(name):
        def hook(_m, args):
            true.setdefault(name, args[0].abs().max().detach())
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model(x)
    for h in hooks:
        h.remove()
    assert decoder_layers(model, dict.fromkeys(true))[0] == "layers"
    q = quantize(model, PTQConfig(**STATIC), [x], quiet=True)
    for n in ("layers.0.experts.1.fc", "layers.0.experts.3.fc"):  # layer 1 reads quantized layer 0
        torch.testing.assert_close(q.get_submodule(n).input_scale * 127, true[n].reshape(1))
    # with a config, the list of config.num_hidden_layers blocks wins over a shallower one
    model.adapters = nn.ModuleList([_Expert(16) for _ in range(3)])
    model.config = type("Cfg", (), {"num_hidden_layers": 2})()
    assert decoder_layers(model, {"adapters.0.fc": 0, "layers.0.experts.0.fc": 0})[0] == "layers"
    del model.config
    assert decoder_layers(model, {"adapters.0.fc": 0, "layers.0.experts.0.fc": 0})[0] == "adapters"


def test_a_vision_language_model_is_walked_by_its_text_decoder():
    """Qwen2-VL whose vision tower has as many blocks as the language model has layers: the stack is
    the language model's (get_decoder()); the vision blocks, which text calibration never runs, are
    named in the error for static W8A8 and calibrate fine once skipped."""
    T = pytest.importorskip("transformers")
    v = 64
    cfg = T.Qwen2VLConfig(text_config=dict(vocab_size=v, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                           rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                          vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                                             patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                          image_token_id=v - 1, video_token_id=v - 2, vision_start_token_id=v - 3,
                          bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = T.Qwen2VLForConditionalGeneration(cfg).eval()
    targets = {n: None for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert decoder_layers(model, targets)[0] == "model.language_model.layers"
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, v - 5, (2, 12), generator=g)} for _ in range(2)]
    with pytest.raises(ValueError, match=r"never reached \['model.visual.blocks.0"):
        quantize(copy.deepcopy(model), PTQConfig(outliers="smooth", **STATIC), calib, quiet=True)
    ids = torch.randint(3, v - 5, (1, 10), generator=g)
    ref = model(input_ids=ids).logits
    q = quantize(model, PTQConfig(outliers="smooth", skip=["lm_head", "visual"], **STATIC), calib, quiet=True)
    assert isinstance(q.model.language_model.layers[1].mlp.down_proj, QuantLinear)
    assert _rel(q(input_ids=ids).logits, ref) < 0.05


def test_each_layer_is_calibrated_with_its_own_attention_mask():
    """Qwen2 with a sliding layer then a full one: layer 1 was calibrated with layer 0's (sliding) mask."""
    from ptqrt.algorithms.smoothquant import smooth_scales

    model = _hf("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1,
                layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    sample = _ids(batch=1)
    o_proj = model.model.layers[1].self_attn.o_proj
    true = []
    hook = o_proj.register_forward_pre_hook(lambda _m, a: true.append(a[0].reshape(-1, 32).abs().amax(0)) and None)
    _logits(model, sample)
    hook.remove()
    calls = layerwise.capture_layer_calls(model, "model.layers", model.model.layers, [sample], quiet=True)
    masks = [c[0][1]["attention_mask"] for c in calls]
    assert not torch.equal(masks[0], masks[1])  # each layer's own
    # Layer 0 stays float, so layer 1 is calibrated on the float model's activations: its o_proj's
    # smoothing (no norm in front: kept as smooth_scale) comes from the per-channel input maxima.
    q = quantize(model, PTQConfig(act_dtype="int8", outliers="smooth", skip=["lm_head", "layers.0."]), [sample],
                 quiet=True)
    assert isinstance(q.model.layers[0].self_attn.o_proj, nn.Linear)
    torch.testing.assert_close(q.model.layers[1].self_attn.o_proj.smooth_scale,
                               smooth_scales(true[0], o_proj.weight.abs().amax(0), 0.5))


class _OnePlusRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class _SquaredRMSNorm(_OnePlusRMSNorm):
    def __init__(self, d):
        super().__init__(d)
        self.weight.data = torch.rand(d) + 0.5

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight ** 2


def test_norm_form_is_probed():
    assert layerwise._norm_offset(nn.LayerNorm(12), torch.float32) == 0.0
    assert layerwise._norm_offset(RMSNorm(12), torch.bfloat16) == 0.0
    assert layerwise._norm_offset(_OnePlusRMSNorm(12), torch.float32) == 1.0
    assert layerwise._norm_offset(_SquaredRMSNorm(12), torch.float32) is None


def _smoothing_keeps_logits(model, norm_of, monkeypatch) -> bool:
    """Random norm weights, then SmoothQuant without rounding: the logits must not move. Returns whether
    the norm `norm_of(model)` took the fold (its weight changed)."""
    _randomize_norms(model)
    sample = _ids()
    ref = _logits(model, sample)
    before = norm_of(model).weight.detach().clone()
    _smooth_only(model, [sample], monkeypatch)
    assert _rel(_logits(model, sample), ref) < 1e-5
    return not torch.equal(norm_of(model).weight, before)


def test_a_one_plus_gamma_norm_is_folded_exactly(monkeypatch):
    """VaultGemma's RMSNorm scales by (1 + γ): γ / s changed the model by 88%."""
    assert _smoothing_keeps_logits(_hf("vaultgemma"), lambda m: m.model.layers[0].input_layernorm, monkeypatch)


def test_a_one_plus_gamma_norm_in_bf16_is_not_folded(monkeypatch):
    """(1 + γ) / s - 1 cancels in bf16 (a Gemma block moved by up to 2.4% before any rounding of the
    linears): there 1/s stays in the quantize op (smooth_scale), which divides in float32."""
    model = _hf("vaultgemma")
    _randomize_norms(model)
    model = model.to(torch.bfloat16)
    before = model.model.layers[0].input_layernorm.weight.detach().clone()
    _smooth_only(model, [_ids()], monkeypatch)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, before)
    assert model.model.layers[0].self_attn.q_proj.smooth_scale is not None


class _TupleCacheLayer(nn.Module):
    """A layer in the transformers 4.3x style: (hidden, present) when use_cache, which the model's loop
    collects by index."""

    def __init__(self, d):
        super().__init__()
        self.norm = RMSNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h, past_key_value=None, use_cache=False):
        out = (h + self.fc(self.norm(h)),)
        return out + ((h, h),) if use_cache else out


class _TupleCacheModel(nn.Module):
    def __init__(self, d=32, n=3):
        super().__init__()
        self.layers = nn.ModuleList(_TupleCacheLayer(d) for _ in range(n))

    def forward(self, x, use_cache=True):
        presents = ()
        for layer in self.layers:
            out = layer(x, past_key_value=None, use_cache=use_cache)
            x = out[0]
            if use_cache:
                presents += (out[1],)
        return x


def test_capture_runs_layer_0_as_the_model_called_it():
    """The capture pass runs layer 0 with the model's own arguments (cache and use_cache included), so
    a loop that reads the present key/value from each layer's output works; the recorded calls (what
    calibration replays) have no cache; no layer keeps an instance forward."""
    torch.manual_seed(0)
    model = _TupleCacheModel()
    data = [torch.randn(2, 5, 32) for _ in range(2)]
    quantize(model, PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth"), data, quiet=True)
    assert all(isinstance(layer.fc, QuantLinear) for layer in model.layers)
    assert not any("forward" in layer.__dict__ for layer in model.layers)


@pytest.mark.parametrize("post", [False, True])
def test_a_fold_that_changes_the_block_is_undone(post, monkeypatch):
    """BLOOM with apply_residual_connection_post_layernorm: the norm's output is also the residual,
    handed to self_attention / mlp (ancestors of the smoothed linears); folding there changed the
    model by 50%. Without it, the fold is right and is kept."""
    model = _hf("bloom", apply_residual_connection_post_layernorm=post)
    assert _smoothing_keeps_logits(model, lambda m: m.transformer.h[0].input_layernorm, monkeypatch) != post
    assert (model.transformer.h[0].self_attention.query_key_value.smooth_scale is not None) == post


def test_osl_searches_alpha_over_the_whole_calibration_set():
    """Outliers after the first 2048 tokens: OSL searched without them and lost to plain SmoothQuant."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(1, 4096, 64)
    x[0, 3000:3010, 5] = 80.0

    def mse(**kw):
        m = nn.Sequential(copy.deepcopy(lin))
        ref = m(x)
        quantize(m, PTQConfig(**STATIC, **kw), [x], quiet=True)
        return ((m(x) - ref) ** 2).mean().item()

    osl = mse(outliers="osl")
    assert osl <= mse(outliers="smooth", smooth_alpha=0.5) and osl <= mse(outliers="smooth", smooth_alpha=0.0)


def test_row_sample_is_uniform_over_every_token():
    from ptqrt.observers import RowSample

    """Every recorded row is as likely to be kept as any other: a sequence's first token is kept about as
    often as it occurs (1 in 50 here, not once a call), a long call in proportion to its length; no row
    twice; all of them while there are fewer than n; the same rows from the same seed."""
    def run(seed):
        sample = RowSample(512, seed)
        for c in range(100):  # row = (call, position), calls of 50 rows and one of 2000
            t = 2000 if c == 7 else 50
            sample.add(torch.stack([torch.full((t,), float(c)), torch.arange(float(t))], 1))
        return sample.rows

    rows = run(0)
    assert rows.shape == (512, 2) and len({tuple(r) for r in rows.tolist()}) == 512
    total = 99 * 50 + 2000
    first = int((rows[:, 1] == 0).sum())
    assert first < 3 * 512 * 100 / total  # 7.4 expected; one a call would be 100
    long = int((rows[:, 0] == 7).sum())
    assert abs(long - 512 * 2000 / total) < 60  # 147 expected
    assert torch.equal(run(0), rows) and not torch.equal(run(1), rows)
    g = torch.Generator().manual_seed(0)  # the same keys, drawn for every row at once: the 512 smallest
    keys = torch.cat([torch.rand(2000 if c == 7 else 50, generator=g) for c in range(100)])
    every = torch.cat([torch.stack([torch.full((t,), float(c)), torch.arange(float(t))], 1)
                       for c, t in ((c, 2000 if c == 7 else 50) for c in range(100))])
    assert {tuple(r) for r in every[keys.topk(512, largest=False).indices].tolist()} == {tuple(r) for r in rows.tolist()}
    few = RowSample(512)
    few.add(torch.arange(30.0)[:, None])
    few.add(torch.arange(30.0, 40.0)[:, None])
    assert few.rows.flatten().tolist() == list(map(float, range(40)))


@pytest.mark.parametrize("config", ["static", "osl", "gptq"])
def test_padding_is_left_out_of_the_statistics(config):
    """A right-padded batch (attention_mask) calibrates as its sequences do unpadded: the pad positions,
    here with a huge embedding, reach no observer, Hessian or OSL sample (the lm_head, done with the whole
    model as its block, included)."""
    cfgs = {"static": dict(act_dtype="int8", act_granularity="per_tensor"),
            "osl": dict(act_dtype="int8", act_granularity="per_tensor", outliers="osl"),
            "gptq": dict(precision_recovery="gptq")}
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}]
    alone = [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :6]}]
    models = []
    for data in (padded, alone):
        model = _hf("llama", pad_token_id=0)
        with torch.no_grad():
            model.model.embed_tokens.weight[0] *= 100  # the pad token: outliers where only padding is
        quantize(model, PTQConfig(skip=[], **cfgs[config]), data, quiet=True)
        models.append(model)
    for (name, a), b in zip(models[0].named_modules(), models[1].modules()):
        if isinstance(a, QuantLinear):
            for buf in ("input_scale", "weight_scale", "smooth_scale"):
                x, y = getattr(a, buf), getattr(b, buf)
                assert (x is None) == (y is None), (name, buf)
                if x is not None:
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=0, msg=f"{name}.{buf}")
            # GPTQ's rounding follows the Hessian: codes off by one where float noise decides a tie
            assert (a.weight.int() - b.weight.int()).abs().float().mean() < 0.01, name


@pytest.mark.parametrize("policy, match", [({"outliers": "none"}, "only some of their configs ask for smoothing"),
                                           ({"outliers": "smooth", "smooth_alpha": 0.8}, "'s decides it for all")])
def test_a_group_whose_policies_differ_is_warned_about(policy, match):
    """q, k and v read one input and share one smoothing vector: a policy that sets k apart cannot
    hold, and that is said rather than silently dropped or overridden."""
    pytest.importorskip("transformers")
    model = _hf("llama")
    cfg = PTQConfig(outliers="smooth", layer_policies={r"k_proj": PTQConfig(**STATIC, **policy)}, **STATIC)
    with pytest.warns(RuntimeWarning, match=match):
        quantize(model, cfg, [_ids()], quiet=True)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fail_at(monkeypatch, when, exc):
    """Make layerwise's QuantLinear builder raise `exc` at the `when`-th target it builds (0-based)."""
    real, seen = layerwise._quantized, []

    def failing(full, *a, **k):
        seen.append(full)
        if len(seen) == when + 1:
            raise exc
        return real(full, *a, **k)

    monkeypatch.setattr(layerwise, "_quantized", failing)
    return seen


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("outliers", ["smooth", "none"])
def test_a_failure_in_a_later_layer_puts_the_whole_model_back(exc, outliers, monkeypatch):
    """Layers 0 and 1 are quantized (and, with smoothing, their norms folded into) before layer 2
    fails: quantize() undoes all of it, whether an error or an interrupt stopped it."""
    model = Stack(PreNormLayer).eval()
    _randomize_norms(model)
    x = _calib()[0]
    ref, before = model(x), _state(model)
    modules = dict(model.named_modules())
    seen = _fail_at(monkeypatch, 2 * 7, exc)  # 7 targets a layer: the first of layer 2
    with pytest.raises(type(exc)) as info:
        quantize(model, PTQConfig(outliers=outliers, **STATIC), _calib(), quiet=True)
    assert seen[-1] == "layers.2.q"
    assert any("put back as it was" in n for n in getattr(info.value, "__notes__", []))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), ref)
    # and the same model quantizes afterwards
    monkeypatch.undo()
    q = quantize(model, PTQConfig(outliers=outliers, **STATIC), _calib(), quiet=True)
    assert isinstance(q.layers[2].q, QuantLinear) and _rel(q(x), ref) < 0.05


def test_a_failure_after_the_calibrated_layers_puts_them_back(monkeypatch):
    """The dynamic layers outside calibration are swapped after the calibrated ones: a failure there
    puts back both."""
    model = Stack(PreNormLayer).eval()
    x = _calib()[0]
    ref = model(x)
    real = QuantLinear.from_float
    calls = []

    def failing(mod, cfg, *a, **k):
        calls.append(k.get("name"))
        if k.get("name") == "inp":
            raise RuntimeError("boom")
        return real(mod, cfg, *a, **k)

    monkeypatch.setattr(QuantLinear, "from_float", failing)
    cfg = PTQConfig(act_dtype="int8", layer_policies={r"^layers\.": PTQConfig(**STATIC)})
    with pytest.raises(RuntimeError, match="boom"):
        quantize(model, cfg, _calib(), quiet=True)
    assert "layers.2.down" in calls and calls[-1] == "inp"
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(model(x), ref)


def test_a_folded_norm_goes_back_to_its_own_device(monkeypatch):
    """A restored norm weight lands on the device its layer is on after the failure (the layer was on
    `device` while its norm was folded into, then went back home)."""
    model = Stack(PreNormLayer).eval()
    _randomize_norms(model)
    norm = model.layers[0].in_norm
    w0 = norm.weight.detach().clone()
    _fail_at(monkeypatch, 7, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        quantize(model, PTQConfig(outliers="smooth", **STATIC), _calib(), quiet=True, device="cpu")
    assert norm.weight.device.type == "cpu" and torch.equal(norm.weight, w0)
    restore = layerwise._restorer(norm)
    norm.to("meta")  # stands in for "the norm is elsewhere now"
    restore()
    assert norm.weight.device.type == "meta"


def test_a_row_gather_of_every_token_is_not_masked_as_if_in_token_order():
    """Per-expert linears fed x[tokens] in another order (slot-major top-k dispatch) that happen to get
    all B * T rows: the padding mask does not line up with their rows and is not applied (it would drop
    real rows and keep padded ones). Both experts see the same rows, so they get the same scale."""
    h, vocab, pad = 16, 11, 10

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(vocab, h)
            with torch.no_grad():
                self.emb.weight[pad] = 0
                self.emb.weight[pad, 3] = 100.0
            self.router = nn.Parameter(torch.randn(2, h))
            self.experts = nn.ModuleList(nn.Linear(h, h) for _ in range(2))

        def forward(self, input_ids, attention_mask=None):
            x = self.emb(input_ids).reshape(-1, h)
            w, sel = torch.topk((x @ self.router.T).softmax(-1), 2, dim=-1)
            routed = nn.functional.one_hot(sel, 2).permute(2, 1, 0)  # [E, k, T]
            y = torch.zeros_like(x)
            for e in range(2):
                slot, tok = torch.where(routed[e])  # slot-major: not token order
                y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
            return y

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, pad, pad, pad, pad]])
    mask = torch.tensor([[1] * 8 + [0] * 4])
    q = quantize(MoE(), PTQConfig(act_dtype="int8", act_granularity="per_tensor"),
                 [{"input_ids": ids, "attention_mask": mask}], quiet=True)
    assert torch.equal(q.experts[0].input_scale, q.experts[1].input_scale)
