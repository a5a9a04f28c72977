"""int8 fused MoE experts (ptqrt.modules.experts, ptqrt.integrations.hf_experts) on tiny random-init
transformers MoE models: Mixtral (concatenated gate/up, [E, N, K]) and GPT-OSS (transposed [E, K, N],
biases, its own clamped gate)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ptqrt import PTQConfig, load_quantized, quantize, save_quantized  # noqa: E402
from ptqrt.format import DESCRIPTION, FormatError  # noqa: E402
from ptqrt.integrations import hf_experts  # noqa: E402
from ptqrt.modules.experts import QuantExperts, fused_projections  # noqa: E402
from ptqrt.reference import dequantize_weight  # noqa: E402

VOCAB = 97


def _model(arch, seed=0, experts=4):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_local_experts=experts, num_experts_per_tok=2)
    if arch == "mixtral":
        cls, cfg = transformers.MixtralForCausalLM, transformers.MixtralConfig(**common)
    else:
        cls, cfg = transformers.GptOssForCausalLM, transformers.GptOssConfig(
            **common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    for mod in model.modules():  # biases (GPT-OSS) start at 0: give them values, so that they count
        for p in ("gate_up_proj_bias", "down_proj_bias"):
            if isinstance(getattr(mod, p, None), torch.Tensor):
                getattr(mod, p).data = 0.05 * torch.randn(getattr(mod, p).shape, generator=g)
    return model


def _experts(model):
    return model.model.layers[0].mlp.experts


def _routing(n, experts, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
    return x, idx, torch.rand(n, k, generator=g)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("group", [0, 16])
def test_int8_experts_equal_the_modules_own_forward_on_dequantized_weights(arch, group):
    """W8A16: the int8 forward equals the module's own (eager) forward run on the dequantized weights,
    routing, gates, biases and the transposed layout included; a token routed to no expert in range
    (an expert-parallel sentinel) gets nothing from it."""
    mod = copy.deepcopy(_experts(_model(arch)))
    x, idx, w = _routing(11, 4, seed=1)
    if arch == "mixtral":  # its eager forward takes expert-parallel sentinels (GPT-OSS's does not)
        idx[3, 1] = 4  # past the experts: contributes nothing, as in transformers
    sim = copy.deepcopy(mod)
    q = QuantExperts.from_float(mod, "W8A16", group)
    for p in fused_projections(sim):
        d = torch.stack([dequantize_weight(getattr(q, p)[e], getattr(q, f"{p}_scale")[e], group) for e in range(4)])
        getattr(sim, p).data = (d.transpose(1, 2) if sim.is_transposed else d).contiguous()
    want = type(sim).forward.__wrapped__(sim, x, idx, w)
    hf_experts.attach(mod, q)
    assert not fused_projections(mod) and mod.config._experts_implementation == hf_experts.IMPL
    got = mod(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert _rel(got, type(sim).forward.__wrapped__(_experts(_model(arch)), x, idx, w)) < 0.05


def test_w8a8_experts_stay_close_to_float():
    mod = copy.deepcopy(_experts(_model("mixtral")))
    x, idx, w = _routing(9, 4, seed=2)
    want = type(mod).forward.__wrapped__(mod, x, idx, w)
    hf_experts.attach(mod, QuantExperts.from_float(mod, "W8A8_DYNAMIC"))
    assert _rel(mod(x, idx, w), want) < 0.03


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("config", [PTQConfig(), PTQConfig(act_dtype="int8"),
                                    PTQConfig(weight_granularity="per_group", group_size=16)],
                         ids=["w8a16", "w8a8_dynamic", "w8a16_group"])
def test_quantize_generate_save_load(arch, config, tmp_path):
    model = _model(arch)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    q = quantize(copy.deepcopy(model), config, quiet=True)
    experts = [m for m in q.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(e.mode == ("W8A16" if config.act_dtype is None else "W8A8_DYNAMIC") for e in experts)
    assert not any(p.dim() == 3 for p in q.parameters())  # every expert weight is int8 now
    logits = q(ids).logits
    assert _rel(logits, ref) < 0.1  # a random tiny MoE: a near-tie in the router moves a token a lot
    out = q.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    save_quantized(q, tmp_path)
    loaded = load_quantized(_model(arch, seed=7), tmp_path)
    assert torch.equal(loaded(ids).logits, logits)
    assert sum(isinstance(m, QuantExperts) for m in loaded.modules()) == 2


def test_skipped_experts_stay_float_and_run_their_own_forward():
    """Layer 0's experts skipped: they keep their float weights and, sharing the config that now names
    ptqrt's forward, run the module's own forward; layer 1's are int8."""
    model = _model("mixtral")
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    ref = model(ids).logits
    q = quantize(copy.deepcopy(model), PTQConfig(skip=["lm_head", "layers.0.mlp.experts"]), quiet=True)
    assert fused_projections(q.model.layers[0].mlp.experts) == ["gate_up_proj", "down_proj"]
    assert isinstance(q.model.layers[1].mlp.experts.ptqrt_experts, QuantExperts)
    assert _rel(q(ids).logits, ref) < 0.1


def test_calibrated_configs_give_experts_the_dynamic_form_and_say_so():
    model = _model("mixtral")
    calib = [torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))]
    with pytest.warns(RuntimeWarning, match="fused MoE experts"):
        q = quantize(model, PTQConfig(act_dtype="int8", act_granularity="per_tensor"), calib, quiet=True)
    assert {m.mode for m in q.modules() if isinstance(m, QuantExperts)} == {"W8A8_DYNAMIC"}


def test_a_failure_after_the_experts_puts_them_back(monkeypatch):
    model = _model("mixtral")
    mod = _experts(model)
    weights, impl = dict(mod._parameters), mod.config._experts_implementation
    from ptqrt.integrations import hf

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(hf, "apply_int8_kv_cache", boom)
    with pytest.raises(RuntimeError, match="boom"):
        quantize(model, PTQConfig(kv_cache_dtype="int8"), quiet=True)
    assert dict(mod._parameters) == weights and not hasattr(mod, "ptqrt_experts")
    assert mod.config._experts_implementation == impl


def test_load_refuses_experts_that_do_not_fit(tmp_path):
    q = quantize(_model("mixtral"), PTQConfig(), quiet=True)
    save_quantized(q, tmp_path)
    with pytest.raises(FormatError, match=r"holds 8 experts of .* but 4 of"):
        load_quantized(_model("mixtral", experts=8), tmp_path)
    import json

    path = tmp_path / DESCRIPTION
    desc = json.loads(path.read_text())
    name = next(n for n, d in desc["modules"].items() if d.get("kind") == "experts")
    renamed = json.loads(json.dumps(desc).replace(name, name.replace("ptqrt_experts", "elsewhere")))
    path.write_text(json.dumps(renamed))  # tensors renamed too: every check but the child's name passes
    with pytest.raises(FormatError, match="is not the one 'ptqrt_experts' child"):
        load_quantized(_model("mixtral"), tmp_path, verify=False)
    desc["modules"][name]["projections"] = {"gate_up_proj": [192, 64], "sideways": [1, 2]}
    path.write_text(json.dumps(desc))
    model = _model("mixtral")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(FormatError, match="projections must be"):
        load_quantized(model, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_inspect_lists_each_expert_projection(tmp_path, capsys):
    from ptqrt import cli

    save_quantized(quantize(_model("mixtral"), PTQConfig(weight_granularity="per_group", group_size=16), quiet=True),
                   tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.mlp.experts.gate_up_proj"))
    assert "W8A16/g16" in row and "4x192x64" in row and "196,608" in row
