"""The one-token decode step written for torch.compile, run eagerly: the same logits as the model with its cache."""

import pytest
import torch

from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.model.decode import decode_step, transposed_key_weights
from dsv2cli.model.fusion import fuse_projections
from dsv2cli.model.quantized import quantize_int8
from tests.helpers import reference_model, save_reference


def _prefilled(model, prompt: torch.Tensor, capacity: int):
    cache = model.new_cache(1, capacity)
    return cache, model(prompt, cache=cache, last_only=True)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # q_lora, group-limited routing, YaRN, first layer dense
        {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    ],
    ids=["q_lora-group_limited", "no_q_lora-greedy"],
)
def test_decode_step_equals_the_model_with_its_cache(tmp_path, overrides):
    save_reference(reference_model(seed=3, **overrides), tmp_path)
    model = fuse_projections(load_hf_checkpoint(tmp_path))
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(5))  # past YaRN's 16 positions
    with torch.inference_mode():
        expected_cache, logits = _prefilled(model, prompt, 40)
        cache, _ = _prefilled(model, prompt, 40)
        key_weights = transposed_key_weights(model)
        token = logits[:, -1:].argmax(-1)
        for _ in range(6):
            expected = model(token, cache=expected_cache)
            got = decode_step(model, key_weights, token, torch.tensor([cache.length]), cache.entries)
            cache.advance(1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)
        # The step wrote the same latent entries into the same slots, and nothing past them.
        torch.testing.assert_close(cache.entries, expected_cache.entries, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(cache.entries[:, :, cache.length :]) == 0


def test_decode_step_on_int8_weights_stays_with_the_int8_model(tmp_path):
    save_reference(reference_model(seed=4), tmp_path)
    model = fuse_projections(quantize_int8(load_hf_checkpoint(tmp_path)))
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected_cache, logits = _prefilled(model, prompt, 20)
        cache, _ = _prefilled(model, prompt, 20)
        key_weights = transposed_key_weights(model)
        token = logits[:, -1:].argmax(-1)
        for _ in range(4):
            expected = model(token, cache=expected_cache)
            got = decode_step(model, key_weights, token, torch.tensor([cache.length]), cache.entries)
            cache.advance(1)
            # Both quantize the same activations; the absorbed products sum in another order, which can move
            # an activation across a rounding boundary of its int8 grid.
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
            assert got.argmax() == expected.argmax()
            token = expected[:, -1:].argmax(-1)


def test_transposed_key_weights_are_w_uk_per_head(tmp_path):
    save_reference(reference_model(seed=1), tmp_path)
    model = load_hf_checkpoint(tmp_path)
    (weights, *_) = transposed_key_weights(model)
    attention = model.layers[0].self_attn
    heads, nope, rank = attention.num_heads, attention.nope_dim, attention.kv_lora_rank
    kv_b = attention.kv_b_proj.weight.view(heads, nope + attention.v_dim, rank)
    assert weights.shape == (heads, rank, nope) and weights.is_contiguous()
    torch.testing.assert_close(weights, kv_b[:, :nope].transpose(1, 2), rtol=0, atol=0)
