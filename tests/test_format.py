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


def _refused(d, match, model=None, **kw):
    """load_quantized(model, d) raises FormatError matching `match` and leaves the model as it was."""
    model = tiny_net(seed=9) if model is None else model
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FormatError, match=match):
        load_quantized(model, d, **kw)
    assert _untouched(model, before)


def test_truncated_file_is_refused_and_nothing_loaded(tmp_path):
    _, d = _packed(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _refused(d, "model.safetensors is damaged or truncated")
    _refused(d, "model.safetensors cannot be read", verify=False)


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
    _refused(d, r"'blocks.1.fc1.weight_scale' is missing", tiny_net())


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


# ----------------------------------------------------------------------------- dtype casts after quantize
CAST_CONFIGS = {
    "w8a16": PTQConfig(),
    "w8a16_g16": PTQConfig(weight_granularity="per_group", group_size=16),
    "w8a8_dynamic": PTQConfig(act_dtype="int8"),
    "w8a8_static_smooth": PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth"),
}
CASTS = {"half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(), "to_float16": lambda m: m.to(torch.float16)}
SCALES = ("weight_scale", "input_scale", "smooth_scale")


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("name", CAST_CONFIGS)
def test_dtype_cast_after_quantize_keeps_scales_float32_and_round_trips(tmp_path, name, cast):
    """model.half() / .bfloat16() / .to(dtype) after quantize: the bias and float tensors follow the cast,
    every scale stays float32 (the ops read float32 scales), forward runs and the save loads back."""
    q = CASTS[cast](quantize(tiny_net(), CAST_CONFIGS[name], calib(), quiet=True))
    dtype = q.embed.weight.dtype
    assert dtype in (torch.float16, torch.bfloat16)
    qlins = [m for m in q.modules() if isinstance(m, QuantLinear)]
    scales = [getattr(m, s) for m in qlins for s in SCALES if getattr(m, s) is not None]
    assert scales and all(t.dtype == torch.float32 for t in scales)
    assert all(m.bias.dtype == dtype for m in qlins if m.bias is not None)
    if name == "w8a8_static_smooth":  # fc2 follows a ReLU, not a norm: its smoothing stays in the module
        assert q.blocks[0].fc2.smooth_scale is not None and q.blocks[0].fc1.input_scale is not None
    ids = calib()[0]
    out = q(ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    save_quantized(q, tmp_path)
    loaded = load_quantized(CASTS[cast](tiny_net(seed=4)), tmp_path)
    assert torch.equal(loaded(ids), out)


def test_dtype_cast_moves_scales_with_the_device():
    q = quantize(tiny_net(), PTQConfig(act_dtype="int8", act_granularity="per_tensor"), calib(), quiet=True)
    fc1 = q.blocks[0].fc1
    q.to(device="meta", dtype=torch.float16)
    assert fc1.weight_scale.device.type == "meta" and fc1.weight_scale.dtype == torch.float32
    assert fc1.input_scale.device.type == "meta" and fc1.bias.dtype == torch.float16
    q = quantize(tiny_net(), PTQConfig(), quiet=True)
    scale = q.blocks[0].fc1.weight_scale.clone()
    q.half().float()
    assert torch.equal(q.blocks[0].fc1.weight_scale, scale)  # never rounded through float16


# ----------------------------------------------------------------------------- refused before any change
def _edit_description(d, edit):
    p = d / "quantization_description.json"
    desc = json.loads(p.read_text())
    edit(desc)
    p.write_text(json.dumps(desc))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(field_of_a_newer_ptqrt=1), "unknown fields"),
    (lambda c: c.update(group_size=-1), "group_size=-1"),
    (lambda c: c.update(layer_policies={"fc1": {"skip": ["fc1"]}}), "would be ignored"),
], ids=["unknown_field", "bad_value", "ignored_policy_field"])
def test_config_section_refused_before_the_model_changes(tmp_path, edit, match):
    _, d = _packed(tmp_path)
    _edit_description(d, lambda desc: edit(desc["config"]))
    _refused(d, rf"quantization_description.json: the 'config' section .*{match}")
    _edit_description(d, lambda desc: desc.update(config=["W8A8"]))
    _refused(d, "'config' section is damaged")


FC1 = "blocks.0.fc1"


@pytest.mark.parametrize("edit, match", [
    (lambda desc: desc["modules"][FC1].pop("in_features"), f"module '{FC1}' is damaged: 'in_features' is missing"),
    (lambda desc: desc["modules"][FC1].pop("has_smooth"), f"module '{FC1}' is damaged: 'has_smooth' is missing"),
    (lambda desc: desc["modules"][FC1].update(in_features="48"), "in_features must be a positive int; got '48'"),
    (lambda desc: desc["modules"][FC1].update(mode="W4A16"), "mode must be one of .*; got 'W4A16'"),
    (lambda desc: desc["modules"][FC1].update(bias_dtype="float99"), "bias_dtype must name a torch float dtype"),
    (lambda desc: desc["modules"][FC1].update(bias_dtype="int8"), "bias_dtype must name a torch float dtype"),
    (lambda desc: desc["modules"][FC1].update(kind="conv"), f"module '{FC1}' has kind 'conv'"),
    (lambda desc: desc["modules"].update({FC1: "linear"}), f"module '{FC1}' is damaged: expected a dict"),
    (lambda desc: desc["modules"][FC1].update(group_size=16), f"a module entry is damaged .*group_size=16"),
    (lambda desc: desc.update(aliases=["lm_head.weight"]), "'aliases' section is damaged"),
    (lambda desc: desc.update(files={"model.safetensors": None}), "'files' section is damaged"),
    (lambda desc: desc["parameters"].update({"embed.weight": "FLOAT"}), "tensor 'embed.weight' in 'parameters'"),
], ids=["no_in_features", "no_has_smooth", "str_in_features", "unknown_mode", "unknown_dtype", "int_bias_dtype",
        "unknown_kind", "entry_not_dict", "group_size_with_w8a8", "aliases_list", "files_value", "parameter_entry"])
def test_damaged_description_is_refused_naming_module_and_file(tmp_path, edit, match):
    _, d = _packed(tmp_path)
    _edit_description(d, edit)
    _refused(d, rf"quantization_description.json.*{match}")


# ----------------------------------------------------------------------------- a model on the meta device
def test_load_into_a_meta_model_materializes_it_on_the_cpu(tmp_path):
    q, d = _packed(tmp_path)
    with torch.device("meta"):
        fresh = tiny_net()
    loaded = load_quantized(fresh, d)
    tensors = list(loaded.state_dict().values()) + list(loaded.buffers())
    assert {t.device.type for t in tensors} == {"cpu"}
    assert loaded.lm_head.weight is loaded.embed.weight  # the tie is one tensor still
    for (n1, t1), (n2, t2) in zip(sorted(q.state_dict().items()), sorted(loaded.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert torch.equal(loaded(calib()[0]), q(calib()[0]))


def test_meta_model_with_an_unsaved_buffer_is_refused(tmp_path):
    _, d = _packed(tmp_path)
    with torch.device("meta"):
        fresh = tiny_net()
        fresh.blocks[1].register_buffer("table", torch.ones(4), persistent=False)  # e.g. a rotary table
    with pytest.raises(FormatError, match=r"'blocks.1.table' of the model is on the meta device"):
        load_quantized(fresh, d)
    assert not any(isinstance(m, QuantLinear) for m in fresh.modules())
    assert all(t.is_meta for t in fresh.state_dict().values())
