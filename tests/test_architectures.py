"""quantize + generate + save/load on small random-init Hugging Face decoders (no downloads)."""
import copy

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ptqrt import PTQConfig, QuantLinear, load_quantized, quantize, save_quantized  # noqa: E402

VOCAB = 97


def _llama_like(cls_name, cfg_name, **extra):
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          **extra)
    return getattr(transformers, cls_name), cfg


ARCHS = {
    "llama": lambda: _llama_like("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": lambda: _llama_like("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": lambda: _llama_like("Qwen3ForCausalLM", "Qwen3Config", head_dim=16),
    "mistral": lambda: _llama_like("MistralForCausalLM", "MistralConfig", sliding_window=None),
    "gpt2": lambda: (transformers.GPT2LMHeadModel,
                     transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    # sliding-window layers (window 8 < the 13 tokens generated), logit softcapping, (1 + γ) norms
    "gemma2": lambda: _llama_like("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=8),
    "phi3": lambda: _llama_like("Phi3ForCausalLM", "Phi3Config", pad_token_id=0),  # fused qkv / gate_up
    "mixtral": lambda: _llama_like("MixtralForCausalLM", "MixtralConfig", num_local_experts=4,
                                   num_experts_per_tok=2),  # experts
    "gpt_neox": lambda: (transformers.GPTNeoXForCausalLM,  # parallel residual, fused qkv, partial rotary
                         transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=128)),
    "opt": lambda: (transformers.OPTForCausalLM,
                    transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)),
}


def _build(arch, seed=0):
    cls, cfg = ARCHS[arch]()
    torch.manual_seed(seed)
    return cls(cfg).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 12), generator=g)} for _ in range(3)]


CONFIGS = {
    "w8a16+kv_dynamic": PTQConfig(kv_cache_dtype="int8"),
    "w8a8_static_smooth+kv_static": PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth",
                                              kv_cache_dtype="int8", kv_granularity="per_channel"),
    "gptq+w8a8_dynamic": PTQConfig(act_dtype="int8", precision_recovery="gptq"),
}


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_generate_round_trip(arch, cfg_name, tmp_path):
    from ptqrt.integrations.hf import Int8KVCache

    model = _build(arch)
    cfg = CONFIGS[cfg_name]
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    ref_logits = model(ids).logits
    q = quantize(copy.deepcopy(model), cfg, _calib(), quiet=True)
    qlin = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(qlin) >= 2 * 4 and not any("lm_head" in n for n in qlin), qlin  # GPT-2's Conv1D too
    logits = q(ids).logits
    assert ((logits - ref_logits).norm() / ref_logits.norm()) < 0.1
    out = q.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (1, 13)
    if cfg.kv_cache_dtype == "int8":
        assert isinstance(out.past_key_values, Int8KVCache)
    save_quantized(q, tmp_path)
    loaded = load_quantized(_build(arch, seed=7), tmp_path)
    assert torch.equal(loaded(ids).logits, logits)
    again = loaded.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(again.sequences, out.sequences)
    if cfg.kv_cache_dtype == "int8":
        assert isinstance(again.past_key_values, Int8KVCache)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_cast_after_quantize_with_int8_kv_cache_round_trips(dtype, tmp_path):
    """.to(dtype) after quantize leaves the KV cache's static scales (and the linears' scales) float32;
    generate runs on the int8 cache and the save loads back into a model cast the same way."""
    from ptqrt.integrations.hf import Int8KVCache
    from ptqrt.modules.kv_cache import KVCacheQuant

    cfg = PTQConfig(act_dtype="int8", kv_cache_dtype="int8", kv_granularity="per_channel")
    q = quantize(_build("llama"), cfg, _calib(), quiet=True).to(dtype)
    kvq = [m for m in q.modules() if isinstance(m, KVCacheQuant)]
    assert len(kvq) == 2 and all(m.k_scale.dtype == m.v_scale.dtype == torch.float32 for m in kvq)
    assert all(m.weight_scale.dtype == torch.float32 for m in q.modules() if isinstance(m, QuantLinear))
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    out = q.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.past_key_values, Int8KVCache)
    logits = q(ids).logits
    assert logits.dtype == dtype
    save_quantized(q, tmp_path)
    loaded = load_quantized(_build("llama", seed=7).to(dtype), tmp_path)
    assert torch.equal(loaded(ids).logits, logits)
    again = loaded.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(again.sequences, out.sequences)


def _same(model, before_types, before_state):
    return [type(m) for m in model.modules()] == before_types and model.state_dict().keys() == before_state.keys() \
        and all(torch.equal(t, before_state[n]) for n, t in model.state_dict().items())


def test_load_refuses_a_model_that_cannot_take_the_kv_cache_before_changing_it(tmp_path):
    from ptqrt import FormatError

    q = quantize(_build("llama"), PTQConfig(kv_cache_dtype="int8"), quiet=True)
    save_quantized(q, tmp_path)
    fresh = _build("llama", seed=7)
    fresh.config._attn_implementation = "flex_attention"
    types, state = [type(m) for m in fresh.modules()], copy.deepcopy(fresh.state_dict())
    with pytest.raises(FormatError, match=r"quantization_description.json holds an int8 KV cache .*'flex_attention'"):
        load_quantized(fresh, tmp_path)
    assert _same(fresh, types, state) and fresh.config._attn_implementation == "flex_attention"


@pytest.mark.parametrize("case", ["not_hf", "flex_attention", "empty_calib"])
def test_quantize_checks_kv_cache_prerequisites_before_changing_the_model(case):
    from tests.models import tiny_net

    if case == "not_hf":
        model, cfg, data, err, match = tiny_net(), PTQConfig(kv_cache_dtype="int8"), None, TypeError, "PreTrainedModel"
    else:
        model = _build("llama")
        cfg = PTQConfig(act_dtype="int8", act_granularity="per_tensor", kv_cache_dtype="int8")
        data, err, match = _calib(), ValueError, "'flex_attention' is not supported"
        if case == "flex_attention":
            model.config._attn_implementation = "flex_attention"
        else:
            cfg = PTQConfig(kv_cache_dtype="int8", kv_granularity="per_channel")
            data, match = [], "calib_data is empty"
    types, state = [type(m) for m in model.modules()], copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=match):
        quantize(model, cfg, data, quiet=True)
    assert _same(model, types, state) and not hasattr(model, "ptqrt_config")


@pytest.mark.parametrize("kv", [False, True], ids=["w8a8_static", "kv_static"])
def test_batch_encoding_is_one_calibration_batch(kv):
    """A tokenizer's output (BatchEncoding: a Mapping, not a dict) is one input, as a dict is."""
    from transformers import BatchEncoding

    from ptqrt.modules.kv_cache import KVCacheQuant

    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cfg = PTQConfig(kv_cache_dtype="int8", kv_granularity="per_channel") if kv else \
        PTQConfig(act_dtype="int8", act_granularity="per_tensor")
    a = quantize(_build("llama"), cfg, dict(sample), quiet=True)
    b = quantize(_build("llama"), cfg, BatchEncoding(sample), quiet=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert any(isinstance(m, KVCacheQuant if kv else QuantLinear) for m in b.modules())


@pytest.mark.parametrize("dims", [3, 2])
def test_weights_left_float_outside_linears_are_warned_about(dims, recwarn):
    """Weights outside nn.Linear that quantize leaves float (experts stored as one 3-D tensor in a module
    that is not one of transformers' experts modules, or as 2-D ones, as DBRX's) are named in a warning,
    the largest first; embeddings are not, nor anything skipped."""
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 64, 64) if dims == 3 else torch.randn(8 * 64, 64))
            self.fc = torch.nn.Linear(64, 64)
            self.emb = torch.nn.Embedding(4096, 64)
            self.small = torch.nn.Parameter(torch.randn(4, 16))

    with pytest.warns(RuntimeWarning, match=re.escape("tensors outside linears that stay float (['0.w', '0.small'])")):
        quantize(torch.nn.Sequential(Experts()), PTQConfig(), quiet=True)
    recwarn.clear()
    quantize(torch.nn.Sequential(Experts()), PTQConfig(skip=["0"]), quiet=True)
    assert not [w for w in recwarn if "outside linears" in str(w.message)]

    class ViT(torch.nn.Module):  # a position table: small against the model, the int8 weights included
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.randn(1, 16, 64))
            self.fc = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(8))

    quantize(ViT(), PTQConfig(), quiet=True)
    assert not [w for w in recwarn if "outside linears" in str(w.message)]
