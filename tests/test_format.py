import copy
import json
import math
import re

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


# ----------------------------------------------------------------------------- damaged files seen by inspect
def _cut(d, keep):
    f = d / "model.safetensors"
    f.write_bytes(keep(f.read_bytes()))


@pytest.mark.parametrize("damage, match", [
    (lambda d: _cut(d, lambda b: b[:7]), "model.safetensors cannot be read .*header too small"),
    (lambda d: _cut(d, lambda b: b[:-100]), "model.safetensors cannot be read .*not fully covered"),
    (lambda d: _cut(d, lambda b: b"\xff" * 8 + b[8:]), "model.safetensors cannot be read"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
], ids=["header_cut", "data_cut", "garbage_header", "missing"])
def test_tensor_headers_refuse_a_damaged_file_naming_it(tmp_path, damage, match):
    from ptqrt.format import read_description, tensor_headers

    _, d = _packed(tmp_path)
    damage(d)
    with pytest.raises(FormatError, match=match):
        tensor_headers(d, read_description(d), load=lambda n: n.endswith("_scale"))


def test_inspect_of_a_truncated_file_is_one_line_with_status_2(tmp_path):
    """`ptqrt inspect` says what is wrong with the file in one line (status 2), not safetensors' traceback."""
    import os
    import subprocess
    import sys

    _, d = _packed(tmp_path)
    _cut(d, lambda b: b[:7])
    env = {k: v for k, v in os.environ.items() if k != "PTQRT_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "ptqrt", "inspect", str(d)], capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ptqrt inspect: error: ") and f"{d / 'model.safetensors'} cannot be read" in lines[0]


# ----------------------------------------------------------------------------- a damaged 'aliases' section
@pytest.mark.parametrize("aliases, match", [
    ({"blocks.0.fc1.weight_scale": "blocks.1.fc1.weight_scale"},  # both float32 [80]: it would load
     r"alias 'blocks.0.fc1.weight_scale' -> 'blocks.1.fc1.weight_scale' names a tensor the files hold"),
    ({"embed.weight": "embed.weight"}, "alias 'embed.weight' -> 'embed.weight' names a tensor the files hold"),
    ({"lm_head.weight": "tied.weight", "tied.weight": "embed.weight"},
     "alias 'lm_head.weight' points to 'tied.weight', which is itself an alias"),
    ({"lm_head.weight": "nowhere.weight"}, "alias 'lm_head.weight' points to 'nowhere.weight', which no file holds"),
], ids=["over_a_stored_tensor", "onto_itself", "to_an_alias", "to_nothing"])
def test_damaged_alias_is_refused_by_load_and_inspect(tmp_path, aliases, match):
    from ptqrt.format import read_description, tensor_headers

    _, d = _packed(tmp_path, PTQConfig())
    _edit_description(d, lambda desc: desc.update(aliases=aliases))
    _refused(d, rf"quantization_description.json: .*{match}")
    with pytest.raises(FormatError, match=match):
        tensor_headers(d, read_description(d))


def test_tensor_headers_hold_the_stored_tensors_only(tmp_path):
    from ptqrt.format import read_description, tensor_headers

    _, d = _packed(tmp_path)
    heads = tensor_headers(d, read_description(d), load=lambda n: n.endswith("_scale"))
    assert "embed.weight" in heads and "lm_head.weight" not in heads  # the tie is saved once
    assert heads["blocks.0.fc1.input_scale"][2] is not None and heads["blocks.0.fc1.weight"][2] is None


# ----------------------------------------------------------------------------- 'files' outside the directory
@pytest.mark.parametrize("entry", ["ABS", "../outside.safetensors", "sub/model.safetensors", "sub\\model.safetensors",
                                   ".", "..", ""], ids=["absolute", "parent", "subdir", "backslash", "dot", "dotdot",
                                                        "empty"])
def test_files_entry_that_is_not_a_file_of_the_directory_is_refused(tmp_path, entry):
    """A 'files' entry naming a good file (right checksum) anywhere but the packed directory itself is refused
    by read_description, so by load_quantized, inspect and from_pretrained alike."""
    from ptqrt import cli
    from ptqrt.format import read_description

    _, d = _packed(tmp_path)
    outside = tmp_path / "outside.safetensors"
    (d / "sub").mkdir()
    for f in (outside, d / "sub" / "model.safetensors", d / "sub\\model.safetensors"):
        f.write_bytes((d / "model.safetensors").read_bytes())
    entry = str(outside) if entry == "ABS" else entry
    _edit_description(d, lambda desc: desc.update(files={entry: desc["files"]["model.safetensors"]}))
    (d / "model.safetensors").unlink()
    match = rf"the 'files' section is damaged: {re.escape(repr(entry))} is not the name of a file in"
    with pytest.raises(FormatError, match=match):
        read_description(d)
    _refused(d, match)
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", str(d)])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- scale values
SMOOTH = PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth")  # fc2 keeps its smooth_scale


def _set_scale(name, value, index=-1):
    def edit(t):
        x = t[name].clone()
        x.view(-1)[index] = value
        t[name] = x
    return edit


@pytest.mark.parametrize("leaf, value, match", [
    ("weight_scale", -0.5, "holds -0.5 at \\[47\\] .*a weight scale .* must be >= 0"),
    ("weight_scale", -math.inf, "holds -inf at \\[47\\] .*a weight scale"),
    ("input_scale", math.nan, "holds nan at \\[0\\] .*an input or KV scale .* must be a number >= 0"),
    ("input_scale", -1.0, "holds -1.0 at \\[0\\] .*an input or KV scale"),
    ("smooth_scale", 0.0, "holds 0.0 at \\[79\\] .*a smooth scale must be finite and > 0"),
    ("smooth_scale", math.inf, "holds inf at \\[79\\] .*a smooth scale must be finite and > 0"),
    ("smooth_scale", math.nan, "holds nan at \\[79\\] .*a smooth scale must be finite and > 0"),
], ids=["weight_negative", "weight_minus_inf", "input_nan", "input_negative", "smooth_zero", "smooth_inf",
        "smooth_nan"])
def test_a_scale_no_saved_model_holds_is_refused_naming_tensor_and_value(tmp_path, leaf, value, match):
    """A scale written by another tool (checksum right) that ptqrt never writes is refused before the model changes."""
    _, d = _packed(tmp_path, SMOOTH)
    name = f"blocks.0.fc2.{leaf}"
    _rewrite(d, _set_scale(name, value))
    _refused(d, rf"tensor '{re.escape(name)}' in .*model.safetensors {match}", tiny_net())


def test_scales_a_saved_model_can_hold_still_load(tmp_path):
    """quantize() takes a float model with a NaN / Inf weight (its scale passes it through) and one with subnormal
    weights (absmax / 127 rounds to a 0 scale); a static input range can also give 0 (that rounding) or Inf
    (max |x| / s past float32): each loads back bit for bit."""
    net = tiny_net()
    with torch.no_grad():
        net.blocks[0].fc1.weight[3] = math.nan
        net.blocks[0].fc1.weight[4] = math.inf
        net.blocks[1].fc1.weight[5] = 1e-44
    q = quantize(net, SMOOTH, calib(), quiet=True)
    ws = q.blocks[0].fc1.weight_scale
    assert ws[3].isnan() and ws[4].isinf() and q.blocks[1].fc1.weight_scale[5] == 0
    d = tmp_path / "packed"
    save_quantized(q, d)
    _rewrite(d, _set_scale("blocks.0.fc2.input_scale", 0.0))
    _rewrite(d, _set_scale("blocks.1.fc2.input_scale", math.inf))
    loaded = load_quantized(tiny_net(seed=3), d)
    assert loaded.blocks[0].fc2.input_scale.item() == 0 and loaded.blocks[1].fc2.input_scale.item() == math.inf
    for n, t in q.state_dict().items():
        if not n.endswith("fc2.input_scale"):
            torch.testing.assert_close(loaded.state_dict()[n], t, rtol=0, atol=0, equal_nan=True, msg=n)


@pytest.mark.parametrize("leaf, value, refused", [
    ("gate_up_proj_scale", -1.0, True), ("gate_up_proj_scale", math.nan, False), ("down_proj_scale", 0.0, False),
    ("gate_up_proj_input_scale", math.nan, True), ("down_proj_input_scale", math.inf, False),
    ("down_proj_smooth_scale", 0.0, True), ("up_proj_smooth_scale", 1e-5, False),
    ("k_scale", -1.0, True), ("v_scale", math.nan, True), ("k_scale", math.inf, False), ("v_scale", 0.0, False),
    ("weight", -1.0, False), ("bias", math.nan, False),
])
def test_scale_rules_of_experts_and_kv_cache_buffers(leaf, value, refused):
    """QuantExperts' P_scale / P_input_scale / P_smooth_scale and KVCacheQuant's k_scale / v_scale follow the rules
    of QuantLinear's weight / input / smooth scales; other tensors have none."""
    from ptqrt.format import _scale_rule

    rule = _scale_rule(leaf)
    assert (rule is not None and bool(rule[0](torch.tensor([1.0, value])).any())) == refused
