"""The shipped tiny byte-level LM (ptqrt/data/tiny_lm): loads, is trained, and perplexity() counts right."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from ptqrt import tiny_lm  # noqa: E402
from ptqrt.tiny_lm import BOS_ID, decode, encode, load_tiny_lm, perplexity  # noqa: E402

# Measured held-out perplexity is 2.77 (split.json); this bound leaves margin for other
# torch/transformers versions while staying far below a byte unigram model (~24) and uniform (256).
MAX_HELDOUT_PPL = 3.5


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_tiny_lm()


def _manual_nll(model, ids, windows):
    """Sum of -log p over the given (begin, end, first scored) windows, one plain forward each."""
    total = 0.0
    for b, e, s in windows:
        inp = torch.cat([torch.tensor([BOS_ID]), ids[b:e]])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inp).logits[0, :-1].float(), -1)
        total -= logp[torch.arange(s - b, e - b), ids[s:e]].double().sum().item()
    return total


def test_shipped_files_and_split():
    d = tiny_lm.MODEL_DIR
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    assert size < 8 * 2**20, f"tiny LM folder is {size} bytes"
    with open(os.path.join(d, "split.json")) as f:
        split = json.load(f)
    with open(os.path.join(d, "heldout.txt"), "rb") as f:
        held = f.read()
    b, e = split["heldout"]
    assert e - b == len(held) and split["train"] == [0, b]
    assert split["metrics"]["heldout_perplexity"] < split["metrics"]["heldout_unigram_perplexity"] / 3


def test_heldout_perplexity_is_trained(lm):
    model, _, _, held = lm
    assert model.config.vocab_size == 258 and model.config.num_key_value_heads < model.config.num_attention_heads
    ppl = perplexity(model, held)
    assert math.isfinite(ppl) and 1.0 < ppl < MAX_HELDOUT_PPL, ppl


def test_perplexity_scores_every_byte_once(lm):
    model, _, _, held = lm
    ids = held[:600]
    # non-overlapping: windows [0, 256), [256, 512), [512, 600)
    got = perplexity(model, ids, seq_len=256, stride=256, batch_size=2)
    want = math.exp(_manual_nll(model, ids, [(0, 256, 0), (256, 512, 256), (512, 600, 512)]) / 600)
    assert math.isclose(got, want, rel_tol=1e-4), (got, want)
    # sliding: each window scores only the bytes past the previous window's end
    got = perplexity(model, ids, seq_len=256, stride=128, batch_size=3)
    wins = [(0, 256, 0), (128, 384, 256), (256, 512, 384), (384, 600, 512)]
    want = math.exp(_manual_nll(model, ids, wins) / 600)
    assert math.isclose(got, want, rel_tol=1e-4), (got, want)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, seq_len=64, stride=65)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, ids[:0])


def test_tokenizer_round_trip():
    text = "def f(x):\n    return x ** 2  # é, €, 😀"
    ids = encode(text, bos=True)
    assert ids[0] == BOS_ID and ids.dtype == torch.int64 and int(ids[1:].max()) < 256
    assert decode(ids) == text
    assert torch.equal(encode(text.encode()), ids[1:])


def test_greedy_generation_is_deterministic_and_matches_forward(lm):
    model, enc, dec, _ = lm
    prompt = enc("The ", bos=True)[None]
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        a = model.generate(prompt, **kw)
        b = model.generate(prompt, **kw)
    assert torch.equal(a, b)
    # the KV-cached decode agrees with argmax over full (uncached) forwards
    seq = prompt
    with torch.no_grad():
        for _ in range(24):
            nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert torch.equal(a, seq)
    assert len(dec(a[0, prompt.shape[1]:])) > 0


def test_bench_decode_script(tmp_path, monkeypatch):
    """bench/bench_decode.py end to end at its smallest: every form timed, ratios to the float model,
    the JSON written; the int8 KV forms really decode through the paged store."""
    import importlib.util

    from ptqrt.modules import kv_cache

    spec = importlib.util.spec_from_file_location("bench_decode_under_test",
                                                  os.path.join(os.path.dirname(__file__), "..", "bench",
                                                               "bench_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    decodes = []
    real = kv_cache.PagedInt8KV.decode
    monkeypatch.setattr(kv_cache.PagedInt8KV, "decode", lambda self, *a: (decodes.append(1), real(self, *a))[1])
    out = tmp_path / "decode.json"
    assert bench.main(["--tokens", "3", "--rounds", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["forms"]) == ["fp32", "W8A16", "W8A8 dynamic", "W8A8 dynamic + int8 KV", "int8 KV"]
    assert res["forms"]["fp32"]["vs_float"] == 1.0
    for r in res["forms"].values():
        assert len(r["ms"]) == 2 and 0 < r["min_ms"] <= r["median_ms"]
    # two int8 KV forms x (warm-up + 2 rounds) x (3 - 1 decode steps) x 4 layers
    assert len(decodes) == 2 * 3 * 2 * 4
    from ptqrt.modules.kv_cache import KVCacheQuant
    from ptqrt.modules.linear import QuantLinear

    models = bench.build(torch.device("cpu"))  # what each form is: the right modules in the model
    modes = {name: {m.mode for m in model.modules() if isinstance(m, QuantLinear)} for name, model in models.items()}
    kv = {name: any(isinstance(m, KVCacheQuant) for m in model.modules()) for name, model in models.items()}
    assert modes == {"fp32": set(), "W8A16": {"W8A16"}, "W8A8 dynamic": {"W8A8_DYNAMIC"},
                     "W8A8 dynamic + int8 KV": {"W8A8_DYNAMIC"}, "int8 KV": set()}
    assert kv == {"fp32": False, "W8A16": False, "W8A8 dynamic": False, "W8A8 dynamic + int8 KV": True,
                  "int8 KV": True}
    with pytest.raises(SystemExit):
        bench.main(["--tokens", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--profile", "no such form"])
    # --profile: one more generate of the named form, host time per token by function
    ids = bench.encode(bench.PROMPT, bos=True)[None]
    rows = bench.profile(models["int8 KV"], ids, 2, top=10_000)  # every function (the order varies)
    assert rows[0].split()[:2] == ["own", "us/tok"] and 20 < len(rows) < 10_001
    assert any("int8_kv_decode_attention" in r for r in rows)  # the store's kernel, seen by the profiler
    assert len(bench.profile(models["int8 KV"], ids, 2, top=5)) == 6
