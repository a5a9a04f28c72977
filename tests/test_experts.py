"""int8 fused MoE experts (ptqrt.modules.experts, ptqrt.integrations.hf_experts) on tiny random-init
transformers MoE models: Mixtral (concatenated gate/up, [E, N, K]) and GPT-OSS (transposed [E, K, N],
biases, its own clamped gate)."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ptqrt import PTQConfig, load_quantized, quantize, save_quantized  # noqa: E402
from ptqrt.format import DESCRIPTION, FormatError  # noqa: E402
from ptqrt.integrations import hf_experts  # noqa: E402
from ptqrt.modules.experts import QuantExperts, expert_weights, fused_projections  # noqa: E402
from ptqrt.reference import dequantize_weight, quantize_weight  # noqa: E402

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


# ---------------------------------------------------------------- per-expert calibration
STATIC = dict(act_dtype="int8", act_granularity="per_tensor")


def _calib(n=4, t=16, seed=10):
    return [torch.randint(1, VOCAB, (2, t), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def _layer0_inputs(model, samples):
    """{projection: {expert: rows}}: what each of layer 0's experts reads in a float run over `samples`,
    computed here from the routing the module is called with (its own weights, bias and gate)."""
    mod = _experts(model)
    calls = []
    h = mod.register_forward_pre_hook(lambda m, a: calls.append(a) and None)
    with torch.no_grad():
        for s in samples:
            model(s)
    h.remove()
    first = "gate_up_proj" if hasattr(mod, "gate_up_proj") else "up_proj"
    out = {first: {}, "down_proj": {}}
    with torch.no_grad():
        for hs, idx, _ in calls:
            for e in range(idx.max().item() + 1):
                rows = hs[(idx == e).any(1)]
                if not rows.shape[0]:
                    continue
                w = getattr(mod, first)[e]
                h1 = rows @ (w if mod.is_transposed else w.T)
                if getattr(mod, "has_bias", False):
                    h1 = h1 + getattr(mod, f"{first}_bias")[e]
                h2 = mod._apply_gate(h1) if mod.has_gate else mod.act_fn(h1)
                for p, x in ((first, rows), ("down_proj", h2)):
                    out[p][e] = torch.cat([out[p][e], x]) if e in out[p] else x
    return out


def _float_weight(mod, p, e):
    w = getattr(mod, p)[e].detach().float()
    return w.T if mod.is_transposed else w


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_static_experts_take_each_experts_own_input_range(arch):
    """Static W8A8: each expert's input scale is the absmax of exactly the rows routed to it (/ 127), for
    both projections; the experts differ; the int8 forward quantizes each expert's rows with its scale."""
    model, calib = _model(arch), _calib()
    want = _layer0_inputs(model, calib)
    q = quantize(copy.deepcopy(model), PTQConfig(**STATIC), calib, quiet=True)
    qe = _experts(q).ptqrt_experts
    assert qe.mode == "W8A8" and not qe.smooth
    for p, rows in want.items():
        assert sorted(rows) == list(range(4))
        expected = torch.stack([rows[e].abs().amax() / 127 for e in range(4)]).float()
        torch.testing.assert_close(getattr(qe, f"{p}_input_scale"), expected, rtol=1e-5, atol=0)
        assert len(set(expected.tolist())) > 1  # (two experts may share the token with the largest value)
    from ptqrt import reference
    x = torch.randn(5, 64)
    s_in = qe.gate_up_proj_input_scale[2:3]
    ref = reference.w8a8_gemm(reference.quantize_per_tensor(x, s_in), s_in, qe.gate_up_proj[2], qe.gate_up_proj_scale[2],
                              None, torch.float32)
    torch.testing.assert_close(qe.linear("gate_up_proj", 2, x), ref, rtol=1e-5, atol=1e-5)


def test_smoothing_is_per_expert_and_projection():
    """SmoothQuant: each expert's s is smooth_scales(its own rows' absmax, its own weight's absmax), for
    both projections; the weights hold W·s, and the int8 forward divides the input by s."""
    from ptqrt import reference
    from ptqrt.algorithms import smoothquant

    model, calib = _model("mixtral"), _calib()
    want = _layer0_inputs(model, calib)
    q = quantize(copy.deepcopy(model), PTQConfig(act_dtype="int8", outliers="smooth", smooth_alpha=0.6), calib,
                 quiet=True)
    qe = _experts(q).ptqrt_experts
    assert qe.smooth and qe.mode == "W8A8_DYNAMIC"
    for p, rows in want.items():
        for e, x in rows.items():
            w = _float_weight(_experts(model), p, e)
            s = smoothquant.smooth_scales(x.abs().amax(0), smoothquant.weight_absmax_per_in_channel([w]), 0.6)
            torch.testing.assert_close(getattr(qe, f"{p}_smooth_scale")[e], s, rtol=1e-5, atol=0)
            deq = dequantize_weight(getattr(qe, p)[e], getattr(qe, f"{p}_scale")[e]) / s
            assert _rel(deq, w) < 0.02
    x = torch.randn(6, 64)
    s = qe.gate_up_proj_smooth_scale[1]
    x_q, x_s = reference.quantize_per_token(x, s)
    torch.testing.assert_close(qe.linear("gate_up_proj", 1, x),
                               reference.w8a8_gemm(x_q, x_s, qe.gate_up_proj[1], qe.gate_up_proj_scale[1], None,
                                                   torch.float32), rtol=1e-5, atol=1e-5)
    assert not torch.equal(qe.gate_up_proj_smooth_scale[0], qe.gate_up_proj_smooth_scale[1])


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_gptq_experts_beat_rtn_on_their_own_rows(arch):
    """GPTQ per expert, from the Hessian of the rows routed to it: on those rows each projection's output
    error is below RTN's (summed over experts), and the weights differ from RTN's."""
    model, calib = _model(arch), _calib()
    want = _layer0_inputs(model, calib)
    q = quantize(copy.deepcopy(model), PTQConfig(precision_recovery="gptq"), calib, quiet=True)
    qe = _experts(q).ptqrt_experts
    rtn = QuantExperts.from_float(_experts(model), "W8A16")
    for p, rows in want.items():
        err = {"gptq": 0.0, "rtn": 0.0}
        for e, x in rows.items():
            ref = x.float() @ _float_weight(_experts(model), p, e).T
            for name, m in (("gptq", qe), ("rtn", rtn)):
                deq = dequantize_weight(getattr(m, p)[e], getattr(m, f"{p}_scale")[e])
                err[name] += ((x.float() @ deq.T - ref) ** 2).sum().item()
        assert err["gptq"] < 0.9 * err["rtn"], (p, err)
        assert not torch.equal(getattr(qe, p), getattr(rtn, p))


@pytest.mark.parametrize("outliers", ["none", "smooth"])
def test_experts_no_token_reached_fall_back_and_say_so(outliers):
    """Of 8 experts, one two-token sample reaches at most 4 a layer: they are calibrated; the others get
    RTN weights, no smoothing and (static) a scale from the largest input range the reached ones saw
    before smoothing; a warning counts them."""
    model = _model("mixtral", experts=8)
    calib = [torch.randint(1, VOCAB, (1, 2), generator=torch.Generator().manual_seed(6))]
    want = _layer0_inputs(model, calib)
    with pytest.warns(RuntimeWarning, match=r"calibration reached [1-4] of the 8 experts of 'model.layers.0.mlp.experts'"):
        q = quantize(copy.deepcopy(model), PTQConfig(**STATIC, outliers=outliers, precision_recovery="gptq"), calib,
                     quiet=True)
    qe = _experts(q).ptqrt_experts
    rtn = QuantExperts.from_float(_experts(model), "W8A16")
    reached = sorted(want["down_proj"])
    others = [e for e in range(8) if e not in reached]
    assert others
    for p in ("gate_up_proj", "down_proj"):
        top = max(want[p][e].abs().amax() for e in reached) / 127
        torch.testing.assert_close(getattr(qe, f"{p}_input_scale")[others], top.expand(len(others)), rtol=1e-5, atol=0)
        assert torch.equal(getattr(qe, p)[others], getattr(rtn, p)[others])
        assert not torch.equal(getattr(qe, p)[reached], getattr(rtn, p)[reached])
        if outliers == "smooth":
            s_p = getattr(qe, f"{p}_smooth_scale")
            assert torch.equal(s_p[others], torch.ones_like(s_p[others])) and not torch.equal(s_p[reached],
                                                                                             torch.ones_like(s_p[reached]))


def test_padding_is_left_out_of_the_experts_statistics():
    """A right-padded sample with its attention mask calibrates every expert as the sample without the
    padding does: padded positions are routed too, but their rows are not observed."""
    model = _model("mixtral")
    real = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(8))
    padded = torch.cat([real, torch.full((1, 5), 5)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)
    cfg = PTQConfig(**STATIC, outliers="smooth")
    scales = []
    for sample in ({"input_ids": real}, {"input_ids": padded, "attention_mask": mask}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ten tokens may leave an expert unreached
            q = quantize(copy.deepcopy(model), cfg, [sample], quiet=True)
        scales.append([t for m in q.modules() if isinstance(m, QuantExperts) for n, t in sorted(m.named_buffers())
                       if n.endswith(("_input_scale", "_smooth_scale"))])
    for a, b in zip(*scales):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_a_policy_can_calibrate_the_experts_alone():
    """GPTQ for the experts only (a layer policy), RTN for the linears: calibration runs for the experts;
    without calib_data quantize names them."""
    model = _model("mixtral")
    cfg = PTQConfig(layer_policies={"mlp.experts": PTQConfig(precision_recovery="gptq")})
    with pytest.raises(ValueError, match=r"calib_data is None; needing it: \['model.layers.0.mlp.experts'"):
        quantize(copy.deepcopy(model), cfg, quiet=True)
    q = quantize(copy.deepcopy(model), cfg, _calib(), quiet=True)
    rtn = QuantExperts.from_float(_experts(model), "W8A16")
    assert not torch.equal(_experts(q).ptqrt_experts.down_proj, rtn.down_proj)
    assert torch.equal(q.model.layers[0].self_attn.q_proj.weight,
                       quantize(copy.deepcopy(model), PTQConfig(), quiet=True).model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("config", [PTQConfig(**STATIC, outliers="smooth"), PTQConfig(**STATIC, outliers="osl"),
                                    PTQConfig(precision_recovery="gptq", weight_granularity="per_group", group_size=16)],
                         ids=["static_smooth", "static_osl", "gptq_group"])
def test_calibrated_experts_generate_save_load(config, tmp_path):
    model = _model("gpt_oss")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    q = quantize(copy.deepcopy(model), config, _calib(), quiet=True)
    experts = [m for m in q.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(e.mode == config.mode for e in experts)
    logits = q(ids).logits
    assert _rel(logits, ref) < 0.1
    assert q.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 12)
    save_quantized(q, tmp_path)
    loaded = load_quantized(_model("gpt_oss", seed=7), tmp_path)
    assert torch.equal(loaded(ids).logits, logits)


def test_bf16_static_smoothed_experts_keep_float32_scales():
    model = _model("mixtral").to(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    q = quantize(copy.deepcopy(model), PTQConfig(**STATIC, outliers="smooth"), _calib(), quiet=True)
    qe = _experts(q).ptqrt_experts
    assert all(t.dtype == torch.float32 for n, t in qe.named_buffers() if n.endswith("scale"))
    q.half()
    assert all(t.dtype == torch.float32 for n, t in qe.named_buffers() if n.endswith("scale"))
    q.to(torch.bfloat16)
    assert _rel(q(ids).logits, ref) < 0.1


def test_a_failure_while_calibrating_experts_puts_the_model_back(monkeypatch):
    """The second layer's experts fail to quantize: the first layer's experts (attached by then), its
    linears and its folded norms all go back, and the model computes what it did."""
    from ptqrt import layerwise_experts

    model = _model("mixtral")
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    ref = model(ids).logits
    state = {n: t.clone() for n, t in model.state_dict().items()}
    real, calls = layerwise_experts.quantized, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)
    monkeypatch.setattr(layerwise_experts, "quantized", second_fails)
    with pytest.raises(RuntimeError, match="boom") as info:
        quantize(model, PTQConfig(**STATIC, outliers="smooth"), _calib(), quiet=True)
    assert "put back" in str(info.value.__notes__)
    assert not any(isinstance(m, QuantExperts) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert torch.equal(model(ids).logits, ref)


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


def test_files_before_expert_smoothing_load_and_a_bad_smooth_field_is_refused(tmp_path):
    import json

    q = quantize(_model("mixtral"), PTQConfig(act_dtype="int8"), quiet=True)
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    save_quantized(q, tmp_path)
    path = tmp_path / DESCRIPTION
    desc = json.loads(path.read_text())
    names = [n for n, d in desc["modules"].items() if d.get("kind") == "experts"]
    for n in names:
        assert desc["modules"][n].pop("smooth") is False
    path.write_text(json.dumps(desc))  # as written before experts could be smoothed
    assert torch.equal(load_quantized(_model("mixtral", seed=3), tmp_path)(ids).logits, q(ids).logits)
    desc["modules"][names[0]]["smooth"] = "yes"
    path.write_text(json.dumps(desc))
    with pytest.raises(FormatError, match="smooth must be true or false"):
        load_quantized(_model("mixtral"), tmp_path)
    desc["modules"][names[0]]["smooth"] = True  # the file holds no smoothing factors
    path.write_text(json.dumps(desc))
    with pytest.raises(FormatError, match="gate_up_proj_smooth_scale' is missing"):
        load_quantized(_model("mixtral"), tmp_path)


def test_inspect_shows_the_experts_input_and_smoothing_ranges(tmp_path, capsys):
    from ptqrt import cli

    save_quantized(quantize(_model("mixtral"), PTQConfig(**STATIC, outliers="smooth"), _calib(), quiet=True), tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("model.layers.1.mlp.experts.down_proj"))
    assert "W8A8" in row and "4x64x96" in row and "weight[" in row and "input[" in row and "smooth[" in row


def test_padding_stays_out_of_a_shared_experts_statistics():
    """Qwen2-MoE's shared expert (and its gate) read the MoE block's flattened [B * T, H] input: padded
    positions are left out of their statistics too. The pad token's embedding made a one-channel spike
    changes no static scale of the model (right padding: the real tokens do not see the padding)."""
    cfg = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                      shared_expert_intermediate_size=96)
    g = torch.Generator().manual_seed(9)
    ids = torch.full((2, 16), 5)
    mask = torch.zeros(2, 16, dtype=torch.long)
    for b, n in enumerate((14, 9)):
        ids[b, :n], mask[b, :n] = torch.randint(6, VOCAB, (n,), generator=g), 1
    scales = []
    for spike in (False, True):
        torch.manual_seed(0)
        model = transformers.Qwen2MoeForCausalLM(cfg).eval()
        if spike:
            emb = model.get_input_embeddings().weight.data
            emb[5] = 0
            emb[5, 3] = 100.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize(model, PTQConfig(**STATIC), [{"input_ids": ids, "attention_mask": mask}], quiet=True)
        scales.append({n: t for n, t in q.state_dict().items() if n.endswith("input_scale")})
    assert any("shared_expert.gate_proj" in n for n in scales[0]) and any("ptqrt_experts" in n for n in scales[0])
    for n, t in scales[0].items():
        torch.testing.assert_close(scales[1][n], t, rtol=1e-5, atol=0, msg=n)


def test_smoothed_gptq_experts_quantize_w_times_s_with_the_smoothed_hessian():
    from ptqrt.algorithms import gptq

    """Smoothing and GPTQ together: each expert's GPTQ runs on W·s with the Hessian of x / s (the test's
    own GPTQ on those gives the same codes), so the stored weights over s are W, and on the expert's own
    rows they beat RTN of W·s."""
    model, calib = _model("mixtral"), _calib()
    want = _layer0_inputs(model, calib)
    q = quantize(copy.deepcopy(model), PTQConfig(act_dtype="int8", outliers="smooth", precision_recovery="gptq"), calib,
                 quiet=True)
    qe = _experts(q).ptqrt_experts
    for p, rows in want.items():
        err = {"gptq": 0.0, "rtn": 0.0}
        for e, x in rows.items():
            w, s = _float_weight(_experts(model), p, e), getattr(qe, f"{p}_smooth_scale")[e]
            deq = dequantize_weight(getattr(qe, p)[e], getattr(qe, f"{p}_scale")[e])
            assert _rel(deq / s, w) < 0.02
            rtn = dequantize_weight(*quantize_weight(w * s))
            ref = x.float() @ w.T
            err["gptq"] += ((x.float() / s @ deq.T - ref) ** 2).sum().item()
            err["rtn"] += ((x.float() / s @ rtn.T - ref) ** 2).sum().item()
            H = gptq.accumulate_hessian(None, x.float() / s, 0)[0]  # of the smoothed rows, in one batch
            again = gptq.gptq_quantize(w * s, H)[0]  # (the model's sums came per sample: a few codes may differ)
            mismatch = (again != getattr(qe, p)[e]).float().mean().item()
            assert mismatch < 0.02, (p, e, mismatch)
        assert err["gptq"] < 0.9 * err["rtn"], (p, err)


@pytest.mark.parametrize("outliers", ["none", "smooth"])
def test_percentile_experts_take_the_quantile_of_their_own_rows(outliers):
    """act_observer="percentile": each expert's static scale is the quantile of |x / s| over exactly the
    rows routed to it (s its own smoothing vector, or 1), below the max of those rows."""
    from ptqrt.observers import percentile_absmax
    from ptqrt.reference import absmax_scale

    model, calib = _model("mixtral"), _calib()
    want = _layer0_inputs(model, calib)
    cfg = PTQConfig(**STATIC, outliers=outliers, act_observer="percentile", act_percentile=0.99)
    qe = _experts(quantize(copy.deepcopy(model), cfg, calib, quiet=True)).ptqrt_experts
    assert qe.smooth == (outliers == "smooth")
    for p, rows in want.items():
        for e, x in rows.items():
            s = getattr(qe, f"{p}_smooth_scale")[e] if qe.smooth else torch.ones(x.shape[1])
            got = getattr(qe, f"{p}_input_scale")[e]
            torch.testing.assert_close(got, absmax_scale(percentile_absmax(x / s, 0.99)), rtol=1e-5, atol=0)
            assert got < absmax_scale((x / s).abs().amax())


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_gptq_hessians_in_rounds_of_experts_give_the_same_model(arch, monkeypatch):
    """Experts whose Hessians would not fit the budget get them in rounds, one float pass over the layer
    each: the model is the same, bit for bit, as with every Hessian at once; each round holds its own
    experts' Hessians only."""
    import ptqrt.layerwise as lw
    import ptqrt.layerwise_experts as lwe

    model = _model(arch)
    cfg = PTQConfig(**STATIC, outliers="smooth", precision_recovery="gptq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = quantize(copy.deepcopy(model), cfg, _calib(), quiet=True)
    experts = _experts(model)
    per_expert = sum(w.shape[2] ** 2 * 4 for w in expert_weights(experts).values())
    assert lwe.expert_rounds({"e": (experts, cfg)}, budget=4 * per_expert) == [None]
    assert lwe.expert_rounds({"e": (experts, cfg)}, budget=3 * per_expert) == [{0, 1, 2}, {3}]
    assert lwe.expert_rounds({"e": (experts, PTQConfig(**STATIC))}, budget=1) == [None]  # no GPTQ
    monkeypatch.setattr(lwe, "HESSIAN_BUDGET", 2 * per_expert)
    passes, held = [], []
    observe = lw._observe

    def spy(*a, **k):
        # the experts' Hessians of every earlier pass are let go before the next pass starts
        assert not any(isinstance(key, tuple) for st in held for key in st.hessian)
        st = observe(*a, **k)
        passes.append((k.get("hessian_experts"), k.get("hessians_only", False),
                       sorted({key[2] for key in st.hessian if isinstance(key, tuple)})))
        held.append(st)
        return st

    monkeypatch.setattr(lw, "_observe", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = quantize(copy.deepcopy(model), cfg, _calib(), quiet=True)
    n_layers = model.config.num_hidden_layers
    assert passes == [({0, 1}, False, [0, 1]), ({2, 3}, True, [2, 3])] * n_layers
    sw, sg = want.state_dict(), got.state_dict()
    assert sorted(sw) == sorted(sg)
    for name in sw:
        assert torch.equal(sw[name], sg[name]), name


def test_rounds_run_every_experts_module_as_the_first_pass(monkeypatch):
    """A layer with two experts modules, the first without GPTQ feeding the second with it: a later round's
    pass runs the first through the same observed forward as the first pass did (its own forward rounds
    differently and moved the second's Hessians), so rounds still give the model of one round."""
    import ptqrt.layerwise_experts as lwe

    class Two(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.first, self.second = a, b

        def forward(self, x):
            return self.second(self.first(x))

    model = _model("mixtral")
    for i, layer in enumerate(model.model.layers):
        torch.manual_seed(50 + i)
        other = copy.deepcopy(layer.mlp)
        for p in other.parameters():
            p.data.normal_(0, 0.05)
        layer.mlp = Two(other, layer.mlp)
    cfg = PTQConfig(**STATIC, precision_recovery="gptq", layer_policies={"first.experts": PTQConfig(**STATIC)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = quantize(copy.deepcopy(model), cfg, _calib(), quiet=True)
        per_expert = sum(w.shape[2] ** 2 * 4 for w in expert_weights(model.model.layers[0].mlp.second.experts).values())
        monkeypatch.setattr(lwe, "HESSIAN_BUDGET", per_expert)
        import ptqrt.layerwise as lw

        later = []
        observe = lw._observe

        def spy(block, prefix, names, calls, device, quiet, masks=None, experts=None, **k):
            if k.get("hessians_only"):
                later.append(sorted(n.rpartition("mlp.")[2] for n in experts))
            return observe(block, prefix, names, calls, device, quiet, masks, experts, **k)

        monkeypatch.setattr(lw, "_observe", spy)
        got = quantize(copy.deepcopy(model), cfg, _calib(), quiet=True)
    assert later and all(names == ["first.experts", "second.experts"] for names in later)
    sw, sg = want.state_dict(), got.state_dict()
    assert [n for n in sw if not torch.equal(sw[n], sg[n])] == []
