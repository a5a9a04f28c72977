"""`ptqrt eval` on the shipped tiny LM: the accuracy targets of int8 weights, activations and KV cache."""
import pytest

pytest.importorskip("transformers")

from ptqrt import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return {r["mode"]: r for r in evaluate.run(quick=True, quiet=True)}


def test_every_row_is_measured(rows):
    assert list(rows) == ["fp32"] + [label for label, _ in evaluate.configs()]
    assert rows["fp32"]["ppl"] < 4  # the model is trained: uniform over bytes would be 256


@pytest.mark.parametrize("mode", ["W8A16", "int8 KV", "W8A16+int8 KV"])
def test_within_half_a_percent(rows, mode):
    assert abs(rows[mode]["ppl_change"]) <= 0.005 and abs(rows[mode]["decode_ppl_change"]) <= 0.005, rows[mode]


@pytest.mark.parametrize("mode", ["W8A8 static+smooth", "W8A8 static+osl", "W8A8 dynamic"])
def test_w8a8_within_two_percent(rows, mode):
    assert abs(rows[mode]["ppl_change"]) <= 0.02 and abs(rows[mode]["decode_ppl_change"]) <= 0.02, rows[mode]


def test_int8_kv_greedy_matches_fp32(rows):
    assert rows["int8 KV"]["greedy_match"] >= 0.9
    assert rows["W8A16+int8 KV"]["greedy_match"] >= 0.9


def test_calibration_never_sees_heldout():
    import os
    with open(os.path.join(evaluate.tiny_lm.MODEL_DIR, "heldout.txt"), "rb") as f:
        held = f.read()
    for w in evaluate.calib_windows(8):
        assert bytes(w["input_ids"][0, 1:].tolist()) not in held


def test_unknown_rows_are_refused_before_loading(monkeypatch):
    def load():
        raise AssertionError("loaded the model before checking `only`")

    monkeypatch.setattr(evaluate.tiny_lm, "load_tiny_lm", load)
    with pytest.raises(ValueError, match=r"unknown rows \['nosuchrow'\]; choose from \['W8A16', 'W8A8 dynamic'"):
        evaluate.run(quick=True, only=["W8A16", "nosuchrow"], quiet=True)
