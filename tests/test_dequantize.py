"""ptqrt.dequantize and transformers' model.dequantize(): float modules holding what the int8 weights hold
(not the float weights quantize started from), every record of the quantization gone, and the model
saving and loading as the float model of its class."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import ptqrt
from ptqrt import PTQConfig, QuantLinear, quantize, save_quantized
from ptqrt.modules.experts import QuantExperts
from ptqrt.modules.kv_cache import KVCacheQuant

from models import calib, tiny_net

STATIC = dict(act_dtype="int8", act_granularity="per_tensor")


def _ptqrt_modules(model):
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("ptqrt")]


@pytest.mark.parametrize("cfg", [PTQConfig(skip=[]), PTQConfig(weight_granularity="per_group", group_size=16, skip=[]),
                                 PTQConfig(act_dtype="int8", outliers="smooth"), PTQConfig(**STATIC)],
                         ids=["w8a16", "w8a16_g16", "dynamic_smooth", "static"])
def test_each_linear_becomes_the_float_linear_of_its_int8_weights(cfg):
    f = tiny_net()
    q = quantize(copy.deepcopy(f), cfg, calib(), quiet=True)
    held = {n: (m.dequantized_weight(), m.bias) for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    ids = calib(1, seed=7)[0]
    y_q = q(ids)
    assert ptqrt.dequantize(q) is q
    assert not _ptqrt_modules(q) and not hasattr(q, "ptqrt_config")
    for n, (w, b) in held.items():
        lin = q.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32 and lin.weight.requires_grad
        assert torch.equal(lin.weight, w), n  # the int8 weights times the scales, smoothing divided out
        assert not torch.equal(lin.weight, f.get_submodule(n).weight), n  # not the float weights it came from
        assert (lin.bias is None) == (b is None) and (b is None or torch.equal(lin.bias, b))
    y_d = q(ids)
    if cfg.act_dtype == "none":  # W8A16 computes x @ dequant(W)^T: the float model does the same sums
        torch.testing.assert_close(y_d, y_q, rtol=1e-5, atol=1e-5)
    else:  # only the activations' rounding differs
        assert 0 < (y_d - y_q).abs().max() < 0.1 * y_q.abs().max()
    assert (y_d - f(ids)).abs().max() < 0.05 * f(ids).abs().max()


def test_dtype_shared_linears_and_refusals():
    f = tiny_net()
    f.blocks[1].fc1 = f.blocks[0].fc1  # one linear under two names
    q = quantize(f, PTQConfig(), quiet=True)
    assert q.blocks[0].fc1 is q.blocks[1].fc1 and isinstance(q.blocks[0].fc1, QuantLinear)
    ptqrt.dequantize(q, torch.bfloat16)
    assert q.blocks[0].fc1 is q.blocks[1].fc1 and type(q.blocks[0].fc1) is nn.Linear
    assert {m.weight.dtype for m in q.modules() if type(m) is nn.Linear and m is not q.lm_head} == {torch.bfloat16}
    assert q.blocks[0].fc1.bias.dtype == torch.bfloat16
    assert q.lm_head.weight is q.embed.weight  # skipped by default: still the tied float head
    with pytest.raises(TypeError, match="floating torch.dtype"):
        ptqrt.dequantize(q, torch.int8)
    with pytest.raises(TypeError, match="nn.Module"):
        ptqrt.dequantize("model")
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        ptqrt.dequantize(QuantLinear.from_float(nn.Linear(8, 4), PTQConfig()))
    assert ptqrt.dequantize(nn.Sequential(nn.Linear(3, 2))) is not None  # a float model: nothing to do


def test_each_int8_linear_is_freed_once_replaced(monkeypatch):
    """The int8 and the float weights of the whole model are never held at once: when each float linear
    is made, the QuantLinears replaced before it are gone."""
    import gc
    import sys
    import weakref

    dq = sys.modules["ptqrt.dequantize"]  # (ptqrt.dequantize is the function)

    q = quantize(tiny_net(), PTQConfig(skip=[]), quiet=True)
    refs = [weakref.ref(m) for m in q.modules() if isinstance(m, QuantLinear)]
    live, made = [], dq._linear

    def counting(*args, **kwargs):
        gc.collect()
        live.append(sum(r() is not None for r in refs))
        return made(*args, **kwargs)

    monkeypatch.setattr(dq, "_linear", counting)
    ptqrt.dequantize(q)
    gc.collect()
    assert len(refs) == 5 and live == [5, 4, 3, 2, 1] and not any(r() for r in refs)


def test_a_linear_without_bias_takes_the_models_float_dtype():
    q = quantize(tiny_net().to(torch.bfloat16), PTQConfig(), quiet=True)
    ptqrt.dequantize(q)
    assert q.blocks[0].fc2.bias is None and q.blocks[0].fc2.weight.dtype == torch.bfloat16


transformers = pytest.importorskip("transformers")

from test_experts import _model as moe_model  # noqa: E402
from test_experts_llama4 import _model as llama4_model  # noqa: E402
from test_hf_kv_cache import make_model  # noqa: E402

HF = {
    "llama_static_kv8": (lambda: make_model("llama"), PTQConfig(**STATIC, outliers="smooth", kv_cache_dtype="int8",
                                                                 kv_granularity="per_channel"), 96),
    "gpt2_dynamic_head": (lambda: make_model("gpt2"), PTQConfig(act_dtype="int8", skip=[]), 96),
    "mixtral_static_smooth": (lambda: moe_model("mixtral"), PTQConfig(**STATIC, outliers="smooth"), 97),
    "gptoss_w8a16_g16": (lambda: moe_model("gpt_oss"), PTQConfig(weight_granularity="per_group", group_size=16), 97),
    "llama4_w8a16": (llama4_model, PTQConfig(), 97),
}


def _calib(vocab):
    return [torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _ids(vocab):
    return torch.randint(1, vocab, (1, 7), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("case", list(HF))
def test_transformers_dequantize_gives_a_float_model_of_its_class(case, tmp_path):
    build, cfg, vocab = HF[case]
    f = build()
    ids = _ids(vocab)
    packed = save_quantized(quantize(copy.deepcopy(f), cfg, _calib(vocab), quiet=True), tmp_path / "packed")
    expected = ptqrt.dequantize(quantize(copy.deepcopy(f), cfg, _calib(vocab), quiet=True))
    r = transformers.AutoModelForCausalLM.from_pretrained(str(packed))
    y_q = r(ids).logits
    assert r.dequantize() is r
    assert not _ptqrt_modules(r) and not r.is_quantized and not hasattr(r, "hf_quantizer")
    assert not hasattr(r.config, "quantization_config") and not hasattr(r, "ptqrt_config")
    sr, se = r.state_dict(), expected.state_dict()
    assert sorted(sr) == sorted(se)
    for n in sr:  # the same float model as ptqrt.dequantize of the model quantized in memory
        assert sr[n].dtype == se[n].dtype and torch.equal(sr[n], se[n]), n
    assert sorted(sr) == sorted(f.state_dict())  # the float class's own tensors, in its own layouts
    for n, t in f.state_dict().items():
        assert sr[n].shape == t.shape, n
    y = r(ids).logits
    if cfg.act_dtype == "none":
        torch.testing.assert_close(y, y_q, rtol=1e-4, atol=1e-4)
    assert (y - f(ids).logits).abs().max() < 0.1 * f(ids).logits.abs().max()
    out = generated = r.generate(ids, max_new_tokens=4, do_sample=False)  # no int8 KV cache left to run
    assert generated.shape == (1, 11)
    r.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "float"))
    assert not _ptqrt_modules(back)
    torch.testing.assert_close(back(ids).logits, y, rtol=0, atol=0)
    assert torch.equal(back.generate(ids, max_new_tokens=4, do_sample=False), out)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("wrapped", [False, True])
def test_gpt2_conv1d_comes_back_and_a_quantized_tied_head_stays_untied(wrapped, tmp_path):
    """SmoothQuant folds the head's factors into the final norm: the head holds W·s, and the embedding W
    cannot stand in for it (tied again, the logits were 85% off). Inside a wrapper module too."""
    f = make_model("gpt2")
    assert f.lm_head.weight is f.transformer.wte.weight and f.config.tie_word_embeddings
    cal, ids = _calib(96), _ids(96)
    model = Wrapper(copy.deepcopy(f)).eval() if wrapped else copy.deepcopy(f)
    quantize(model, PTQConfig(act_dtype="int8", outliers="smooth", skip=[]), cal, quiet=True)
    g = model.lm if wrapped else model
    assert isinstance(g.lm_head, QuantLinear) and g.lm_head.smooth_scale is None  # folded into ln_f
    y_q = g(ids).logits
    ptqrt.dequantize(model)
    conv1d = transformers.pytorch_utils.Conv1D
    assert type(g.transformer.h[0].attn.c_attn) is conv1d and g.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    assert type(g.transformer.h[0].attn.c_proj) is conv1d  # square: a transposed nn.Linear would load silently
    assert type(g.lm_head) is nn.Linear and g.lm_head.weight is not g.transformer.wte.weight
    assert g.config.tie_word_embeddings and "lm_head.weight" not in g.all_tied_weights_keys
    y = g(ids).logits
    assert _rel(y, y_q) < 0.05 and _rel(y, f(ids).logits) < 0.05
    g.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path))
    assert back.lm_head.weight is not back.transformer.wte.weight
    torch.testing.assert_close(back(ids).logits, y, rtol=0, atol=0)


class Wrapper(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids).logits


def _seq2seq(arch):
    torch.manual_seed(0)
    if arch == "bart":  # encoder and decoder embeddings tied to the shared one, under tie_word_embeddings
        return transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128)).eval()
    return transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
        vocab_size=96, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
        expert_capacity=8, decoder_start_token_id=0, encoder_sparse_step=2, decoder_sparse_step=2)).eval()


@pytest.mark.parametrize("arch", ["bart", "switch"])
def test_ties_between_float_embeddings_and_the_config_stay(arch, tmp_path):
    """Only the ties into quantized modules go: BART's float embeddings stay tied through save and load
    (they were lost when the config's tie_word_embeddings was turned off), and Switch Transformers, whose
    forward scales its output by that flag, computes as before."""
    f = _seq2seq(arch)
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(9))
    x = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    q = quantize(copy.deepcopy(f), PTQConfig(skip=[]), [x], quiet=True)
    y_q = q(**x).logits
    ptqrt.dequantize(q)
    assert q.config.tie_word_embeddings == f.config.tie_word_embeddings
    y = q(**x).logits
    assert _rel(y, y_q) < 1e-5 and _rel(y, f(**x).logits) < 0.1  # W8A16: the same sums
    q.save_pretrained(tmp_path)
    back = type(f).from_pretrained(str(tmp_path))
    torch.testing.assert_close(back(**x).logits, y, rtol=0, atol=0)
    if arch == "bart":
        assert back.model.encoder.embed_tokens.weight is back.model.shared.weight


def test_a_cast_then_model_dequantize_takes_the_cast_dtype(tmp_path):
    """transformers passes config.dtype (the dtype it loaded) when no dtype is given; after .to(bf16) that
    would make float32 linears among bf16 ones."""
    build, cfg, vocab = HF["llama_static_kv8"]
    packed = save_quantized(quantize(build(), cfg, _calib(vocab), quiet=True), tmp_path / "packed")
    r = transformers.AutoModelForCausalLM.from_pretrained(str(packed)).to(torch.bfloat16)
    assert r.config.dtype == torch.float32
    r.dequantize()
    assert {p.dtype for p in r.parameters()} == {torch.bfloat16}
    assert r(_ids(vocab)).logits.dtype == torch.bfloat16
    r2 = transformers.AutoModelForCausalLM.from_pretrained(str(packed))
    r2.dequantize(dtype="float16")  # asked for (a name, as configs give it): the new linears take it
    assert r2.model.layers[0].mlp.up_proj.weight.dtype == torch.float16


def test_t5_stacks_lose_their_copies_of_the_quantization_config(tmp_path):
    torch.manual_seed(0)
    f = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval()
    packed = save_quantized(quantize(f, PTQConfig(), quiet=True), tmp_path / "packed")
    r = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(packed))
    assert hasattr(r.encoder.config, "quantization_config")
    r.dequantize()
    for m in (r, r.encoder, r.decoder):
        assert not hasattr(m.config, "quantization_config") and not getattr(m.config, "_is_quantized", False)
    assert not _ptqrt_modules(r)
    r.encoder.save_pretrained(tmp_path / "encoder")
    assert "quantization_config" not in json.loads((tmp_path / "encoder" / "config.json").read_text())


def test_int8_kv_cache_and_experts_wiring_are_undone():
    llama = quantize(make_model("llama"), PTQConfig(kv_cache_dtype="int8"), quiet=True)
    assert any(isinstance(m, KVCacheQuant) for m in llama.modules())
    ptqrt.dequantize(llama)
    assert not _ptqrt_modules(llama) and not llama.config._attn_implementation.startswith("ptqrt")
    assert "_prepare_cache_for_generation" not in llama.__dict__
    mixtral = quantize(moe_model("mixtral"), PTQConfig(), quiet=True)
    assert mixtral.config._experts_implementation == "ptqrt_int8"
    ptqrt.dequantize(mixtral)
    assert mixtral.config._experts_implementation == mixtral.get_correct_experts_implementation(None)
    l4 = quantize(llama4_model(), PTQConfig(), quiet=True)
    experts = [m for m in l4.modules() if type(m).__name__ == "Llama4TextExperts"]
    assert experts and all("forward" in m.__dict__ for m in experts)
    ptqrt.dequantize(l4)
    assert all("forward" not in m.__dict__ and not any(isinstance(c, QuantExperts) for c in m.children())
               for m in experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the routers stay float, as in any Llama-4
        quantize(l4, PTQConfig(), quiet=True)  # the float experts quantize again, as any float model's
    assert all(isinstance(m.ptqrt_experts, QuantExperts) for m in experts)
