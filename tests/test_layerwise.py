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
        for m in mods:
            layerwise._scale_in_channels(m, s)
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
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = rss()
    quantize(m, cfg, calib, quiet=True)
    print(json.dumps({"growth": rss() - before, "layer": 2 * D * D * 4}))
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
