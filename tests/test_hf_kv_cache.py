"""The int8 KV cache on Hugging Face models: tiny random-init configs built here (no downloads), CPU.

Accuracy is judged on logits: each generated step's logits against a float forward over the same
tokens (no cache), relative error ||a - b|| / ||b||. Greedy tokens of a random tiny model flip on
near-ties and say little."""
import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ptqrt.ops as ops  # noqa: E402
from ptqrt.integrations import hf  # noqa: E402
from ptqrt.integrations.hf import Int8KVCache, apply_int8_kv_cache, reattach  # noqa: E402
from ptqrt.modules.kv_cache import KVCacheQuant, PagedInt8KV  # noqa: E402
from ptqrt.quantize import set_submodule  # noqa: E402
from ptqrt.reference import dequantize_kv, int8_kv_decode_attention  # noqa: E402

VOCAB = 96
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "opt")
# Measured worst decode step over 2 seeds per arch (make_model below): dynamic per-token-head scales
# move the logits by 0.5-1.3%, static per-channel scales (256 calibration tokens) by 1.1-2.1%. A
# softmax scale off by 30% moves them by 8-29%; a wrong position or head mapping by more.
TOL = {"per_token": 0.03, "per_channel": 0.05}


def make_model(arch: str, seed: int = 0, **over):
    """initializer_range 0.1 (not 0.02) gives attention that is far from uniform, so that a wrong
    softmax scale or a missing token moves the logits by 10-30% instead of <1%."""
    torch.manual_seed(seed)
    over.setdefault("initializer_range", 0.1)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **over)
        cls = transformers.GPT2LMHeadModel
    elif arch == "opt":
        cfg = transformers.OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64, **over)
        cls = transformers.OPTForCausalLM
    else:
        extra = dict(intermediate_size=128, num_key_value_heads=2)
        cfg_cls, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[arch]
        if arch == "qwen3":
            extra["head_dim"] = 16
        cfg = cfg_cls(**common, **extra, **over)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def calib_batches(n=4, seed=1):
    """256 tokens: enough to see most of the vocabulary, as static scales need."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (4, 16), generator=g) for _ in range(n)]


@pytest.fixture
def calls(monkeypatch):
    """Counts the ptqrt ops the cache runs (whatever backend `auto` picks underneath): the backend
    function `ops.resolve` hands out, which both the public ops and the store's direct calls run."""
    n = {"decode": 0, "append": 0}
    names = {"int8_kv_decode_attention": "decode", "kv_cache_append": "append"}
    real = ops.resolve

    def resolve(op, device, m=1):
        backend, fn = real(op, device, m)
        if op not in names:
            return backend, fn

        def counted(*a, **k):
            n[names[op]] += 1
            return fn(*a, **k)
        return backend, counted

    monkeypatch.setattr(ops, "resolve", resolve)
    return n


def returned_cache(out):
    """The cache a forward/generate output carries ("cache" in transformers >= 5.2x, "past_key_values" before)."""
    for name in ("cache", "past_key_values"):
        if name in out.keys():
            return out[name]
    return None


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def float_logits(model, ids, mask=None):
    """Logits of a float forward over the whole sequence, positions as generate() makes them."""
    if mask is None:
        mask = torch.ones_like(ids)
    return model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits.float()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def step_errors(out, ref, prompt_len, rows=None):
    rows = slice(None) if rows is None else rows
    return [rel(lg[rows], ref[rows, prompt_len - 1 + i]) for i, lg in enumerate(out.logits)]


# ----------------------------------------------------------------------------- generate, every arch
@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_uses_int8_cache(arch, granularity, calls):
    model = make_model(arch)
    apply_int8_kv_cache(model, granularity, calib_batches() if granularity == "per_channel" else None, quiet=True)
    n_layers = model.config.num_hidden_layers
    kvq = [m for m in model.modules() if isinstance(m, KVCacheQuant)]
    assert len(kvq) == n_layers and all(q.granularity == granularity for q in kvq)
    assert all((q.k_scale is not None) == (granularity == "per_channel") for q in kvq)

    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    new = 8
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, min_new_tokens=new)
    cache = returned_cache(out)
    assert isinstance(cache, Int8KVCache)
    assert cache.get_seq_length() == 7 + new - 1
    # prefill writes the prompt (one append per layer), then one append + one decode per layer per step
    assert calls["decode"] == (new - 1) * n_layers
    assert calls["append"] == new * n_layers

    errs = step_errors(out, float_logits(model, out.sequences), 7)
    assert errs[0] < 1e-4, errs  # prefill attends over the prompt's own float K/V
    assert max(errs[1:]) < TOL[granularity], errs
    assert max(errs[1:]) > 1e-6, "decode steps match float exactly: the int8 cache was not read"


def test_generate_bfloat16():
    model = make_model("llama").to(torch.bfloat16)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         min_new_tokens=6)
    assert isinstance(returned_cache(out), Int8KVCache)
    errs = step_errors(out, float_logits(model, out.sequences), 5)
    assert max(errs) < 0.05, errs  # bf16 itself is ~1% here


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch(arch, calls):
    model = make_model(arch, seed=3)
    apply_int8_kv_cache(model, "per_token")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0: three pad tokens on the left
    new = 6
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    cache = returned_cache(out)
    assert isinstance(cache, Int8KVCache)
    assert calls["decode"] == (new - 1) * model.config.num_hidden_layers  # padding did not force the fallback
    store = cache.layers[0].store
    assert store.lens.tolist() == [9 + new - 1 - 3, 9 + new - 1]  # pad tokens were never stored
    assert cache.layers[0].valid is cache.layers[1].valid  # the bookkeeping is done once per forward
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    ref = float_logits(model, out.sequences, full_mask)
    for row in (0, 1):
        errs = step_errors(out, ref, 9, rows=slice(row, row + 1))
        assert max(errs) < TOL["per_token"], (row, errs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_runs_the_int8_kernel_on_a_ring(attn, calls):
    """A window (6) shorter than the sequence (5 + 8 tokens, one row left-padded): each sliding
    layer's store is a ring of the window, which holds exactly the tokens a decode step attends to,
    so every step past the window still runs the int8 kernel, with the float model's logits."""
    model = make_model("mistral", sliding_window=6, attn_implementation=attn)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    new = 8
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    cache = returned_cache(out)
    assert isinstance(cache, Int8KVCache) and cache.layers[0].is_sliding
    assert calls["decode"] == (new - 1) * model.config.num_hidden_layers
    store = cache.layers[0].store
    assert store.capacity == 6 and store.held() == [6, 6] and store.lens.tolist() == [3 + new - 1, 5 + new - 1]
    assert store.k_cache.shape[0] * store.block_size <= 2 * 16  # one block column of 16 per sequence
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    ref = float_logits(model, out.sequences, full_mask)
    for row in (0, 1):
        errs = step_errors(out, ref, 5, rows=slice(row, row + 1))
        assert max(errs) < TOL["per_token"], (row, errs)


def test_a_model_that_changes_its_keys_after_the_update_is_not_fused(calls):
    """JetMoe repeats the keys the cache update returns before its attention reads them: the first step
    finds that (the attention does not get the returned keys), and the decode steps then return past +
    new keys for the model to change, as an unfused cache does, instead of the new keys alone for the
    int8 kernel (which would attend to the new token only)."""
    torch.manual_seed(0)
    cfg = transformers.JetMoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=16, intermediate_size=64, num_local_experts=2, num_experts_per_tok=2,
                                    max_position_embeddings=128, initializer_range=0.1, pad_token_id=0)
    model = transformers.JetMoeForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    apply_int8_kv_cache(model, "per_token", quiet=True)
    for prompt in (7, 1):  # a one-token prompt: its first step is not fused either
        ids = torch.randint(1, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(5))
        calls.update(decode=0, append=0)
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        assert calls["decode"] == 0 and calls["append"] == 6 * 2
        assert all(layer.keys_changed for layer in returned_cache(out).layers)
        errs = step_errors(out, float_logits(model, out.sequences), prompt)
        assert max(errs) < TOL["per_token"], errs


def test_keys_changed_on_a_fused_step_raise(calls, monkeypatch):
    """A model that leaves the keys alone on its first step and changes them on a later one cannot be
    followed by the fused step: that raises rather than attend to the new token alone."""
    model = make_model("llama")
    apply_int8_kv_cache(model, "per_token", quiet=True)
    update = hf.Int8KVLayer.update
    step = {"n": 0}

    def changes_later(self, key, value, *a, **k):  # as a model changing layer 1's keys after the first step
        key_out, value_out = update(self, key, value, *a, **k)
        return (key_out * 1.0 if step["n"] and self.layer_idx == 1 else key_out), value_out

    monkeypatch.setattr(hf.Int8KVLayer, "update", changes_later)
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    cache = Int8KVCache(model)
    model(ids, past_key_values=cache)
    step["n"] = 1
    with pytest.raises(NotImplementedError, match=r"layer 1\) changed the keys between the cache update and its attention"):
        model(ids[:, :1], past_key_values=cache)


def test_cross_attention_kept_in_the_decoder_cache_is_refused_by_name():
    """Mllama's decoder layers carry a layer_idx and "Attention" in their class names: they are not taken
    for attention modules; its cross-attention layers keep the image keys in the decoder's cache by
    layer index, which the int8 cache does not store: refused, naming the module."""
    T = transformers
    vc = T.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                              attention_heads=2, image_size=28, patch_size=14, max_num_tiles=1, vision_output_dim=64,
                              intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    tc = T.MllamaTextConfig(vocab_size=VOCAB + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                            max_position_embeddings=128, pad_token_id=0)
    model = T.MllamaForConditionalGeneration(T.MllamaConfig(vision_config=vc, text_config=tc,
                                                            image_token_index=VOCAB)).eval()
    with pytest.raises(NotImplementedError, match=r"'model.language_model.layers.1.cross_attn' "
                                                  r"\(MllamaTextCrossAttention\) is a cross-attention layer"):
        apply_int8_kv_cache(model, "per_token", quiet=True)


def test_layers_whose_keys_others_read_are_refused_for_that_reason():
    """Gemma-4 without shared layers still names kv_sharing_modes ('store' for the layers whose keys an
    assistant model reads): refused for that, not for sharing another's cache."""
    cfg = transformers.Gemma4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                        num_global_key_value_heads=1, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        num_kv_shared_layers=0, hidden_size_per_layer_input=0,
                                        max_position_embeddings=128, pad_token_id=0)
    assert "reuse" not in cfg.kv_sharing_modes and "store" in cfg.kv_sharing_modes
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="whose keys other layers or models read from the cache"):
        apply_int8_kv_cache(model, "per_token", quiet=True)


def test_a_wired_model_pickles():
    import io

    model = make_model("llama", seed=1)
    apply_int8_kv_cache(model, "per_token", quiet=True)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    want = model.generate(ids, **kw)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert hf._is_wired(loaded) and hf._our_hooks(loaded)
    assert torch.equal(loaded.generate(ids, **kw), want)


def test_sliding_and_full_layers_mixed(calls):
    """Gemma-2 alternates sliding (window 4) and full layers, softcaps its logits and scales its
    queries by query_pre_attn_scalar: the full layer keeps every token, the sliding one a ring."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                    max_position_embeddings=128, pad_token_id=0, initializer_range=0.1,
                                    attn_logit_softcapping=None, attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    assert hf.layer_windows(cfg) == [4, None]
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
    new = 7
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    cache = returned_cache(out)
    assert [layer.store.capacity for layer in cache.layers] == [4, None]
    assert [layer.store.held() for layer in cache.layers] == [[4], [6 + new - 1]]
    assert calls["decode"] == (new - 1) * 2
    errs = step_errors(out, float_logits(model, out.sequences), 6)
    assert max(errs) < TOL["per_token"], errs


def test_sliding_window_fallback_paths_read_the_window():
    """Steps the kernel does not take (several tokens at once; output_attentions) read the window's
    past from the ring, and a multi-token step reads it before the ring overwrites it."""
    model = make_model("mistral", seed=5, sliding_window=4, attn_implementation="eager")
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (1, 14), generator=torch.Generator().manual_seed(11))
    cache = Int8KVCache(model)
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache)
        chunk = model(ids[:, 5:8], past_key_values=cache).logits  # 3 tokens, over a ring of 4
        step = model(ids[:, 8:9], past_key_values=cache, output_attentions=True)
    ref = float_logits(model, ids[:, :9])
    assert rel(chunk, ref[:, 5:8]) < TOL["per_token"]
    assert rel(step.logits, ref[:, 8:9]) < TOL["per_token"]
    assert step.attentions[0].shape[-1] == 4  # the window: 3 past positions and the new one


def test_sliding_window_crop():
    """Cropping a ring: one token back still leaves the window's past; further back than the ring
    holds is refused, as transformers' sliding layer does, unless past states are recorded."""
    model = make_model("mistral", seed=6, sliding_window=4)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(12))
    ref = float_logits(model, ids)
    cache = Int8KVCache(model)
    with torch.no_grad():
        model(ids[:, :10], past_key_values=cache)
        cache.crop(-1)  # 9 tokens: the ring still holds tokens 6..8
        assert rel(model(ids[:, 9:10], past_key_values=cache).logits, ref[:, 9:10]) < TOL["per_token"]
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-3)
        assert cache.get_seq_length() == 10
        recorded = Int8KVCache(model)
        recorded.activate_past_recording()
        model(ids[:, :10], past_key_values=recorded)
        recorded.crop(-4)
        assert rel(model(ids[:, 6:7], past_key_values=recorded).logits, ref[:, 6:7]) < TOL["per_token"]


def test_beam_search_on_sliding_rings():
    model = make_model("mistral", seed=7, sliding_window=4)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False,
                         return_dict_in_generate=True)
    plain = copy.deepcopy(model)
    hf.remove_int8_kv_cache(plain)
    want = plain.generate(ids, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False)
    assert out.sequences.shape == want.shape == (2, 11)


def test_layer_kinds_the_cache_cannot_store_are_refused():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(NotImplementedError, match="linear_attention"):
        hf.layer_windows(cfg)
    cfg.layer_types, cfg.kv_sharing_modes = None, ["own", "reuse"]
    with pytest.raises(NotImplementedError, match="share"):
        hf.layer_windows(cfg)
    chunked = transformers.LlamaConfig(num_hidden_layers=3)
    chunked.attention_chunk_size = 8
    assert hf.layer_windows(chunked) == [8, 8, 8]


# ----------------------------------------------------------------------------- explicit use
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_explicit_cache_manual_loop(arch, calls):
    model = make_model(arch, seed=1)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    cache = Int8KVCache(model)
    out = model(ids, past_key_values=cache, use_cache=True)
    assert returned_cache(out) is cache and cache.get_seq_length() == 6
    seq, got = ids, [out.logits[:, -1]]
    for _ in range(5):
        nxt = got[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        out = model(nxt, past_key_values=cache, use_cache=True)
        got.append(out.logits[:, -1])
    assert calls["decode"] == 5 * model.config.num_hidden_layers
    ref = float_logits(model, seq)
    errs = [rel(g, ref[:, 5 + i]) for i, g in enumerate(got)]
    assert errs[0] < 1e-4 and max(errs) < TOL["per_token"], errs


def test_explicit_cache_to_generate_and_plain_forward():
    model = make_model("qwen2")
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
    mine = Int8KVCache(model, block_size=4)
    out = model.generate(ids, past_key_values=mine, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert returned_cache(out) is mine and mine.get_seq_length() == 8
    assert mine.layers[0].store.cols >= 2  # crossed block boundaries
    # a forward that asks for a cache but passes none gets an Int8KVCache, as it would a DynamicCache
    assert isinstance(returned_cache(model(ids)), Int8KVCache)
    assert returned_cache(model(ids, use_cache=False)) is None


def test_multi_token_step_after_prefill(calls):
    """Several new tokens over a filled cache (chunked prefill, speculative decoding) run the model's
    own attention over the dequantized past + the new float K/V."""
    model = make_model("llama", seed=2)
    apply_int8_kv_cache(model, "per_channel", calib_batches())
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    cache = Int8KVCache(model)
    model(ids[:, :6], past_key_values=cache)
    out = model(ids[:, 6:], past_key_values=cache)
    assert calls["decode"] == 0 and cache.get_seq_length() == 10
    ref = float_logits(model, ids)
    assert rel(out.logits, ref[:, 6:]) < TOL["per_channel"]


def test_beam_search_runs_on_int8_cache():
    model = make_model("llama", seed=4)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False,
                         return_dict_in_generate=True)
    assert isinstance(returned_cache(out), Int8KVCache)
    assert out.sequences.shape == (2, 9)


@pytest.mark.parametrize("window", [None, 5])
def test_prompt_lookup_decoding_crops_the_cache(window):
    """Speculative steps verify several tokens at once and crop the rejected ones: afterwards the
    cache must hold exactly the returned sequence (minus its last token). With sliding-window layers,
    assisted decoding records past states (the rings are lifted) so that crop can go back."""
    model = make_model("llama", seed=8) if window is None else make_model("mistral", seed=8, sliding_window=window)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    out = model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True)
    cache, seq = returned_cache(out), out.sequences
    assert isinstance(cache, Int8KVCache) and cache.get_seq_length() == seq.shape[1] - 1
    nxt = model(seq[:, -1:], past_key_values=cache).logits[:, -1]
    assert rel(nxt, float_logits(model, seq)[:, -1]) < TOL["per_token"]


def test_assisted_decoding_keeps_a_sliding_layer_bounded():
    """Past recording keeps a sliding layer's tokens so that crop can go back; after each crop those before
    the next step's window are dropped once they are another window's worth (a 20-token prompt and 40
    new tokens held 59 tokens a layer before, for a window of 4), and the result stays right."""
    window = 4
    model = make_model("mistral", seed=3, sliding_window=window)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.tensor([[5, 6, 7, 8, 9] * 4])
    out = model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                         return_dict_in_generate=True)
    cache, seq = returned_cache(out), out.sequences
    assert cache.get_seq_length() == seq.shape[1] - 1
    for layer in cache.layers:
        assert layer.record_past and max(layer.store.held()) <= 2 * window
    nxt = model(seq[:, -1:], past_key_values=cache).logits[:, -1]
    assert rel(nxt, float_logits(model, seq)[:, -1]) < TOL["per_token"]


def test_keep_last_moves_the_held_tokens_to_the_front():
    torch.manual_seed(0)
    st = PagedInt8KV(2, 1, 8, "cpu", block_size=4)
    k = torch.randn(2, 11, 1, 8)
    st.append(k, k * 2)
    before = st.dequantize()
    st.keep_last(torch.tensor([3, 5]))
    assert st.held() == [3, 5] and st.first == [8, 6]
    st.append(k[:, :2], k[:, :2] * 2)
    assert st.held() == [5, 7]
    kk, vv = st.dequantize(lo=8)  # tokens 8 .. 12: both sequences hold them
    assert torch.equal(kk[:, :3], before[0][:, 8:11]) and torch.equal(vv[:, :3], before[1][:, 8:11])
    fresh = PagedInt8KV(2, 1, 8, "cpu", block_size=4)
    fresh.append(k[:, :2], k[:, :2] * 2)
    assert torch.equal(kk[:, 3:], fresh.dequantize()[0])
    with pytest.raises(RuntimeError, match="token 5 is gone"):
        st.dequantize(lo=5)
    with pytest.raises(ValueError, match="non-negative"):
        st.keep_last(torch.tensor([-1, 0]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eager_attention_left_padding(arch, calls):
    """eager: the mask is additive float (0 / dtype min), and the fallback is the model's own eager function."""
    model = make_model(arch, seed=2, attn_implementation="eager")
    apply_int8_kv_cache(model, "per_token")
    assert model.config._attn_implementation == "ptqrt_int8kv_eager"
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    assert calls["decode"] == 4 * 2
    ref = float_logits(model, out.sequences, torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1))
    for row in (0, 1):
        assert max(step_errors(out, ref, 6, rows=slice(row, row + 1))) < TOL["per_token"]


# ----------------------------------------------------------------------------- calibration
def test_static_scales_are_the_stored_keys_absmax():
    """per_channel scales come from K/V as the cache stores them: after RoPE, per (kv head, channel)."""
    model = make_model("llama", seed=5)
    batches = calib_batches(2)
    dyn = transformers.DynamicCache(config=model.config)
    stored = []
    for b in batches:
        dyn = transformers.DynamicCache(config=model.config)
        model(b, past_key_values=dyn, use_cache=True)
        stored.append([(layer.keys, layer.values) for layer in dyn.layers])
    apply_int8_kv_cache(model, "per_channel", batches)
    for idx, (_, attn) in hf.attention_modules(model).items():
        k_abs = torch.stack([s[idx][0].abs().amax(dim=(0, 2)) for s in stored]).amax(0)
        v_abs = torch.stack([s[idx][1].abs().amax(dim=(0, 2)) for s in stored]).amax(0)
        torch.testing.assert_close(attn.kv_quant.k_scale, k_abs / 127)
        torch.testing.assert_close(attn.kv_quant.v_scale, v_abs / 127)
    # scales taken from k_proj's output (before RoPE) would differ: the test above can tell them apart
    seen = []
    attn0 = hf.attention_modules(model)[0][1]
    handle = attn0.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    for b in batches:
        model(b, use_cache=False)
    handle.remove()
    pre = torch.cat(seen, dim=1).abs().amax(dim=(0, 1)).view(2, 16) / 127
    assert not torch.allclose(pre, attn0.kv_quant.k_scale, rtol=0.05, atol=0)


def test_calibration_leaves_padding_out():
    model = make_model("llama", seed=6)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    stats = hf.calibrate_kv(model, [{"input_ids": ids, "attention_mask": mask}], quiet=True)
    dyn = transformers.DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=dyn, use_cache=True)
    k = dyn.layers[1].keys
    expect = torch.maximum(k[0, :, 4:].abs().amax(1), k[1].abs().amax(1))
    torch.testing.assert_close(stats[1][0], expect)


# ----------------------------------------------------------------------------- save / load path
def test_kv_cache_quant_description_round_trip():
    q = KVCacheQuant.from_absmax(torch.rand(2, 16) + 0.1, torch.rand(2, 16), layer_idx=3)
    d = q.describe()
    assert d == {"kind": "kv_cache", "granularity": "per_channel", "num_kv_heads": 2, "head_dim": 16, "layer_idx": 3}
    r = KVCacheQuant.from_description(d)
    assert set(r.state_dict()) == {"k_scale", "v_scale"}
    assert r.k_scale.shape == (2, 16) and r.k_scale.dtype == torch.float32
    r.load_state_dict(q.state_dict())
    torch.testing.assert_close(r.v_scale, q.v_scale)
    dyn = KVCacheQuant("per_token", 4, 8, 0)
    assert dyn.state_dict() == {} and KVCacheQuant.from_description(dyn.describe()).describe() == dyn.describe()
    assert KVCacheQuant.from_description(d, device="meta").k_scale.device.type == "meta"
    zero = KVCacheQuant.from_absmax(torch.zeros(1, 4), torch.zeros(1, 4), 0)
    assert torch.equal(zero.k_scale, torch.ones(1, 4))  # an all-zero channel gets scale 1, never 0
    with pytest.raises(ValueError, match="granularity"):
        KVCacheQuant("per_tensor", 2, 16, 0)
    with pytest.raises(ValueError, match="kind"):
        KVCacheQuant.from_description({**d, "kind": "linear"})


def test_reattach_after_rebuild_from_description(calls):
    """What load_quantized does: re-create the KVCacheQuant children by name, load the state dict,
    then reattach the wiring; the loaded model decodes on the int8 cache like the original."""
    src = make_model("llama", seed=7)
    fresh = copy.deepcopy(src)
    apply_int8_kv_cache(src, "per_channel", calib_batches())
    modules = {n: m.describe() for n, m in src.named_modules() if isinstance(m, KVCacheQuant)}
    assert sorted(modules) == ["model.layers.0.self_attn.kv_quant", "model.layers.1.self_attn.kv_quant"]
    state = src.state_dict()
    assert "model.layers.0.self_attn.kv_quant.k_scale" in state
    for name, d in modules.items():
        set_submodule(fresh, name, KVCacheQuant.from_description(d))
    fresh.load_state_dict(state, strict=True)
    reattach(fresh)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    a, b = src.generate(ids, **kw), fresh.generate(ids, **kw)
    assert isinstance(returned_cache(b), Int8KVCache)
    assert calls["decode"] == 2 * 4 * 2
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y)


def test_deepcopy_and_rewire_keep_both_models_working(calls):
    a = make_model("opt")
    apply_int8_kv_cache(a, "per_token")
    b = copy.deepcopy(a)
    reattach(b)  # must not unhook `a`
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    for m in (a, b):
        out = m.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert isinstance(returned_cache(out), Int8KVCache)
    assert calls["decode"] == 2 * 2 * 2
    assert len(hf._our_hooks(a)) == 1 and len(hf._our_hooks(b)) == 1


def test_errors():
    from tests.models import tiny_net

    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_int8_kv_cache(tiny_net(), "per_token")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        reattach(tiny_net())
    model = make_model("llama")
    with pytest.raises(ValueError, match="granularity"):
        apply_int8_kv_cache(model, "per_tensor")
    with pytest.raises(ValueError, match="calib_data"):
        apply_int8_kv_cache(model, "per_channel")
    with pytest.raises(ValueError, match="KVCacheQuant"):
        reattach(model)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="not supported"):
        apply_int8_kv_cache(model, "per_token")
    assert not any(isinstance(m, KVCacheQuant) for m in model.modules())  # refused before any change


def test_reattach_runs_check_reattach_checks():
    """reattach checks the KVCacheQuant children it finds as check_reattach (load_quantized's check)
    checks the file's: a layer_idx that is not its module's gets one message from both."""
    model = make_model("llama")
    apply_int8_kv_cache(model, "per_token")
    q0 = model.model.layers[0].self_attn.kv_quant
    model.model.layers[0].self_attn.kv_quant = model.model.layers[1].self_attn.kv_quant
    model.model.layers[1].self_attn.kv_quant = q0
    msg = ("reattach: model.layers.0.self_attn.kv_quant was built for layer_idx 1, but model.layers.0.self_attn "
           "is layer 0")
    with pytest.raises(ValueError) as e:
        reattach(model)
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e:
        hf.check_reattach(model, {"model.layers.0.self_attn.kv_quant": 1})
    assert str(e.value) == msg
    assert hf.check_reattach(model, {"model.layers.0.self_attn.kv_quant": 0}) == "sdpa"


def test_reattach_refuses_a_model_outside_the_attention_interface():
    """A model that computes attention itself (Bloom) given KVCacheQuant children by hand: reattach
    refuses it as apply_int8_kv_cache and load_quantized do, instead of wiring it."""
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)).eval()
    for idx, (_, mod) in hf.attention_modules(bloom).items():
        mod.kv_quant = KVCacheQuant("per_token", 4, 16, idx)
    with pytest.raises(NotImplementedError, match="computes attention itself"):
        reattach(bloom)
    assert not hf._is_wired(bloom)


def test_models_outside_the_attention_interface_are_refused():
    """A decode step hands attention the new token's key only, and the cache's history reaches it
    through transformers' attention interface: a model that computes attention itself (Bloom) would
    attend over one key (generate crashed), and multi-head latent attention caches no K/V per head."""
    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)).eval()
    with pytest.raises(NotImplementedError, match="computes attention itself"):
        apply_int8_kv_cache(bloom, "per_token")
    mla = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=128)).eval()
    with pytest.raises(NotImplementedError, match="latent attention"):
        apply_int8_kv_cache(mla, "per_token")
    assert not any(isinstance(m, KVCacheQuant) for m in list(bloom.modules()) + list(mla.modules()))


def test_output_attentions_reach_every_decode_step():
    """output_attentions=True: the decode steps take the dequantizing path, which returns weights (the
    fused paged decode has none), so every step reports them as the float model does."""
    model = make_model("llama", attn_implementation="eager")
    model.config._attn_implementation = "eager"
    ref = copy.deepcopy(model)
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True,
              output_attentions=True)
    shapes = [[[tuple(a.shape) for a in step] for step in m.generate(ids, **kw).attentions] for m in (ref, model)]
    assert shapes[0] == shapes[1] and all(len(step) == 2 for step in shapes[1])


def test_remove_restores_float_attention(calls):
    model = make_model("gpt2")
    apply_int8_kv_cache(model, "per_token")
    hf.remove_int8_kv_cache(model)
    assert model.config._attn_implementation == "sdpa"
    out = model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True)
    assert not isinstance(returned_cache(out), Int8KVCache) and calls["decode"] == 0


# ----------------------------------------------------------------------------- the cache object itself
def _filled_cache(b=3, t=37, block_size=8, seed=0):
    model = make_model("llama")
    apply_int8_kv_cache(model, "per_token")
    cache = Int8KVCache(model, block_size=block_size)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, 2, t, 16, generator=g)
    v = torch.randn(b, 2, t, 16, generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :5] = 0  # left padding of row 1
    cache._begin_forward(mask)
    cache.update(k, v, 0)
    return cache, k, v, mask


def test_cache_layout_dequantize_and_decode():
    cache, k, v, mask = _filled_cache()
    layer = cache.layers[0]
    assert layer.get_seq_length() == 37 and layer.store.lens.tolist() == [37, 32, 37]
    assert layer.store.cols >= 5  # 37 tokens in blocks of 8, grown on demand
    dk, dv = layer.hf_layout()
    keep = mask.bool()[:, None, :, None]
    # dequantized values within half a step of the originals; padding positions read 0
    step = k.abs().amax(-1, keepdim=True) / 127
    assert bool(((dk - k).abs() <= step / 2 + 1e-6)[keep.expand_as(k)].all())
    assert bool((dk[1, :, :5] == 0).all()) and bool((dv[1, :, :5] == 0).all())
    # the paged layout is the one the reference ops read: block j of sequence b is j * B + b
    st = layer.store
    table = st.block_table()
    assert table.dtype == torch.int32 and table[2, 1].item() == 1 * 3 + 2
    for b in range(3):
        ref = dequantize_kv(st.k_cache, st.k_scale, table[b], int(st.lens[b]))
        torch.testing.assert_close(ref.transpose(0, 1), dk[b][:, mask[b].bool()])
    q = torch.randn(3, 4, 16)
    out = st.decode(q, 0.25)
    torch.testing.assert_close(out, int8_kv_decode_attention(q, st.k_cache, st.v_cache, st.k_scale, st.v_scale,
                                                             table, st.seq_lens, 0.25))


def test_cache_reorder_select_repeat_crop():
    cache, k, v, mask = _filled_cache()
    layer = cache.layers[0]
    before = layer.hf_layout()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    after = layer.hf_layout()
    for i, src in enumerate([2, 0, 0]):
        torch.testing.assert_close(after[0][i], before[0][src])
        torch.testing.assert_close(after[1][i], before[1][src])
    # beams that share a parent own separate copies: writing one leaves the other alone
    cache._begin_forward(None)
    cache.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16), 0)
    assert not torch.equal(layer.hf_layout()[0][1, :, -1], layer.hf_layout()[0][2, :, -1])
    torch.testing.assert_close(layer.hf_layout()[0][1, :, :-1], layer.hf_layout()[0][2, :, :-1])
    cache.crop(-3)
    assert cache.get_seq_length() == 35 and layer.store.lens.tolist() == [35, 35, 35]
    torch.testing.assert_close(layer.hf_layout()[0][0], before[0][2][:, :35])
    cache.batch_select_indices(torch.tensor([0]))
    cache.batch_repeat_interleave(2)
    assert layer.store.batch == 2 and layer.hf_layout()[0].shape == (2, 2, 35, 16)
    cache.crop(0)
    assert cache.get_seq_length() == 35
    cache.reset()
    assert cache.get_seq_length() == 0 and not layer.is_initialized


def test_cache_refuses_a_new_batch_size():
    cache, *_ = _filled_cache()
    with pytest.raises(ValueError, match="B=3"):
        cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0)


def test_paged_store_static_scales():
    ks, vs = torch.rand(2, 8) + 0.05, torch.rand(2, 8) + 0.05
    st = PagedInt8KV(2, 2, 8, "cpu", block_size=4, k_scale=ks, v_scale=vs)
    k = torch.randn(2, 6, 2, 8) * 0.1
    st.append(k, k, torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6], dtype=torch.bool))
    assert st.lens.tolist() == [5, 6] and st.k_scale is not None and st.k_scale.shape == (2, 8)
    ks_given = ks.clone()
    ks.mul_(2)  # the store holds its own copy of the scales it was given
    ks = ks_given
    assert torch.equal(st.k_scale, ks)
    dk, _ = st.dequantize()
    torch.testing.assert_close(dk[1], torch.round(k[1] / ks) * ks)
    torch.testing.assert_close(dk[0, :5], torch.round(k[0, [0, 1, 3, 4, 5]] / ks) * ks)


def test_signature_of_cache_kwarg_is_handled():
    """transformers renamed past_key_values -> cache in 5.2x; both spellings reach the cache."""
    model = make_model("llama")
    apply_int8_kv_cache(model, "per_token")
    names = inspect.signature(model.forward).parameters
    assert hf._cache_kwarg(model) in names
    cache = Int8KVCache(model)
    model(torch.ones(1, 3, dtype=torch.long), **{hf._cache_kwarg(model): cache})
    assert cache.get_seq_length() == 3


@pytest.mark.parametrize("static", (False, True))
def test_paged_store_repeat_steps_go_direct(monkeypatch, static):
    """After the public ops accepted a decode step's append and attention, the store's like steps call
    the backend directly (same cache contents and outputs as through the ops, in-place writes still
    bump the caches' versions), beam-search reorders included; growing the cache, a new batch size, a
    new dtype or a dispatch mode goes through the ops' checks again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    for op in ("kv_cache_append", "int8_kv_decode_attention"):
        orig = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _o=orig, _n=op: (calls.append(_n), _o(*a))[1])
    torch.manual_seed(0)
    scales = dict(k_scale=torch.rand(2, 8) * 0.02 + 0.01, v_scale=torch.rand(2, 8) * 0.02 + 0.01) if static else {}
    direct = PagedInt8KV(2, 2, 8, "cpu", block_size=4, **scales)
    checked = PagedInt8KV(2, 2, 8, "cpu", block_size=4, **scales)
    checked._key = lambda *a: None  # every call through the ops
    prompt = torch.randn(2, 3, 2, 8)
    for st in (direct, checked):
        st.append(prompt, prompt * 0.5)
    for step in range(12):  # 3 + 12 tokens: the cache grows from 1 block column to 2, then 4
        k, v, q = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 4, 8)
        calls.clear()
        if step in (5, 9):  # a beam-search reorder: same batch size, same columns
            for st in (direct, checked):
                st.select(torch.tensor([1, 1]))
        cols, version = direct.cols, direct.k_cache._version
        direct.append(k, v)
        out = direct.decode(q, 0.3)
        if step == 0 or direct.cols != cols:
            assert calls == ["kv_cache_append", "int8_kv_decode_attention"], (step, calls)
        else:
            assert calls == [], (step, calls)
            assert direct.k_cache._version > version
        checked.append(k, v)
        assert torch.equal(out, checked.decode(q, 0.3))
        assert torch.equal(direct.k_cache, checked.k_cache) and torch.equal(direct.v_scale, checked.v_scale)
        assert direct.lens.tolist() == checked.lens.tolist() == [4 + step] * 2
        assert torch.equal(direct.seq_lens, checked.seq_lens)
    expect = int8_kv_decode_attention(q, direct.k_cache, direct.v_cache, direct.k_scale, direct.v_scale,
                                      direct.block_table(), direct.seq_lens, 0.3)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    with Log():
        direct.append(k, v)
        assert torch.equal(direct.decode(q, 0.3), out2 := direct.decode(q, 0.3)) and out2.shape == q.shape
    assert [s for s in seen if s.startswith("ptqrt.")] == ["ptqrt.kv_cache_append.default"] + \
        ["ptqrt.int8_kv_decode_attention.default"] * 2
    calls.clear()
    direct.decode(q.half(), 0.3)  # a new q dtype: through the op once
    assert calls == ["int8_kv_decode_attention"]
    calls.clear()
    direct.drop_last(torch.tensor([2, 0]))  # lengths change, shapes do not: still direct
    direct.decode(q, 0.3)
    assert calls == [] and direct.lens.tolist() == [14, 16]
    direct.select(torch.tensor([0]))  # batch 2 -> 1: through the ops once
    direct.append(k[:1], v[:1])
    direct.decode(q[:1], 0.3)
    assert calls == ["kv_cache_append", "int8_kv_decode_attention"]


def test_paged_store_checks_its_inputs():
    st = PagedInt8KV(2, 2, 8, "cpu", block_size=4)
    with pytest.raises(ValueError, match=r"\[B, T, Hkv, D\]"):
        st.append(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4))  # same numel, wrong head split
    with pytest.raises(ValueError, match="device"):
        st.append(torch.randn(2, 1, 2, 8, device="meta"), torch.randn(2, 1, 2, 8, device="meta"))
    with pytest.raises(ValueError, match="keep"):
        st.append(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8), torch.ones(2, 2, dtype=torch.bool))
    st.append(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))
    st.decode(torch.randn(2, 4, 8), 0.3)  # accepted: later steps like it go direct
    with pytest.raises(TypeError, match="q must have dtype"):
        st.decode(torch.randn(2, 4, 8).double(), 0.3)
    with pytest.raises(ValueError, match="sm_scale"):
        st.decode(torch.randn(2, 4, 8), 0.0)
    assert st.lens.tolist() == [1, 1]
    with pytest.raises(ValueError, match="non-negative"):
        st.drop_last(torch.tensor([1, -1]))
    with pytest.raises(TypeError, match="tensors"):
        st.append([[0.0]], torch.randn(2, 1, 2, 8))
    with pytest.raises(ValueError, match="k .2, 1, 2, 8., v .2, 2, 2, 8."):
        st.append(torch.randn(2, 1, 2, 8), torch.randn(2, 2, 2, 8))


def test_paged_store_device_as_tensors_report_it():
    """A store made with "cpu:0" (or "cuda") takes tensors whose .device reads "cpu" ("cuda:0")."""
    st = PagedInt8KV(1, 2, 8, "cpu:0", block_size=4)
    k = torch.randn(1, 5, 2, 8)
    st.append(k, k)
    assert st.device == k.device and st.lens.tolist() == [5]
    assert st.decode(torch.randn(1, 2, 8), 0.3).shape == (1, 2, 8)


@pytest.mark.parametrize("device,seed", [("cpu", s) for s in range(4)]  # on a GPU one seed: Triton compiles
                         + [pytest.param("cuda", 0, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("static,max_tokens,capacity", ((False, None, None), (True, None, None), (False, 6, None),
                                                        (False, None, 5), (True, 6, 3)))
def test_paged_store_random_histories(seed, static, max_tokens, capacity, device):
    """Random sequences of prefills with padding, decode steps, reorders (repeats, batch changes),
    drops and (for a ring) capacity changes against a model of the store kept in Python: what
    dequantize() returns matches the float history within half a quantization step, and decode()
    matches attention over the tokens held (a ring: the last `capacity`, less those dropped since). On
    a GPU the store's lengths and slots reach the device through pinned memory without waiting."""
    tol = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-4)
    g = torch.Generator().manual_seed(seed)
    hkv, d, bs = 2, 8, 4
    b = int(torch.randint(1, 4, (1,), generator=g))
    scales = dict(k_scale=torch.rand(hkv, d, generator=g) * 0.02 + 0.01,
                  v_scale=torch.rand(hkv, d, generator=g) * 0.02 + 0.01) if static else {}
    st = PagedInt8KV(b, hkv, d, device, block_size=bs, max_tokens=max_tokens, capacity=capacity, **scales)
    hist = [[] for _ in range(b)]  # float (k, v) of each stored token, [Hkv, D] each, per sequence
    first = [0] * b  # the oldest token each holds

    def wrap():
        return [f if capacity is None else max(f, len(h) - capacity) for f, h in zip(first, hist)]

    for _ in range(30):
        op = int(torch.randint(0, 6 if capacity else 5, (1,), generator=g))
        if op == 0:  # several tokens, some of them padding
            t = int(torch.randint(1, 6, (1,), generator=g))
            k, v = torch.rand(b, t, hkv, d, generator=g) - 0.5, torch.rand(b, t, hkv, d, generator=g) - 0.5
            keep = torch.rand(b, t, generator=g) < 0.7
            st.append(k.to(device), v.to(device), keep)
            for i in range(b):
                hist[i] += [(k[i, j], v[i, j]) for j in range(t) if keep[i, j]]
            first = wrap()
        elif op in (1, 2):  # a decode step
            k, v = torch.rand(b, 1, hkv, d, generator=g) - 0.5, torch.rand(b, 1, hkv, d, generator=g) - 0.5
            st.append(k.to(device), v.to(device))
            for i in range(b):
                hist[i].append((k[i, 0], v[i, 0]))
            first = wrap()
        elif op == 3:  # reorder: beams, repeats, a new batch size
            nb = int(torch.randint(1, 4, (1,), generator=g))
            index = torch.randint(0, b, (nb,), generator=g)
            st.select(index)
            hist, b = [list(hist[i]) for i in index.tolist()], nb
            first = [first[i] for i in index.tolist()]
        elif op == 4:
            counts = torch.randint(0, 3, (b,), generator=g)
            st.drop_last(counts)
            hist = [h[:max(0, len(h) - int(c))] for h, c in zip(hist, counts)]
            first = [min(f, len(h)) for f, h in zip(first, hist)]
        else:  # the ring grows or shrinks (keeping the last `capacity` held)
            capacity = int(torch.randint(2, 9, (1,), generator=g))
            st.set_capacity(capacity)
            first = wrap()
        assert st.lens.tolist() == [len(h) for h in hist] and st.first == first
        assert st.seq_lens.tolist() == [len(h) - f for h, f in zip(hist, first)]
        length = max((len(h) for h in hist), default=0)
        ks, vs = (None, None) if not static else (st.k_scale.cpu(), st.v_scale.cpu())
        q = torch.rand(b, 2 * hkv, d, generator=g) - 0.5
        out = st.decode(q.to(device), 0.5).cpu()
        for i, h in enumerate(hist):
            valid = torch.zeros(b, length, dtype=torch.bool)
            valid[i, :len(h)] = True
            dk, dv = (t[i].cpu() for t in st.dequantize(valid, lo=first[i]))  # [L - first, Hkv, D]
            for j, (k, v) in enumerate(h[first[i]:]):
                for got, want, s in ((dk[j], k, ks), (dv[j], v, vs)):
                    step = s if static else want.abs().amax(-1, keepdim=True) / 127
                    assert ((got - want).abs() <= step / 2 + 1e-6).all()
            if first[i] > 0:
                with pytest.raises(RuntimeError, match="is gone"):
                    st.dequantize(valid, lo=first[i] - 1)
            n = len(h) - first[i]
            if n == 0:
                assert (out[i] == 0).all()
                continue
            kk = dk[:n].repeat_interleave(2, dim=1)  # [L, Hq, D]
            vv = dv[:n].repeat_interleave(2, dim=1)
            p = torch.softmax(torch.einsum("hd,lhd->hl", q[i], kk) * 0.5, dim=-1)
            torch.testing.assert_close(out[i], torch.einsum("hl,lhd->hd", p, vv), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5])
def test_generate_on_gpu(calls, window):
    """generate() on a CUDA model with the int8 KV cache: every decode step reads the paged cache
    through the GPU backends, and the logits stay within the CPU test's tolerance of float (with a
    sliding window of 5, past it: the ring)."""
    model = (make_model("llama") if window is None else make_model("mistral", sliding_window=window)).to("cuda")
    apply_int8_kv_cache(model, "per_token")
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5)).to("cuda")
    new = 8
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, min_new_tokens=new)
    cache = returned_cache(out)
    assert isinstance(cache, Int8KVCache) and cache.layers[0].store.device == torch.device("cuda", 0)
    assert calls["decode"] == (new - 1) * n_layers and calls["append"] == new * n_layers
    errs = step_errors(out, float_logits(model, out.sequences), 7)
    assert max(errs[1:]) < TOL["per_token"], errs
    assert max(errs[1:]) > 1e-6, "decode steps match float exactly: the int8 cache was not read"


def test_generate_caps_growth_at_its_max_length(monkeypatch):
    """generate() hands the cache its max length (prompt + new tokens - 1): each layer's storage grows
    by doubling but stops there (35 tokens: 2 block columns for the prompt, then 3, not 4); a cache
    made without it grows to 4; a sequence longer than the cap still grows, by doubling."""
    model = make_model("llama")
    apply_int8_kv_cache(model, "per_token")
    allocs = []
    real = PagedInt8KV._alloc
    monkeypatch.setattr(PagedInt8KV, "_alloc", lambda self, cols: (allocs.append(cols), real(self, cols))[1])
    ids = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = returned_cache(model.generate(ids, **kw))
    n_layers = model.config.num_hidden_layers
    assert cache.max_length == 35 and cache.get_seq_length() == 35
    assert sorted(allocs) == sorted([1, 2, 3] * n_layers)  # one block, the 30-token prompt, then 33 tokens
    assert all(layer.store.cols == 3 for layer in cache.layers)
    allocs.clear()
    mine = Int8KVCache(model)
    out = model.generate(ids, **{hf._cache_kwarg(model): mine}, **kw)
    assert returned_cache(out) is mine and mine.max_length is None
    assert sorted(allocs) == sorted([1, 2, 4] * n_layers)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_length"):
            Int8KVCache(model, max_length=bad)
        with pytest.raises(ValueError, match="max_tokens"):
            PagedInt8KV(1, 2, 8, "cpu", max_tokens=bad)
    st = PagedInt8KV(1, 2, 8, "cpu", block_size=4, max_tokens=9)  # cap: 3 columns
    for n, cols in ((4, 1), (5, 2), (9, 3), (10, 3), (13, 6), (17, 6)):  # past the cap: doubling again
        t = n - int(st.lens.item())
        st.append(torch.randn(1, t, 2, 8), torch.randn(1, t, 2, 8))
        assert st.cols == cols, (n, st.cols)


def test_a_requested_cache_implementation_is_kept_with_a_warning():
    """generate(cache_implementation="static") makes a StaticCache, which is kept (the user asked for
    it): the run stores float K/V, and says so instead of silently leaving the int8 cache out."""
    model = make_model("llama")
    apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="StaticCache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_an_assistant_with_sliding_windows_records_its_past():
    """generate marks an assistant model's DynamicCache for past recording before the wrapper swaps
    it for an Int8KVCache: the swapped cache records too, so drafts of several tokens can be cropped
    after the window filled (the assistant drafts 4 a round here, the window is 3)."""
    def build():
        main = make_model("mistral", seed=1, sliding_window=3)
        asst = make_model("mistral", seed=2, sliding_window=3)
        asst.generation_config.num_assistant_tokens = 4
        asst.generation_config.num_assistant_tokens_schedule = "constant"
        asst.generation_config.assistant_confidence_threshold = 0.0
        return main, asst

    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    main, asst = build()
    want = main.generate(ids, assistant_model=asst, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    main, asst = build()
    apply_int8_kv_cache(asst, "per_token")
    got = main.generate(ids, assistant_model=asst, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


def _wiring(model):
    return dict(children=[(n, id(m)) for n, m in model.named_modules() if isinstance(m, KVCacheQuant)],
                attn=model.config._attn_implementation, wrapper="_prepare_cache_for_generation" in model.__dict__,
                hooks=sum(len(m._forward_pre_hooks) for m in model.modules()))


@pytest.mark.parametrize("where", ["scales", "wire"])
@pytest.mark.parametrize("before", ["plain", "wired"])
def test_apply_that_fails_part_way_changes_nothing(where, before, monkeypatch):
    """An error (or interrupt) while building layer 1's scales or while wiring leaves the model as it
    was: its KVCacheQuant children, attention implementation, hooks and generate wrapper."""
    model = make_model("llama", seed=0)
    if before == "wired":
        apply_int8_kv_cache(model, "per_token")
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    ref, state = model(ids).logits, _wiring(model)
    if where == "scales":
        real = KVCacheQuant.from_absmax.__func__

        def from_absmax(cls, k, v, layer_idx):
            if layer_idx == 1:
                raise KeyboardInterrupt
            return real(cls, k, v, layer_idx)
        monkeypatch.setattr(KVCacheQuant, "from_absmax", classmethod(from_absmax))
    else:
        real_wire = hf._wire

        def wire(model, prev):  # the config switched, then an interrupt
            model.config._attn_implementation = hf._register(prev)
            raise KeyboardInterrupt
        monkeypatch.setattr(hf, "_wire", wire)
    with pytest.raises(KeyboardInterrupt):
        apply_int8_kv_cache(model, "per_channel", calib_batches(1))
    if where == "wire":
        monkeypatch.setattr(hf, "_wire", real_wire)
    assert _wiring(model) == state
    assert torch.equal(model(ids).logits, ref)


def test_windows_of_per_layer_configs():
    """A config whose layers differ (per_layer_config) is read layer by layer, as transformers' cache does."""
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     sliding_window=None, per_layer_config={0: {"sliding_window": 3}})
    assert hf.layer_windows(cfg) == [3, None]
