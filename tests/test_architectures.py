"""quantize + generate + save/load on small random-init Hugging Face decoders (no downloads)."""
import copy

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
    out = q.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (1, 13)
    if cfg.kv_cache_dtype == "int8":
        assert isinstance(out.past_key_values, Int8KVCache)
    save_quantized(q, tmp_path)
    loaded = load_quantized(_build(arch, seed=7), tmp_path)
    assert torch.equal(loaded(ids).logits, logits)
    again = loaded.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(again.sequences, out.sequences)
    if cfg.kv_cache_dtype == "int8":
        assert isinstance(again.past_key_values, Int8KVCache)
