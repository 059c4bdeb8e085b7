import json

import pytest

from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import ConfigError
from dsv2cli.presets import PRESETS, preset_config, preset_hf_config


def test_both_rope_spellings_give_the_same_config():
    original = preset_hf_config("deepseek-v2")
    yarn = dict(original.pop("rope_scaling"))
    kind = yarn.pop("type")
    transformers5 = {**original, "rope_parameters": {"rope_type": kind, "rope_theta": original.pop("rope_theta"), **yarn}}
    a = preset_config("deepseek-v2")
    b = ModelConfig.from_hf(transformers5)
    assert a == b
    assert a.rope_scaling is not None and a.rope_scaling.factor == 40
    assert ModelConfig.from_hf(a.to_hf("transformers5")) == a
    assert ModelConfig.from_hf(a.to_hf("deepseek")) == a


def test_softmax_scale_matches_spec():
    assert preset_config("deepseek-v2").softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert preset_config("deepseek-v2-lite").softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert preset_config("deepseek-v2.5").softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_gready_is_greedy_and_null_q_lora_rank():
    hf = preset_hf_config("deepseek-v2-lite")
    hf["topk_method"] = "gready"
    config = ModelConfig.from_hf(hf)
    assert config.topk_method == "greedy"
    assert config.q_lora_rank is None


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("scoring_func", "sigmoid", "scoring_func"),
        ("topk_method", "noaux_tc", "topk_method"),
        ("n_group", 7, "n_group"),
        ("hidden_act", "gelu", "hidden_act"),
        ("model_type", "llama", "model_type"),
        ("num_experts_per_tok", 500, "num_experts_per_tok"),
        ("hidden_size", 0, "hidden_size"),
    ],
)
def test_unsupported_values_are_rejected_by_name(field, value, words):
    hf = preset_hf_config("deepseek-v2")
    hf[field] = value
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(hf)
    assert words in info.value.message
    assert repr(value) in info.value.message


def test_missing_required_field_and_bad_rope_type():
    hf = preset_hf_config("deepseek-v2")
    del hf["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_hf(hf)
    hf = preset_hf_config("deepseek-v2")
    hf["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="linear"):
        ModelConfig.from_hf(hf)


def test_unknown_keys_are_kept_not_dropped(tmp_path):
    hf = preset_hf_config("deepseek-v2-lite")
    hf["my_custom_key"] = 3
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = load_config(tmp_path)
    assert config.extra == {"my_custom_key": 3}
    assert config.to_hf()["my_custom_key"] == 3


def test_moe_layer_placement():
    hf = preset_hf_config("tiny")
    hf.update(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    config = ModelConfig.from_hf(hf)
    assert config.moe_layer_indices == [2, 4]


def test_every_preset_builds():
    for name in PRESETS:
        assert preset_config(name).kv_cache_elements_per_token_per_layer > 0


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "elsewhere")
