"""ptqrt.from_pretrained: a packed directory loaded on its own (the model class from its config.json), the
float weights never allocated, the result equal to the model that was saved."""
import copy
import hashlib
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ptqrt  # noqa: E402
from ptqrt import FormatError, PTQConfig, QuantLinear, from_pretrained, quantize, save_quantized  # noqa: E402
from ptqrt.modules.experts import QuantExperts  # noqa: E402
from ptqrt.modules.kv_cache import KVCacheQuant  # noqa: E402

from models import tiny_net  # noqa: E402
from test_experts import _model as moe_model  # noqa: E402
from test_hf_kv_cache import calib_batches, make_model  # noqa: E402

STATIC_KV = dict(act_dtype="int8", act_granularity="per_tensor", kv_cache_dtype="int8", kv_granularity="per_channel")


def _saved(tmp_path, model, cfg, calib=None):
    q = quantize(model, cfg, calib if calib is not None else calib_batches(), quiet=True)
    return q, save_quantized(q, tmp_path / "packed")


def _ids(vocab, seed=3):
    return torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for n in sa:
        assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n]), n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_loads_the_saved_model_bit_for_bit(arch, tmp_path):
    q, d = _saved(tmp_path, make_model(arch), PTQConfig(**STATIC_KV, outliers="smooth"))
    r = from_pretrained(d)
    assert type(r) is type(q) and not r.training
    assert r.ptqrt_config == q.ptqrt_config
    assert sum(isinstance(m, QuantLinear) for m in r.modules()) == sum(isinstance(m, QuantLinear) for m in q.modules())
    assert sum(isinstance(m, KVCacheQuant) for m in r.modules()) == 2
    assert {t.device.type for t in list(r.parameters()) + list(r.buffers())} == {"cpu"}
    _same_state(q, r)
    ids = _ids(96)
    assert torch.equal(r(ids).logits, q(ids).logits)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(r.generate(ids, **kw), q.generate(ids, **kw))
    if arch == "gpt2":
        assert r.lm_head.weight is r.transformer.wte.weight  # the tie is one tensor still


def test_moe_experts(tmp_path):
    model = moe_model("mixtral")
    calib = [torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    q, d = _saved(tmp_path, model, PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth"), calib)
    r = from_pretrained(d)
    assert isinstance(r.model.layers[1].mlp.experts.ptqrt_experts, QuantExperts)
    _same_state(q, r)
    assert torch.equal(r(_ids(97)).logits, q(_ids(97)).logits)


def test_float_weights_are_never_allocated(tmp_path, monkeypatch):
    """What load_quantized is handed: the linears' and the embedding's weights on the meta device (made by
    torch.empty, never allocated), the buffers the file does not hold real and computed."""
    _, d = _saved(tmp_path, make_model("llama"), PTQConfig(act_dtype="int8"))
    handed = []
    load = ptqrt.pretrained.load_quantized

    def spy(model, *a, **k):
        handed.append({n: p.is_meta for n, p in model.named_parameters()})
        assert not any(b.is_meta for b in model.buffers())
        assert model.model.rotary_emb.inv_freq.abs().sum() > 0
        return load(model, *a, **k)

    monkeypatch.setattr(ptqrt.pretrained, "load_quantized", spy)
    r = from_pretrained(d)
    assert len(handed) == 1 and all(handed[0].values())  # the norms (torch.ones) too
    assert not any(t.is_meta for t in list(r.parameters()) + list(r.buffers()))


def _meta_handed(monkeypatch) -> list:
    """Fills with {parameter name: is it on meta} for each model from_pretrained hands load_quantized."""
    handed = []
    load = ptqrt.pretrained.load_quantized

    def spy(model, *a, **k):
        handed.append({n: p.is_meta for n, p in model.named_parameters()})
        return load(model, *a, **k)

    monkeypatch.setattr(ptqrt.pretrained, "load_quantized", spy)
    return handed


def test_fused_experts_made_with_zeros_are_never_allocated(tmp_path, monkeypatch):
    """Llama-4 makes its fused experts' weights with torch.zeros: on the meta device too."""
    cfg = transformers.Llama4TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, num_local_experts=2)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    q, d = _saved(tmp_path, model, PTQConfig(), [_ids(97, seed=i) for i in range(3)])
    handed = _meta_handed(monkeypatch)
    r = from_pretrained(d)
    experts = [n for n in handed[0] if ".experts." in n]
    assert experts and all(handed[0].values())
    _same_state(q, r)
    assert torch.equal(r(_ids(97)).logits, q(_ids(97)).logits)


def test_a_zeros_made_tensor_the_model_computes_with_is_built_with_empty_alone(tmp_path, monkeypatch):
    """An __init__ that needs a real torch.zeros (a non-persistent table filled from it) is built again with
    torch.empty alone making meta tensors: no warning, the linears still never allocated."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    q, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    init = LlamaRotaryEmbedding.__init__

    def table(self, *a, **k):
        init(self, *a, **k)
        t = torch.zeros(4)
        t[1:] = 3.0
        self.register_buffer("table", t, persistent=False)

    monkeypatch.setattr(LlamaRotaryEmbedding, "__init__", table)
    handed = _meta_handed(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = from_pretrained(d)
    assert torch.equal(r.model.rotary_emb.table, torch.tensor([0.0, 3.0, 3.0, 3.0]))
    meta = handed[0]
    assert all(meta[n] for n in meta if n.endswith(("proj.weight", "embed_tokens.weight")))
    assert not any(meta[n] for n in meta if "norm" in n)
    assert torch.equal(r(_ids(96)).logits, q(_ids(96)).logits)


def test_a_model_whose_init_needs_real_tensors_is_built_on_the_cpu(tmp_path, monkeypatch):
    """An __init__ that computes with a tensor torch.empty made (or leaves a buffer of it on the meta
    device) cannot be built that way: the model is built on the CPU instead, with a warning, and loads."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    q, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    init = LlamaRotaryEmbedding.__init__

    def needs_real(self, *a, **k):
        init(self, *a, **k)
        self.register_buffer("table", torch.empty(4).fill_(1.0), persistent=False)

    monkeypatch.setattr(LlamaRotaryEmbedding, "__init__", needs_real)
    with pytest.warns(RuntimeWarning, match=r"buffer 'model.rotary_emb.table' is left on it.*built on the CPU"):
        r = from_pretrained(d)
    assert torch.equal(r.model.rotary_emb.table, torch.ones(4))
    assert torch.equal(r(_ids(96)).logits, q(_ids(96)).logits)

    def keeps_attribute(self, *a, **k):  # neither a parameter nor a buffer: the file cannot fill it
        init(self, *a, **k)
        self.tables = [torch.empty(4).fill_(2.0)]

    monkeypatch.setattr(LlamaRotaryEmbedding, "__init__", keeps_attribute)
    with pytest.warns(RuntimeWarning, match=r"attribute 'model.rotary_emb.tables' is left on it"):
        r = from_pretrained(d)
    assert torch.equal(r.model.rotary_emb.tables[0], torch.full((4,), 2.0))

    def fails(self, *a, **k):
        init(self, *a, **k)
        float(torch.empty(1).fill_(2.0))  # .item() of a meta tensor raises

    monkeypatch.setattr(LlamaRotaryEmbedding, "__init__", fails)
    with pytest.warns(RuntimeWarning, match=r"its __init__ fails: .*meta"):
        r = from_pretrained(d)
    assert torch.equal(r(_ids(96)).logits, q(_ids(96)).logits)


def test_writing_the_loaded_model_leaves_the_file_alone(tmp_path):
    _, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    r = from_pretrained(d)
    r.model.embed_tokens.weight.data.add_(1.0)
    r.model.layers[0].self_attn.q_proj.weight.add_(1)
    assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == digest
    assert torch.equal(from_pretrained(d).model.embed_tokens.weight + 1, r.model.embed_tokens.weight)


def test_dtypes_follow_the_file(tmp_path):
    """A bfloat16 model whose last norm and lm_head were kept in float32 loads with each tensor's own
    dtype (bfloat16, the most of the file's float elements, for the rest). Built in bfloat16 as
    from_pretrained builds it: `.to(torch.bfloat16)` would also round the rotary table, a buffer the file
    does not hold and the model's __init__ computes in float32."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(make_model("llama").config, dtype=torch.bfloat16).eval()
    model.model.norm.float()
    model.lm_head.float()
    q, d = _saved(tmp_path, model, PTQConfig(act_dtype="int8"))
    r = from_pretrained(d)
    assert r.config.dtype == torch.bfloat16  # built in it: buffers made in the default dtype take it
    assert r.model.norm.weight.dtype == r.lm_head.weight.dtype == torch.float32
    assert r.model.embed_tokens.weight.dtype == r.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    _same_state(q, r)
    assert torch.equal(r(_ids(96)).logits, q(_ids(96)).logits)


def test_config_json_names_the_saved_class_and_generation_config_round_trips(tmp_path):
    model = make_model("llama")
    assert not model.config.architectures  # built from a config: transformers records no class
    model.config.architectures = ["LlamaModel"]  # ...or another head's
    model.generation_config.eos_token_id = [2, 5]
    model.generation_config.max_new_tokens = 11
    _, d = _saved(tmp_path, model, PTQConfig())
    assert json.loads((d / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert model.config.architectures == ["LlamaModel"]  # the model's own config is left as it was
    r = from_pretrained(d)
    assert type(r) is transformers.LlamaForCausalLM
    assert r.generation_config.eos_token_id == [2, 5] and r.generation_config.max_new_tokens == 11


def test_attn_implementation(tmp_path):
    q, d = _saved(tmp_path, make_model("llama"), PTQConfig(**STATIC_KV))
    r = from_pretrained(d, attn_implementation="eager")
    assert r.config._attn_implementation.endswith("eager")  # under the int8 KV cache's own wrapper
    assert from_pretrained(d).config._attn_implementation.endswith("sdpa")
    torch.testing.assert_close(r(_ids(96)).logits, q(_ids(96)).logits, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_reason(tmp_path, capsys):
    from ptqrt.cli import main

    net = quantize(tiny_net(), PTQConfig(), quiet=True)  # not a transformers model: no config.json
    d = save_quantized(net, tmp_path / "net")
    with pytest.raises(FormatError, match=r"has no config.json.*load_quantized"):
        from_pretrained(d)
    assert main(["inspect", str(d)]) == 0
    assert "model: no config.json (not a transformers model)" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a ptqrt packed directory"):
        from_pretrained(tmp_path / "nowhere")

    _, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    cfg = json.loads((d / "config.json").read_text())
    for archs, match in ((["NoSuchModelForCausalLM"], r"\['NoSuchModelForCausalLM'\] name no model class"),
                         ([], r"'architectures' is empty")):
        (d / "config.json").write_text(json.dumps({**cfg, "architectures": archs}))
        with pytest.raises(FormatError, match=match):
            from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-type"}))
    with pytest.raises(FormatError, match=r"config.json cannot be read by transformers"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="damaged or truncated"):
        from_pretrained(d)
    assert isinstance(from_pretrained(d, verify=False), transformers.LlamaForCausalLM)


def test_a_meta_model_takes_the_file_tensors_without_a_copy(tmp_path):
    """load_quantized into a model built on the meta device gives each tensor the file's tensor itself,
    a tied pair one tensor, and a file tensor to one model tensor only."""
    q, d = _saved(tmp_path, make_model("gpt2"), PTQConfig())
    cfg = copy.deepcopy(q.config)
    with torch.device("meta"):
        fresh = transformers.GPT2LMHeadModel(cfg)
    for name, b in fresh.named_buffers():  # GPT-2's buffers are not saved: give them real values
        owner, _, leaf = name.rpartition(".")
        fresh.get_submodule(owner)._buffers[leaf] = torch.zeros_like(b, device="cpu")
    r = ptqrt.load_quantized(fresh, d)
    assert r.lm_head.weight is r.transformer.wte.weight
    ptrs = [p.data_ptr() for p in r.state_dict().values() if p.numel()]
    assert len(ptrs) - len(set(ptrs)) == 1  # only the tie shares storage
    _same_state(q, r)


def test_meta_model_holds_the_read_tensors_themselves(tmp_path, monkeypatch):
    """No copy: each tensor of a meta-built model is the tensor read from the file. A file tensor that
    two untied tensors of the model take (saved tied, loaded untied) is given to one and copied for the
    other, so that a write to one does not reach the other."""
    q, d = _saved(tmp_path, make_model("gpt2"), PTQConfig())
    read = {}
    original = ptqrt.format.read_tensors

    def recording(*a, **k):
        read.update(original(*a, **k))
        return read

    monkeypatch.setattr(ptqrt.format, "read_tensors", recording)
    r = from_pretrained(d)
    state = r.state_dict()
    assert all(state[n].data_ptr() == read[n].data_ptr() for n in state if state[n].numel())

    cfg = copy.deepcopy(q.config)
    cfg.tie_word_embeddings = False
    with torch.device("meta"):
        fresh = transformers.GPT2LMHeadModel(cfg)
    r = ptqrt.load_quantized(fresh, d)
    assert r.lm_head.weight is not r.transformer.wte.weight
    _same_state(q, r)
    r.transformer.wte.weight.data.add_(1.0)
    assert torch.equal(r.lm_head.weight, q.lm_head.weight)


def test_the_meta_mode_is_this_threads_only():
    """Another thread building a module while a load runs gets real tensors."""
    import threading

    from ptqrt.pretrained import _OnMeta

    got = {}
    with _OnMeta():
        t = threading.Thread(target=lambda: got.update(w=torch.nn.Linear(3, 2).weight, n=torch.nn.LayerNorm(3).weight))
        t.start()
        t.join()
        assert torch.nn.Linear(3, 2).weight.is_meta and torch.nn.LayerNorm(3).weight.is_meta
    assert not got["w"].is_meta and not got["n"].is_meta and not torch.nn.Linear(3, 2).weight.is_meta


def test_transformers_refusing_the_config_is_a_format_error(tmp_path):
    _, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))  # 64 is not a multiple of 5
    with pytest.raises(FormatError, match=r"config.json cannot be read by transformers .*Error"):
        from_pretrained(d)


def test_a_later_save_of_another_model_removes_the_config_files(tmp_path):
    _, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    assert (d / "config.json").is_file() and (d / "generation_config.json").is_file()
    save_quantized(quantize(tiny_net(), PTQConfig(), quiet=True), d)
    assert not (d / "config.json").exists() and not (d / "generation_config.json").exists()
    with pytest.raises(FormatError, match="has no config.json"):
        from_pretrained(d)


def test_a_model_with_only_its_linears_on_meta_is_materialized(tmp_path):
    q, d = _saved(tmp_path, make_model("llama"), PTQConfig())
    m = make_model("llama")
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.to("meta")
    r = ptqrt.load_quantized(m, d)
    assert not any(t.is_meta for t in r.state_dict().values())
    _same_state(q, r)
    assert torch.equal(r(_ids(96)).logits, q(_ids(96)).logits)


@pytest.mark.gpu
def test_loaded_onto_the_gpu(tmp_path):
    """device="cuda": every tensor there (the scales float32), the int8 KV cache decoding through the GPU
    kernels; logits within 2% of the CPU model's (other kernels, the same codes up to rounding ties)."""
    q, d = _saved(tmp_path, make_model("llama"), PTQConfig(**STATIC_KV))
    r = from_pretrained(d, device="cuda")
    assert {t.device.type for t in list(r.parameters()) + list(r.buffers())} == {"cuda"}
    assert r.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    ids = _ids(96)
    got, want = r(ids.cuda()).logits.cpu(), q(ids).logits
    assert (got - want).norm() / want.norm() < 0.02
    assert r.generate(ids.cuda(), max_new_tokens=4, do_sample=False).shape == (2, 11)
