import copy
import re

import pytest
import torch
from torch import nn

import ptqrt
from ptqrt import PTQConfig, QuantLinear, quantize
from ptqrt.reference import dequantize_weight
from tests.models import calib, tiny_net

CONFIGS = {
    "w8a16": PTQConfig(),
    "w8a16_g16": PTQConfig(weight_granularity="per_group", group_size=16),
    "w8a8_dynamic": PTQConfig(act_dtype="int8"),
    "w8a8_static": PTQConfig(act_dtype="int8", act_granularity="per_tensor"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_quantize_swaps_every_linear_but_skipped(name):
    model = tiny_net()
    ids = calib()[0]
    ref = model(ids)
    q = quantize(copy.deepcopy(model), CONFIGS[name], calib(), quiet=True)
    swapped = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert swapped == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    assert isinstance(q.lm_head, nn.Linear)
    assert q.blocks[0].fc1.mode == CONFIGS[name].mode
    out = q(ids)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.05 if "static" in name else 0.02), rel


def test_quantlinear_matches_reference_math():
    lin = nn.Linear(40, 24)
    q = QuantLinear.from_float(lin, PTQConfig(act_dtype="int8"))
    x = torch.randn(3, 5, 40)
    from ptqrt import reference as ref
    x_q, x_s = ref.quantize_per_token(x.reshape(-1, 40))
    expect = ref.w8a8_gemm(x_q, x_s, q.weight, q.weight_scale, lin.bias, torch.float32).reshape(3, 5, 24)
    torch.testing.assert_close(q(x), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.dequantized_weight(), dequantize_weight(q.weight, q.weight_scale), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_and_device_are_kept(dtype):
    model = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8)).to(dtype)
    x = torch.randn(4, 32, dtype=dtype)
    ref = model(x).float()
    for cfg in (PTQConfig(), PTQConfig(act_dtype="int8")):
        q = quantize(copy.deepcopy(model), cfg, quiet=True)
        y = q(x)
        assert y.dtype == dtype and y.device == x.device
        assert q[0].bias.dtype == dtype
        assert ((y.float() - ref).norm() / ref.norm()) < 0.05


def test_skip_regex_and_layer_policies():
    cfg = PTQConfig(skip=["lm_head", r"blocks\.1\.fc2$"],
                    layer_policies={r"blocks\.0\.": PTQConfig(weight_granularity="per_group", group_size=16)})
    q = quantize(tiny_net(), cfg, quiet=True)
    assert isinstance(q.blocks[1].fc2, nn.Linear)
    assert q.blocks[0].fc1.group_size == 16 and q.blocks[1].fc1.group_size == 0


def test_group_size_must_divide_k_per_layer():
    with pytest.raises(ValueError, match=r"group_size=32 does not divide K=48 of layer 'blocks.0.fc1'"):
        quantize(tiny_net(), PTQConfig(weight_granularity="per_group", group_size=32), quiet=True)


def test_static_needs_calib_data_and_unimplemented_options_say_so():
    with pytest.raises(ValueError, match="calib_data"):
        quantize(tiny_net(), PTQConfig(act_dtype="int8", act_granularity="per_tensor"), quiet=True)
    with pytest.raises(ValueError, match="empty"):
        quantize(tiny_net(), PTQConfig(act_dtype="int8", act_granularity="per_tensor"), [], quiet=True)


def test_calib_data_forms():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, a, b=None):
            return self.fc(a if b is None else a + b)

    cfg = PTQConfig(act_dtype="int8", act_granularity="per_tensor")
    x = torch.randn(3, 8)
    for data in ([x], [(x, x)], [{"a": x, "b": x}], x):
        q = quantize(KW(), cfg, data, quiet=True)
        assert q.fc.input_scale.item() > 0


def test_bad_inputs_raise_clearly():
    q = quantize(nn.Sequential(nn.Linear(8, 4)), PTQConfig(), quiet=True)
    with pytest.raises(TypeError, match="float tensor"):
        q(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        q(torch.ones(2, 9))
    with pytest.raises(TypeError, match="nn.Module"):
        quantize("model", PTQConfig())


def test_m_zero_and_3d_inputs():
    q = quantize(nn.Sequential(nn.Linear(8, 4)), PTQConfig(act_dtype="int8"), quiet=True)
    assert q(torch.randn(0, 8)).shape == (0, 4)
    assert q(torch.randn(2, 0, 8)).shape == (2, 0, 4)
    assert q(torch.randn(2, 3, 8)).shape == (2, 3, 4)


@pytest.mark.parametrize("name", ["w8a16", "w8a8_dynamic", "w8a8_static"])
def test_repeat_calls_go_direct_until_the_module_changes(name, monkeypatch):
    """Once the public ops accepted a call, plain eager calls like it (same x dtype and device, same
    backend setting, the same module tensors with the same dtypes and devices) run the backend
    directly, with the same result. A new x dtype, converting the module (.double()), a buffer
    replaced or changed in any of the ways below, torch.jit.trace, or a dispatch mode sends the call
    through the ops and their checks again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    for op in ("quantize_per_token", "quantize_per_tensor", "w8a8_gemm", "w8a16_gemm"):
        orig = getattr(ptqrt.ops, op)
        monkeypatch.setattr(ptqrt.ops, op, lambda *a, _o=orig, _n=op: (calls.append(_n), _o(*a))[1])

    def fresh():
        return quantize(nn.Sequential(nn.Linear(24, 16)), CONFIGS[name], [torch.randn(4, 24)], quiet=True)[0]

    q, x = fresh(), torch.randn(3, 24)
    y = q(x)
    assert calls
    calls.clear()
    for _ in range(2):
        assert torch.equal(q(x), y) and torch.equal(q(x.reshape(3, 1, 24)).reshape(3, 16), y)
    assert calls == []
    with pytest.raises(TypeError, match="dtype"):
        q(x.double())  # a new key: the ops' checks refuse float64
    q.double()  # a float64 bias now (the scales stay float32): refused by the ops, not run by the kernels
    with pytest.raises(TypeError, match="dtype"):
        q(x)
    replace = (lambda q, t: setattr(q, "weight_scale", t), lambda q, t: q.register_buffer("weight_scale", t),
               lambda q, t: q._buffers.__setitem__("weight_scale", t),
               lambda q, t: setattr(q.weight_scale, "data", t))
    for how in replace:
        q = fresh()
        q(x)
        how(q, q.weight_scale.half())
        with pytest.raises(TypeError, match="w_scale"):
            q(x)
    q = fresh()
    q(x)
    with pytest.raises(TypeError, match="w_scale"):
        torch.func.functional_call(q, {"weight_scale": q.weight_scale.double()}, (x,))
    q = fresh()
    y = q(x)
    traced = torch.jit.trace(q, x)  # checks the trace against a second run: both through the ops
    assert any(n.kind().startswith("ptqrt::") for n in traced.graph.nodes())
    assert torch.equal(traced(x), y)

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, seen = fresh(), []
    y = q(x)
    with Log():
        assert torch.equal(q(x), y)
    assert any(s.startswith("ptqrt.") for s in seen)


@pytest.mark.parametrize("name", ["w8a16", "w8a8_dynamic", "w8a8_static"])
def test_torch_compile_without_graph_breaks(name):
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    q = quantize(model, CONFIGS[name], [torch.randn(4, 32)], quiet=True)
    x = torch.randn(5, 32)
    eager = q(x)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x), eager)
    explain = torch._dynamo.explain(q)(x)
    assert explain.graph_break_count == 0


def test_public_api_names():
    for name in ("PTQConfig", "quantize", "save_quantized", "load_quantized", "set_backend"):
        assert hasattr(ptqrt, name)
    with pytest.raises(ValueError, match="backend must be one of"):
        ptqrt.set_backend("tpu")


def test_linear_subclasses_that_cannot_be_swapped_stay_float():
    """nn.MultiheadAttention reads out_proj's weight itself, and a router subclassing nn.Linear returns
    routing tuples from a forward of its own: both stay float, named in a warning; plain linears and
    subclasses without a forward of their own are quantized."""
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits.argmax(-1)

    class Plain(nn.Linear):  # no forward of its own
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.router, self.fc = Router(32, 4), Plain(32, 32)

        def forward(self, x):
            h = self.attn(x, x, x)[0]
            p, _ = self.router(h)
            return self.fc(h) * p[..., :1]

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 32)
    ref = model(x)
    with pytest.warns(RuntimeWarning, match=r"2 linears stay float: \['attn.out_proj "
                                            r"\(NonDynamicallyQuantizableLinear\)', 'router \(Router\)'\]"):
        q = quantize(model, PTQConfig(), quiet=True)
    assert type(q.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear" and type(q.router) is Router
    assert isinstance(q.fc, QuantLinear)
    assert ((q(x) - ref).norm() / ref.norm()) < 0.02


class _Mixer(nn.Module):
    """Reads its children's weights itself: as an operand (dt), for a dtype (proj, before calling it), in a
    branch its own settings rule out (tp) or that runs in training only (train_only), in a method written
    for integer weights (guarded), and for their device and shape only (where)."""

    def __init__(self, slow_but_exact=False):
        super().__init__()
        self.dt, self.proj, self.tp, self.guarded, self.where, self.train_only = (nn.Linear(16, 16) for _ in range(6))
        self.pretraining_tp, self.slow_but_exact = 2, slow_but_exact

    def _init_weights(self):  # initialisation reads do not count
        nn.init.normal_(self.guarded.weight)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.dt.weight) + self.proj(x.to(self.proj.weight.dtype))
        h = h + self.where(x.to(self.where.weight.device))[..., :self.where.weight.shape[0]]
        if self.training:
            h = h + torch.nn.functional.linear(x, self.train_only.weight)
        else:
            h = h + self.train_only(x)
        if self.pretraining_tp > 1 and self.slow_but_exact:
            h = h + torch.nn.functional.linear(x, self.tp.weight)
        else:
            h = h + self.tp(x)
        return self._guarded(h)

    def _guarded(self, h):
        if self.guarded.weight.is_floating_point():
            h = h.to(self.guarded.weight.dtype)
        return self.guarded(h)


@pytest.mark.parametrize("slow_but_exact", [False, True])
def test_linears_whose_weight_a_module_reads_itself_stay_float(slow_but_exact):
    """A linear whose weight a containing module reads (Mamba's dt_proj, x.to(lm_head.weight.dtype))
    would hand it int8 weights: it stays float, named in the warning. Reads in a branch the module's own
    settings rule out or that runs in training only (quantize is called in train mode here), in a method
    that handles integer weights, in weight initialisation, or of the device and shape only do not count."""
    torch.manual_seed(0)
    model = nn.Sequential(_Mixer(slow_but_exact)).eval()
    x = torch.randn(3, 16)
    ref = model(x)
    model.train()
    kept = [f"{n} (weight read directly)" for n in ["0.dt", "0.proj"] + ["0.tp"] * slow_but_exact]
    with pytest.warns(RuntimeWarning, match=re.escape(f"{len(kept)} linears stay float: {kept}")):
        q = quantize(model, PTQConfig(), quiet=True)
    mixer = q[0]
    assert type(mixer.dt) is nn.Linear and type(mixer.proj) is nn.Linear and isinstance(mixer.guarded, QuantLinear)
    assert isinstance(mixer.tp, nn.Linear if slow_but_exact else QuantLinear)
    assert isinstance(mixer.where, QuantLinear) and isinstance(mixer.train_only, QuantLinear)
    assert ((q.eval()(x) - ref).norm() / ref.norm()) < 0.02


def test_jamba_quantizes_and_runs():
    """Jamba's Mamba mixers read dt_proj's weight themselves (a float matmul): quantized, the model ran
    into int8 weights there. dt_proj stays float and the model runs close to float."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.JambaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                                   attn_layer_period=2, attn_layer_offset=1)
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    with pytest.warns(RuntimeWarning, match=r"stay float: \['model.layers.0.mamba.dt_proj \(weight read directly\)'"):
        q = quantize(model, PTQConfig(), quiet=True)
    assert type(q.model.layers[0].mamba.dt_proj) is nn.Linear and isinstance(q.model.layers[0].mamba.in_proj, QuantLinear)
    assert ((q(ids).logits - ref).norm() / ref.norm()) < 0.05


class _SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.proj_again = self.proj  # one module under two names (a weight-shared projection)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(self.proj_again(torch.relu(self.proj(x))))


@pytest.mark.parametrize("name", ["w8a16", "w8a8_dynamic"])
def test_a_linear_under_two_names_is_one_quantlinear_saved_and_loaded(name, tmp_path, capsys):
    torch.manual_seed(0)
    model = _SharedLinear()
    x = torch.randn(5, 16)
    want = model(x)
    q = quantize(model, CONFIGS[name], quiet=True)
    assert isinstance(q.proj, QuantLinear) and q.proj_again is q.proj
    assert not list(q.parameters())  # no float weight left under either name
    y = q(x)
    assert ((y - want).norm() / want.norm()) < 0.05
    ptqrt.save_quantized(q, tmp_path / "packed")
    torch.manual_seed(1)
    r = ptqrt.load_quantized(_SharedLinear(), tmp_path / "packed")
    assert isinstance(r.proj, QuantLinear) and r.proj_again is r.proj
    assert torch.equal(r(x), y)
    from ptqrt.cli import main

    assert main(["inspect", str(tmp_path / "packed")]) == 0
    out = capsys.readouterr().out
    assert "proj_again" not in out and "2 quantized layers" in out  # stored once, shown once


def test_a_shared_linear_whose_config_calibrates_stays_float_under_its_other_names():
    """Calibration walks a decoder one layer at a time: it would see the linear run under its first name
    only, so the other names keep the float linear, with a warning."""
    torch.manual_seed(0)
    model = _SharedLinear()
    with pytest.warns(RuntimeWarning, match=r"\['proj_again'\] hold a linear quantized under another name"):
        q = quantize(model, CONFIGS["w8a8_static"], [torch.randn(4, 16)], quiet=True)
    assert isinstance(q.proj, QuantLinear) and type(q.proj_again) is nn.Linear


def test_names_of_one_linear_must_agree():
    with pytest.raises(ValueError, match=r"\['proj', 'proj_again'\] are one linear under 2 names, and skip names only "
                                         r"\['proj_again'\]"):
        quantize(_SharedLinear(), PTQConfig(skip=["proj_again"]), quiet=True)
    with pytest.raises(ValueError, match="layer_policies give them different configs"):
        quantize(_SharedLinear(), PTQConfig(layer_policies={"proj_again": PTQConfig(act_dtype="int8")}), quiet=True)
    q = quantize(_SharedLinear(), PTQConfig(skip=["proj", "proj_again"]), quiet=True)
    assert type(q.proj) is nn.Linear and q.proj_again is q.proj


def test_a_weight_read_directly_under_another_name_keeps_the_linear_float():
    class Reader(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return torch.nn.functional.linear(x, self.proj.weight)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.reader = Reader(self.proj)  # registered second: reads the weight itself

        def forward(self, x):
            return self.reader(self.proj(x))

    torch.manual_seed(0)
    m = Model()
    x = torch.randn(3, 16)
    want = m(x)
    with pytest.warns(RuntimeWarning, match=r"\['proj \(weight read directly\)'\]"):
        q = quantize(m, PTQConfig(), quiet=True)
    assert type(q.proj) is nn.Linear and q.reader.proj is q.proj
    assert torch.equal(q(x), want)


def test_an_already_quantized_model_or_a_bare_linear_is_refused():
    q = quantize(tiny_net(), PTQConfig(), quiet=True)
    with pytest.raises(ValueError, match=r"already quantized \(4 quantized modules, such as 'blocks.0.fc1'\)"):
        quantize(q, PTQConfig(act_dtype="int8"), quiet=True)
    assert q.ptqrt_config == PTQConfig()
    with pytest.raises(ValueError, match="the model itself is a Linear, which cannot be replaced in place"):
        quantize(nn.Linear(8, 8), PTQConfig(), quiet=True)


def test_a_module_shared_by_two_layers_keeps_its_linears_float_under_a_calibrating_config():
    """One attention module in two decoder layers: swapping its linears under one name swaps them under both,
    and calibration would see them run in the first layer only: they stay float, with a warning."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.model.layers[1].self_attn = model.model.layers[0].self_attn
    calib = [torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.warns(RuntimeWarning, match="stay float under every name"):
        q = quantize(model, PTQConfig(act_dtype="int8", act_granularity="per_tensor"), calib, quiet=True)
    attn = q.model.layers[0].self_attn
    assert q.model.layers[1].self_attn is attn
    assert all(type(getattr(attn, p)) is nn.Linear for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(q.model.layers[1].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("cfg", [PTQConfig(), PTQConfig(act_dtype="int8", act_granularity="per_tensor", skip=["head"])],
                         ids=["rtn", "calibrated"])
def test_each_module_keeps_its_own_training_flag(cfg):
    """quantize runs the model in eval mode and then gives every module its own flag back (it gave them all
    the top module's: a wrapper in training mode around a model in eval mode came back with dropout on);
    a QuantLinear takes its parent's flag. The outputs show it: dropout would make them random."""
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 8)).eval()
            self.head = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))  # stays in training mode

        def forward(self, x):
            return self.inner(x)

        def train(self, mode=True):  # an override sees every change (transformers' models re-select kernels)
            self.calls = getattr(self, "calls", []) + [mode]
            return super().train(mode)

    torch.manual_seed(0)
    w = Wrapper()
    w.calls = []
    assert w.training and not w.inner.training and w.head.training
    x = torch.randn(4, 16)
    quantize(w, cfg, [x], quiet=True)
    assert w.training and not w.inner.training and not w.inner[1].training and w.head.training
    assert w.calls == [False, True]
    assert not w.inner[0].training and isinstance(w.inner[0], QuantLinear) and w.head[0].training
    torch.testing.assert_close(w(x), w(x), rtol=0, atol=0)
