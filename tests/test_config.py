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


# Ring-mini-linear-2.0's config.json as published (docs: /work/shared/reference/ring_linear_model.md §1).
RING_MINI_CONFIG_JSON = {
    "architectures": ["BailingMoeLinearV2ForCausalLM"], "model_type": "bailing_moe_linear",
    "auto_map": {"AutoConfig": "configuration_bailing_moe_linear_v2.BailingMoeLinearV2Config"},
    "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 157184, "max_position_embeddings": 131072,
    "rope_theta": 1000000, "rope_scaling": None, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "hidden_act": "silu", "use_rmsnorm": True, "use_bias": False, "use_qkv_bias": False, "use_qk_norm": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.56.1", "num_experts": 256,
    "num_experts_per_tok": 8, "num_shared_experts": 1, "moe_intermediate_size": 512,
    "moe_shared_expert_intermediate_size": 512, "first_k_dense_replace": 1, "n_group": 8, "topk_group": 4,
    "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "router_dtype": "fp32",
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "layer_group_size": 5, "group_norm_size": 4,
    "linear_silu": False, "num_nextn_predict_layers": 0, "embedding_dropout": 0.0, "attention_dropout": 0.0,
    "output_dropout": 0.0,
}


def test_the_published_ring_mini_config_json_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RING_MINI_CONFIG_JSON))
    config = RingLinearConfig.from_pretrained(tmp_path)
    mini = RingLinearConfig.preset("mini")
    assert config.layer_types == mini.layer_types and config.decay_layer_offset == 0
    assert {k: getattr(config, k) for k in RING_MINI_CONFIG_JSON if k != "auto_map"} == \
        {k: getattr(mini, k) for k in RING_MINI_CONFIG_JSON if k != "auto_map"}


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_experts",
                                   "layer_group_size"])
def test_a_config_json_must_give_the_fields_that_fix_the_shapes(field, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in RING_MINI_CONFIG_JSON.items() if k != field}))
    with pytest.raises(ValueError, match=rf"config.json lacks {field}: a config.json must give") as error:
        RingLinearConfig.from_pretrained(tmp_path)
    assert RingLinearConfig().vocab_size == 157184  # in Python the defaults stay Ring-mini's
    assert ("ringlinear convert" in str(error.value)) == (field == "layer_group_size")


def test_a_config_json_without_head_dim_derives_it_as_hugging_face_does(tmp_path):
    values = {**RING_MINI_CONFIG_JSON, "hidden_size": 1024, "num_attention_heads": 16, "moe_intermediate_size": 256}
    del values["head_dim"], values["moe_shared_expert_intermediate_size"], values["group_norm_size"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = RingLinearConfig.from_pretrained(tmp_path)
    assert config.head_dim == 64 and config.shared_expert_intermediate_size == 256


@pytest.mark.parametrize("field, value, expected", [
    ("rope_theta", "10000", "rope_theta='10000': must be a number"),
    ("num_experts", "16", "num_experts='16': must be an integer"),
    ("partial_rotary_factor", "half", "partial_rotary_factor='half': must be a number"),
    ("hidden_size", True, "hidden_size=True: must be an integer"),
    ("hidden_size", 2048.0, "hidden_size=2048.0: must be an integer"),
    ("use_qk_norm", 1, "use_qk_norm=1: must be true or false"),
    ("eos_token_id", [1, "2"], "eos_token_id=[1, '2']: must be an integer, a list of integers or null"),
    ("architectures", "BailingMoeLinearV2ForCausalLM", "must be a list of strings"),
    ("rope_scaling", [], "rope_scaling=[]: must be an object or null"),
])
def test_wrong_typed_fields_name_the_field_and_the_file(field, value, expected, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**RING_MINI_CONFIG_JSON, field: value}))
    with pytest.raises(ValueError) as error:
        RingLinearConfig.from_pretrained(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: ") and expected in str(error.value)
    with pytest.raises(ValueError, match=f"invalid config: {field}="):
        RingLinearConfig.preset("tiny", **{field: value})


def test_numbers_may_be_integers_and_token_ids_lists():
    config = RingLinearConfig.preset("tiny", rope_theta=10000, partial_rotary_factor=1, eos_token_id=[0, 1])
    assert (config.rope_theta, config.rotary_dim, config.eos_token_ids) == (10000, config.head_dim, [0, 1])
