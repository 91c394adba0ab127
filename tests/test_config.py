import json

import pytest

from ringlinear import RingLinearConfig
from ringlinear.config import alibi_slopes, lightning_log_decay


def softmax_layers(config):
    return [i for i in range(config.num_hidden_layers) if config.is_softmax_layer(i)]


def test_layer_maps_of_the_published_models():
    assert softmax_layers(RingLinearConfig.preset("mini")) == [4, 9, 14, 19]
    assert softmax_layers(RingLinearConfig.preset("flash")) == [7, 15, 23, 31]
    # The tail rule: layers past the last full group are softmax too.
    assert softmax_layers(RingLinearConfig.preset("mini", num_hidden_layers=22)) == [4, 9, 14, 19, 20, 21]
    assert softmax_layers(RingLinearConfig.preset("mini", layer_group_size=1)) == list(range(20))


def test_alibi_slopes_for_16_heads():
    slopes = alibi_slopes(16)
    assert slopes[:4] == pytest.approx([0.70710678, 0.5, 0.35355339, 0.25])
    assert slopes[-1] == pytest.approx(0.00390625)
    assert slopes == pytest.approx([2 ** (-0.5 * (h + 1)) for h in range(16)])
    # Not a power of two: the 8-head series, then every other slope of the 16-head one.
    assert alibi_slopes(12) == pytest.approx(alibi_slopes(8) + alibi_slopes(16)[0::2][:4])


@pytest.mark.parametrize("offset, factors", [
    (0, {0: 1.00001, 1: 0.94738, 18: 0.05264, 19: 0.00001}),  # vLLM / SGLang / Megatron
    (1, {0: 1.05264, 1: 1.00001, 2: 0.94738, 18: 0.10527}),  # HF remote code
])
def test_layer_scaled_decay(offset, factors):
    config = RingLinearConfig.preset("mini", decay_layer_offset=offset)
    for layer, factor in factors.items():
        decay = lightning_log_decay(config, layer)
        assert decay == pytest.approx([-s * factor for s in alibi_slopes(16)], rel=1e-4)
        assert all(g < 0 for g in decay)


def test_mini_preset_is_ring_mini_linear():
    c = RingLinearConfig.preset("mini")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 20, 16, 4)
    assert (c.num_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert (c.rotary_dim, c.group_norm_size, c.routed_scaling_factor) == (64, 4, 2.5)


def test_config_json_round_trip_keeps_unknown_fields(tmp_path):
    values = RingLinearConfig.preset("mini").to_dict()
    values.pop("decay_layer_offset")  # absent means 0
    values["auto_map"] = {"AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = RingLinearConfig.from_pretrained(tmp_path)
    assert config.decay_layer_offset == 0
    config.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == values["auto_map"]
    assert saved["layer_group_size"] == 5 and saved["model_type"] == "bailing_moe_linear"
    assert RingLinearConfig.from_pretrained(tmp_path) == config


@pytest.mark.parametrize("field, value", [
    ("num_key_value_heads", 3),
    ("n_group", 7),
    ("topk_group", 9),
    ("score_function", "relu"),
    ("num_experts_per_tok", 0),
    ("group_norm_size", 5),
    ("decay_layer_offset", 2),
    ("partial_rotary_factor", 0.0),
    ("hidden_size", -1),
    ("layer_group_size", 0),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RingLinearConfig.preset("mini", **{field: value})


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        RingLinearConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RingLinearConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        RingLinearConfig.preset("huge")
