import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptqrt
from ptqrt import FormatError, PTQConfig, QuantLinear, load_quantized, quantize, save_quantized
from tests.models import calib, tiny_net

CONFIGS = [PTQConfig(), PTQConfig(weight_granularity="per_group", group_size=16), PTQConfig(act_dtype="int8"),
           PTQConfig(act_dtype="int8", act_granularity="per_tensor")]


def _packed(tmp_path, cfg=None, **save_kw):
    q = quantize(tiny_net(), cfg or PTQConfig(act_dtype="int8", act_granularity="per_tensor"), calib(), quiet=True)
    d = tmp_path / "packed"
    save_quantized(q, d, **save_kw)
    return q, d


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.mode + str(c.group_size))
def test_round_trip_is_bit_exact(tmp_path, cfg):
    q, d = _packed(tmp_path, cfg)
    loaded = load_quantized(tiny_net(seed=123), d)  # different random weights: all must be replaced
    for (n1, t1), (n2, t2) in zip(sorted(q.state_dict().items()), sorted(loaded.state_dict().items())):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    ids = calib()[0]
    assert torch.equal(q(ids), loaded(ids))
    assert loaded.ptqrt_config == cfg
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # tie kept


def test_description_records_modes(tmp_path):
    _, d = _packed(tmp_path)
    desc = json.loads((d / "quantization_description.json").read_text())
    assert desc["format_version"] == 1 and desc["ptqrt_version"] == ptqrt.__version__
    assert desc["parameters"]["blocks.0.fc1.weight"]["mode"] == "W8A8"
    assert desc["parameters"]["blocks.0.fc1.input_scale"]["mode"] == "W8A8"
    assert desc["parameters"]["embed.weight"]["mode"] == "FLOAT"
    assert desc["aliases"] == {"lm_head.weight": "embed.weight"}
    assert desc["config"]["act_granularity"] == "per_tensor"
    assert desc["modules"]["blocks.1.fc2"]["bias"] is False


def test_sharded_save_round_trips(tmp_path):
    q, d = _packed(tmp_path, max_shard_size=4000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (d / "model.safetensors").exists()
    loaded = load_quantized(tiny_net(seed=5), d)
    assert torch.equal(loaded(calib()[0]), q(calib()[0]))


def _untouched(model, before):
    return all(torch.equal(t, before[n]) for n, t in model.state_dict().items()) and \
        not any(isinstance(m, QuantLinear) for m in model.modules())


def test_truncated_file_is_refused_and_nothing_loaded(tmp_path):
    _, d = _packed(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    model = tiny_net(seed=9)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FormatError, match="model.safetensors is damaged or truncated"):
        load_quantized(model, d)
    assert _untouched(model, before)
    with pytest.raises(FormatError, match="model.safetensors cannot be read"):
        load_quantized(model, d, verify=False)
    assert _untouched(model, before)


def test_unknown_version_is_refused(tmp_path):
    _, d = _packed(tmp_path)
    p = d / "quantization_description.json"
    desc = json.loads(p.read_text())
    desc["format_version"] = 99
    p.write_text(json.dumps(desc))
    with pytest.raises(FormatError, match="format_version 99 is not supported"):
        load_quantized(tiny_net(), d)


def _rewrite(d, edit):
    """Change the tensors of a packed dir and fix the checksum, as a mismatched (not damaged) file."""
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    p = d / "quantization_description.json"
    desc = json.loads(p.read_text())
    from ptqrt.format import _sha256
    desc["files"]["model.safetensors"] = _sha256(f)
    p.write_text(json.dumps(desc))


def test_missing_tensor_named(tmp_path):
    _, d = _packed(tmp_path)
    _rewrite(d, lambda t: t.pop("blocks.1.fc1.weight_scale"))
    model = tiny_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FormatError, match=r"'blocks.1.fc1.weight_scale' is missing"):
        load_quantized(model, d)
    assert _untouched(model, before)


def test_shape_mismatch_named(tmp_path):
    _, d = _packed(tmp_path)
    _rewrite(d, lambda t: t.__setitem__("blocks.0.norm.weight", torch.ones(47)))
    with pytest.raises(FormatError, match=r"'blocks.0.norm.weight' in .*model.safetensors has shape \(47,\)"):
        load_quantized(tiny_net(), d)


def test_dtype_mismatch_and_extra_tensor_named(tmp_path):
    _, d = _packed(tmp_path)
    _rewrite(d, lambda t: t.__setitem__("blocks.0.fc1.weight", t["blocks.0.fc1.weight"].float()))
    with pytest.raises(FormatError, match=r"'blocks.0.fc1.weight' .* dtype torch.float32"):
        load_quantized(tiny_net(), d)
    _, d2 = _packed(tmp_path / "b")
    _rewrite(d2, lambda t: t.__setitem__("stray", torch.ones(2)))
    with pytest.raises(FormatError, match="stray"):
        load_quantized(tiny_net(), d2)


def test_wrong_architecture_named(tmp_path):
    _, d = _packed(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(FormatError, match="module 'blocks.0.fc1'"):
        load_quantized(other, d)


def test_missing_description_and_unquantized_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantization_description.json is missing"):
        load_quantized(tiny_net(), tmp_path)
    with pytest.raises(ValueError, match="quantize"):
        save_quantized(tiny_net(), tmp_path / "x")
