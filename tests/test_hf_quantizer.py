"""transformers' own from_pretrained loads a packed directory (the "ptqrt" quantization method that
config.json names): the model ptqrt saved, tensor for tensor, the int8 KV cache wired, fused experts
(Mixtral's, Llama-4's) included; save_pretrained of it loads again."""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ptqrt  # noqa: E402
from ptqrt import FormatError, PTQConfig, QuantLinear, quantize, save_quantized  # noqa: E402
from ptqrt.modules.experts import QuantExperts  # noqa: E402
from ptqrt.modules.kv_cache import KVCacheQuant  # noqa: E402

from test_experts import _model as moe_model  # noqa: E402
from test_experts_llama4 import _model as llama4_model  # noqa: E402
from test_hf_kv_cache import make_model, returned_cache  # noqa: E402
from ptqrt.integrations.hf import Int8KVCache  # noqa: E402

STATIC = dict(act_dtype="int8", act_granularity="per_tensor")
CASES = {
    "llama_static_kv8": (lambda: make_model("llama"), PTQConfig(**STATIC, outliers="smooth", kv_cache_dtype="int8",
                                                                 kv_granularity="per_channel"), 96),
    "gpt2_dynamic": (lambda: make_model("gpt2"), PTQConfig(act_dtype="int8"), 96),
    "mixtral_static_smooth": (lambda: moe_model("mixtral"), PTQConfig(**STATIC, outliers="smooth"), 97),
    "llama4_w8a16": (llama4_model, PTQConfig(), 97),
}


def _calib(vocab):
    return [torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _ids(vocab):
    return torch.randint(1, vocab, (1, 7), generator=torch.Generator().manual_seed(9))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for n in sa:
        assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n]), n


@pytest.mark.parametrize("case", list(CASES))
def test_automodel_loads_the_packed_directory(case, tmp_path):
    build, cfg, vocab = CASES[case]
    q = quantize(build(), cfg, _calib(vocab), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ptqrt" and qc["config"] == q.ptqrt_config.to_dict()
    r = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    assert type(r) is type(q) and not r.training
    assert r.ptqrt_config == q.ptqrt_config
    for cls in (QuantLinear, QuantExperts, KVCacheQuant):
        assert sum(isinstance(m, cls) for m in r.modules()) == sum(isinstance(m, cls) for m in q.modules())
    assert not any(t.is_meta for t in list(r.parameters()) + list(r.buffers()))
    _same(q, r)
    ids = _ids(vocab)
    assert torch.equal(r(ids).logits, q(ids).logits)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(r.generate(ids, **kw), q.generate(ids, **kw))
    if any(isinstance(m, KVCacheQuant) for m in q.modules()):  # the int8 KV cache is wired: generate uses it
        out = r.generate(ids, **kw, return_dict_in_generate=True)
        assert isinstance(returned_cache(out), Int8KVCache)
    # save_pretrained of it writes what loads this way again
    r.save_pretrained(str(tmp_path / "again"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"))
    _same(q, again)
    assert torch.equal(again(ids).logits, q(ids).logits)


def test_automodel_of_a_causal_lm_directory_gets_its_base_model(tmp_path):
    """AutoModel loads the base model of a causal LM's directory (names without the 'model.' prefix, no
    lm_head): its quantized modules too."""
    q = quantize(make_model("llama"), PTQConfig(act_dtype="int8"), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    base = transformers.AutoModel.from_pretrained(str(d))
    assert type(base) is transformers.LlamaModel
    assert sum(isinstance(m, QuantLinear) for m in base.modules()) == 7 * 2  # lm_head is the head's
    ids = _ids(96)
    want = q.model(ids).last_hidden_state
    assert torch.equal(base(ids).last_hidden_state, want)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embeddings_base_model_and_a_quantized_tied_head(arch, tmp_path):
    """A tied embedding is stored under its own name (transformers' base model finds it; lm_head is the
    alias); a quantized lm_head that was tied to it is no tie any more, and loads."""
    over = {} if arch == "gpt2" else {"tie_word_embeddings": True}
    for skip in (["lm_head"], []):
        q = quantize(make_model(arch, **over), PTQConfig(act_dtype="int8", skip=skip), quiet=True)
        d = save_quantized(q, tmp_path / f"packed{len(skip)}")
        desc = json.loads((d / "quantization_description.json").read_text())
        ids = _ids(96)
        if skip:
            assert list(desc["aliases"]) == ["lm_head.weight"]
            base = transformers.AutoModel.from_pretrained(str(d))
            assert torch.equal(base(ids).last_hidden_state, q.base_model(ids).last_hidden_state)
        r = transformers.AutoModelForCausalLM.from_pretrained(str(d))
        assert isinstance(r.lm_head, QuantLinear) == (not skip)
        _same(q, r)
        assert torch.equal(r(ids).logits, q(ids).logits)


def test_a_model_loaded_by_transformers_pickles(tmp_path):
    import io

    q = quantize(make_model("llama"), PTQConfig(act_dtype="int8"), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    r = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    buf = io.BytesIO()
    torch.save(r, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back(_ids(96)).logits, q(_ids(96)).logits)


@pytest.mark.parametrize("damage, match", [
    (lambda qc: qc.update(modules=None), "with modules NoneType"),
    (lambda qc: qc.update(format_version=99), "format version 99"),
    (lambda qc: qc["modules"]["model.layers.0.self_attn.q_proj"].pop("mode"), "'mode' is missing"),
])
def test_a_damaged_quantization_config_is_a_format_error(damage, match, tmp_path):
    q = quantize(make_model("llama"), PTQConfig(), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    cfg = json.loads((d / "config.json").read_text())
    damage(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(str(d))


def test_a_config_that_does_not_fit_the_model_is_a_format_error(tmp_path):
    q = quantize(make_model("llama"), PTQConfig(), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    cfg = json.loads((d / "config.json").read_text())
    modules = cfg["quantization_config"]["modules"]
    modules["model.layers.0.no_such_proj"] = modules.pop("model.layers.0.self_attn.q_proj")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="quantization_config does not fit LlamaForCausalLM"):
        transformers.AutoModelForCausalLM.from_pretrained(str(d))


def test_a_dtype_asked_of_from_pretrained_takes_the_biases_the_scales_stay_float32(tmp_path):
    """dtype=torch.bfloat16 on a float32 directory: float weights and QuantLinear biases in bfloat16, as
    .to(torch.bfloat16) of the saved model gives them, and the scales float32."""
    q = quantize(make_model("qwen2"), PTQConfig(act_dtype="int8"), quiet=True)  # q/k/v have biases
    d = save_quantized(q, tmp_path / "packed")
    r = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    want = q.to(torch.bfloat16)
    lin = r.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QuantLinear) and lin.bias.dtype == torch.bfloat16 and lin.weight_scale.dtype == torch.float32
    _same(want, r)


def test_a_model_whose_linears_all_stay_float_loads(tmp_path):
    """Every linear skipped: no module entry, and the model loads as it was saved."""
    q = quantize(make_model("llama"), PTQConfig(skip=[".*"]), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    assert json.loads((d / "config.json").read_text())["quantization_config"]["modules"] == {}
    r = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    _same(q, r)


def test_a_float_model_is_not_quantized_on_load(tmp_path):
    """ptqrt quantizes with ptqrt.quantize (calibration), never while transformers loads a float model."""
    make_model("llama").save_pretrained(str(tmp_path / "float"))
    with pytest.raises(ValueError, match="does not quantize a float model while transformers loads it"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "float"),
                                                          quantization_config={"quant_method": "ptqrt"})


@pytest.mark.parametrize("order", ["ptqrt first", "ptqrt, a lookup, then transformers", "transformers first"])
def test_registered_whichever_is_imported_first(order, tmp_path):
    """import ptqrt registers the method at once when transformers is imported, else as soon as it is
    (without importing it itself: users without transformers do not pay for it)."""
    q = quantize(make_model("llama"), PTQConfig(), quiet=True)
    d = save_quantized(q, tmp_path / "packed")
    imports = {"ptqrt first": "import ptqrt, sys; assert 'transformers' not in sys.modules; import transformers",
               # a lookup without an import (is transformers installed?) leaves the registration to come
               "ptqrt, a lookup, then transformers": "import ptqrt, importlib.util; "
                                                     "importlib.util.find_spec('transformers'); "
                                                     "import transformers",
               "transformers first": "import transformers, ptqrt"}[order]
    code = (f"{imports}\nm = transformers.AutoModelForCausalLM.from_pretrained({str(d)!r})\n"
            f"print(type(m.model.layers[0].self_attn.q_proj).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("QuantLinear")


def test_save_pretrained_of_a_quantized_model_loads_back(tmp_path):
    """quantize (and load_quantized) give the model the quantization_config, so its own save_pretrained
    writes what transformers' from_pretrained loads: the int8 model, not float linears over int8 codes."""
    calib = _calib(96)
    q = quantize(make_model("llama"), PTQConfig(**STATIC, kv_cache_dtype="int8"), calib, quiet=True)
    assert q.config.quantization_config["quant_method"] == "ptqrt"
    q.save_pretrained(str(tmp_path / "hf"))
    r = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    _same(q, r)
    ids = _ids(96)
    assert torch.equal(r(ids).logits, q(ids).logits)
    with pytest.raises(FileNotFoundError, match="written by transformers' save_pretrained"):
        ptqrt.from_pretrained(tmp_path / "hf")
    loaded = ptqrt.from_pretrained(save_quantized(q, tmp_path / "packed"))
    loaded.save_pretrained(str(tmp_path / "hf2"))
    assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2"))(ids).logits,
                       q(ids).logits)
