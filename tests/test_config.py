import re

import pytest

from ptqrt import PTQConfig


def test_defaults_are_w8a16_per_channel():
    c = PTQConfig()
    assert c.mode == "W8A16" and c.skip == ["lm_head"] and not c.needs_calibration


@pytest.mark.parametrize("kw, field", [
    (dict(weight_dtype=None, act_dtype="int8"), "weight_dtype"),  # activation-only
    (dict(weight_dtype="int4"), "weight_dtype"),
    (dict(act_dtype="fp8"), "act_dtype"),
    (dict(act_granularity="per_channel"), "act_granularity"),
    (dict(weight_granularity="per_row"), "weight_granularity"),
    (dict(weight_granularity="per_group"), "group_size"),  # per-group without a size
    (dict(weight_granularity="per_group", group_size=100), "group_size"),
    (dict(group_size=64), "group_size"),  # a size without per_group
    (dict(weight_granularity="per_group", group_size=64, act_dtype="int8"), "weight_granularity"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
    (dict(kv_granularity="per_block"), "kv_granularity"),
    (dict(outliers="awq"), "outliers"),
    (dict(outliers="smooth"), "outliers"),  # smoothing needs int8 activations
    (dict(precision_recovery="awq"), "precision_recovery"),
    (dict(smooth_alpha=1.5, act_dtype="int8"), "smooth_alpha"),
    (dict(gptq_act_order=True), "gptq_act_order"),
    (dict(skip="("), "skip"),
    (dict(layer_policies={"a": 3}), "layer_policies"),
    # options that would do nothing
    (dict(act_granularity="per_tensor"), "act_granularity='per_tensor' .* needs act_dtype='int8'"),
    (dict(kv_granularity="per_channel"), "kv_granularity='per_channel' .* needs kv_cache_dtype='int8'"),
    (dict(act_dtype="int8", outliers="smooth", smooth_alpha=True), "smooth_alpha=True"),
    (dict(layer_policies={re.compile("fc1"): PTQConfig()}), "layer_policies: keys must be regex strings"),
    (dict(layer_policies={"fc1": PTQConfig(skip=["fc1"])}),
     r"layer_policies\['fc1'\]\.skip=\['fc1'\] would be ignored"),
    (dict(layer_policies={"fc1": PTQConfig(kv_cache_dtype="int8")}),
     r"\['fc1'\]\.kv_cache_dtype='int8' would be ignored"),
    (dict(kv_cache_dtype="int8", layer_policies={"fc1": {"kv_cache_dtype": "int8", "kv_granularity": "per_channel"}}),
     r"\['fc1'\]\.kv_cache_dtype='int8' would be ignored"),
    (dict(layer_policies={"fc": PTQConfig(layer_policies={"fc1": PTQConfig()})}),
     r"\['fc'\]\.layer_policies=.* would be ignored"),
])
def test_invalid_combinations_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        PTQConfig(**kw)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'per_token', 'per_tensor'"):
        PTQConfig(act_dtype="int8", act_granularity="dynamic")


def test_modes_and_policies():
    c = PTQConfig(act_dtype="int8", act_granularity="per_tensor",
                  layer_policies={r"\.fc2$": PTQConfig(weight_granularity="per_group", group_size=64)})
    assert c.mode == "W8A8" and c.needs_calibration
    assert c.for_layer("layers.0.fc2").mode == "W8A16"
    assert c.for_layer("layers.0.fc1") is c
    assert PTQConfig(act_dtype="int8").mode == "W8A8_DYNAMIC"
    assert c.is_skipped("model.lm_head") and not c.is_skipped("layers.0.fc1")


def test_a_plain_name_matches_literally_and_a_regex_as_a_regex():
    """A dotted name's dots are dots: "layers.1." is layer 1 only (as a regex it also took layers.10-19,
    and "layers.1.q" took "layers.1_q"); a pattern with other characters is still a regex."""
    c = PTQConfig(skip=["model.layers.1.", "lm_head"],
                  layer_policies={"layers.2.mlp": PTQConfig(weight_granularity="per_group", group_size=64),
                                  r"layers\.[0-9]+\.attn\.o$": PTQConfig(act_dtype="int8")})
    assert c.is_skipped("model.layers.1.mlp.fc") and c.is_skipped("model.lm_head")
    for name in ("model.layers.10.mlp.fc", "model.layers.19.attn", "model.layers.11.x"):
        assert not c.is_skipped(name), name
    assert c.for_layer("model.layers.2.mlp.fc").weight_granularity == "per_group"
    assert c.for_layer("model.layers.2xmlp.fc") is c
    assert c.for_layer("model.layers.12.attn.o").act_dtype == "int8"
    assert c.for_layer("model.layers.12.attn.q") is c
    assert not PTQConfig(skip=["block-1."]).is_skipped("block-10.fc")  # "-" is a name character too
    assert PTQConfig(skip=["^embed", "fc[12]$"]).is_skipped("layers.0.fc2")
    assert not PTQConfig(skip=["^embed"]).is_skipped("model.embed")


def test_dict_round_trip():
    c = PTQConfig(act_dtype="int8", skip=["lm_head", "^embed"], layer_policies={"fc2": {"group_size": 0}})
    d = c.to_dict()
    assert PTQConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown fields"):
        PTQConfig.from_dict({**d, "bits": 4})
    for bad in (["act_dtype"], {**d, "layer_policies": ["fc2"]}, {**d, "layer_policies": {"fc2": 3}}):
        with pytest.raises(ValueError, match="dict"):
            PTQConfig.from_dict(bad)


def test_policy_keeps_model_wide_defaults():
    """A policy that leaves the model-wide fields alone is fine, whatever the top level sets."""
    c = PTQConfig(act_dtype="int8", skip=["lm_head", "fc3"], kv_cache_dtype="int8", kv_granularity="per_channel",
                  layer_policies={"fc1": PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth",
                                                   smooth_alpha=1)})
    assert c.for_layer("blocks.0.fc1").smooth_alpha == 1 and c.for_layer("blocks.0.fc2") is c
