"""Measured cache bytes equal the prediction; the expanded K/V path computes what the model computes."""

import pytest
import torch

from dsv2cli.analysis.kv_measure import (
    MAX_RANDOM_PARAMS,
    ExpandedKVCache,
    expanded_forward,
    measure_cache,
    measurement_config,
    random_model,
)
from dsv2cli.analysis.params import count_params
from dsv2cli.errors import InputError
from dsv2cli.presets import preset_config
from tests.helpers import assert_close_relative, reference_model, save_reference


@pytest.mark.parametrize("preset", ["tiny", "tiny-lite"])
def test_measured_equals_predicted_on_a_tiny_model(preset):
    config = preset_config(preset)
    m = measure_cache(config, preset, batch_size=2, context=24, decode_steps=4, dtype="float32")
    assert (m.weights, m.changes, m.prompt_tokens) == ("random", [], 20)
    latent, expanded = m.rows
    layers, c = config.num_hidden_layers, config
    assert latent.scheme == "mla" and latent.measured_bytes == latent.predicted_bytes
    assert latent.measured_bytes == layers * 2 * 24 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    per_head = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim
    assert expanded.scheme == "mla-expanded" and expanded.measured_bytes == expanded.predicted_bytes
    assert expanded.measured_bytes == layers * 2 * 24 * c.num_attention_heads * per_head * 4
    assert m.logit_difference < 1e-5  # both caches give the same logits
    assert latent.decode_step_seconds > 0 and expanded.decode_step_seconds > 0


def test_measured_in_bfloat16_with_fewer_layers():
    m = measure_cache(preset_config("tiny"), "tiny", batch_size=1, context=10, decode_steps=2, dtype="bfloat16", layers=1)
    assert m.changes == ["1 of 3 layers"] and m.config.num_hidden_layers == 1
    assert all(r.matches for r in m.rows)
    assert m.rows[0].measured_bytes == 1 * 1 * 10 * 40 * 2


def test_expanded_forward_matches_the_model():
    model = random_model(preset_config("tiny"), torch.float32)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(tokens)  # [B, S, V], no cache
        cache = ExpandedKVCache(model.config, 2, 12, torch.float32, torch.device("cpu"))
        assert_close_relative(expanded_forward(model, tokens[:, :9], cache)[:, 0], full[:, 8])
        for i in range(9, 12):
            assert_close_relative(expanded_forward(model, tokens[:, i : i + 1], cache)[:, 0], full[:, i])
        with pytest.raises(ValueError):
            expanded_forward(model, tokens[:, :1], cache)  # full


def test_measurement_config_keeps_attention_widths():
    config = preset_config("deepseek-v2")
    small, changes = measurement_config(config)
    assert small.num_hidden_layers == 2 and len(changes) == 2
    for name in ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        assert getattr(small, name) == getattr(config, name)
    assert count_params(small).total <= MAX_RANDOM_PARAMS
    assert measurement_config(preset_config("tiny")) == (preset_config("tiny"), [])


def test_measured_on_a_checkpoint(tmp_path):
    save_reference(reference_model(), tmp_path)
    from dsv2cli.config import load_config

    config = load_config(tmp_path)
    m = measure_cache(config, "ckpt", batch_size=1, context=16, decode_steps=3, dtype="float32", checkpoint=tmp_path)
    assert m.weights == "checkpoint" and m.config.num_hidden_layers == config.num_hidden_layers
    assert all(r.matches for r in m.rows) and m.logit_difference < 1e-5


def test_bad_measure_options():
    config = preset_config("tiny")
    with pytest.raises(InputError, match="`measure` runs"):
        measure_cache(config, "tiny", 1, 16, 2, "fp8")
    with pytest.raises(InputError, match="larger than `decode_steps`"):
        measure_cache(config, "tiny", 1, 4, 4, "float32")
    with pytest.raises(InputError, match="`measure_batch`"):
        measure_cache(config, "tiny", 0, 16, 2, "float32")


def test_a_measurement_that_does_not_fit_is_refused_before_allocating():
    """A long context's caches and scores are counted: refused with the sizes, nothing allocated (no MemoryError)."""
    from dsv2cli.checkpoint.fit import InsufficientMemoryError

    config = preset_config("deepseek-v2")
    with pytest.raises(InsufficientMemoryError) as caught:
        measure_cache(config, "deepseek-v2", batch_size=8, context=200_000, decode_steps=8, dtype="bfloat16")
    assert "available" in caught.value.message and "`measure_layers`" in caught.value.hint
