"""The one-token decode step written for torch.compile, run eagerly: the same logits as the model with its cache."""

import pytest
import torch

from dsv2cli import kernels
from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.model.decode import absorbed_weights, decode_step
from dsv2cli.model.fusion import fuse_projections
from dsv2cli.model.quantized import Int8Linear, Int8RoutedExperts, dequantize_rows, quantize_int8
from tests.helpers import reference_model, save_reference


def _prefilled(model, prompt: torch.Tensor, capacity: int, dtype: torch.dtype | None = None):
    cache = model.new_cache(1, capacity, dtype=dtype)
    return cache, model(prompt, cache=cache, last_only=True)


def _side_by_side(reference, model, weights, expected_cache, cache, token, steps: int, attention_kernel: bool = False):
    """Yield ``(got, expected)`` per step: ``decode_step`` on ``model`` and ``cache``, ``reference`` on its own cache.

    Both read the token ``reference`` chose at the step before (greedy), starting from ``token``.
    """
    for _ in range(steps):
        expected = reference(token, cache=expected_cache)
        got = decode_step(model, weights, token, torch.tensor([cache.length]), cache.entries, attention_kernel)
        cache.advance(1)
        yield got, expected
        token = expected[:, -1:].argmax(-1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # q_lora, group-limited routing, YaRN, first layer dense
        {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    ],
    ids=["q_lora-group_limited", "no_q_lora-greedy"],
)
@pytest.mark.parametrize("attention_kernel", [False, True], ids=["blas", "kernel"])
def test_decode_step_equals_the_model_with_its_cache(tmp_path, overrides, attention_kernel):
    if attention_kernel and not kernels.load():
        pytest.skip("the C++ kernels do not build here (see the logged reason)")
    save_reference(reference_model(seed=3, **overrides), tmp_path)
    model = fuse_projections(load_hf_checkpoint(tmp_path))
    prompt = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(5))  # past YaRN's 16 positions
    with torch.inference_mode():
        expected_cache, logits = _prefilled(model, prompt, 40)
        cache, _ = _prefilled(model, prompt, 40)
        token = logits[:, -1:].argmax(-1)
        weights = absorbed_weights(model)
        for got, expected in _side_by_side(model, model, weights, expected_cache, cache, token, 6, attention_kernel):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The step wrote the same latent entries into the same slots, and nothing past them (to float32
        # rounding: the step applies each RMSNorm's factor after the weight products, decode._normed).
        torch.testing.assert_close(cache.entries, expected_cache.entries, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(cache.entries[:, :, cache.length :]) == 0


def _dequantized_twin(int8_model, float_model):
    """``float_model`` with every weight ``int8_model`` quantized replaced by its dequantized value."""
    float_modules = dict(float_model.named_modules())
    with torch.no_grad():
        for name, module in int8_model.named_modules():
            if isinstance(module, Int8Linear):
                float_modules[name].weight.copy_(dequantize_rows(module.weight, module.scale, torch.float32))
            elif isinstance(module, Int8RoutedExperts):
                twin = float_modules[name]
                twin.gate_up_proj.copy_(dequantize_rows(module.gate_up_proj, module.gate_up_proj_scale, torch.float32))
                twin.down_proj.copy_(dequantize_rows(module.down_proj, module.down_proj_scale, torch.float32))
    return float_model


@pytest.mark.parametrize("int8_absorbed", [False, True], ids=["float_kv_b", "int8_kv_b"])
def test_decode_step_on_int8_weights_is_the_dequantized_model(tmp_path, int8_absorbed):
    """The step reads int8 weights and keeps activations in float32: the float model with the dequantized weights."""
    save_reference(reference_model(seed=4), tmp_path)
    model = fuse_projections(quantize_int8(load_hf_checkpoint(tmp_path)))
    twin = fuse_projections(_dequantized_twin(model, load_hf_checkpoint(tmp_path)))
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected_cache, logits = _prefilled(twin, prompt, 20)
        cache, _ = _prefilled(twin, prompt, 20)
        weights = absorbed_weights(model, quantize=int8_absorbed)
        token = logits[:, -1:].argmax(-1)
        for got, expected in _side_by_side(twin, model, weights, expected_cache, cache, token, 4):
            if int8_absorbed:  # kv_b read in int8 too: its own rounding
                torch.testing.assert_close(got, expected, rtol=0, atol=3e-2 * expected.abs().max().item())
                assert got.argmax() == expected.argmax()
            else:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_absorbed_weights_are_w_uk_transposed_and_w_uv_per_head(tmp_path):
    save_reference(reference_model(seed=1), tmp_path)
    model = load_hf_checkpoint(tmp_path)
    attention = model.layers[0].self_attn
    heads, nope, rank = attention.num_heads, attention.nope_dim, attention.kv_lora_rank
    kv_b = attention.kv_b_proj.weight.view(heads, nope + attention.v_dim, rank)
    plain, quantized = absorbed_weights(model)[0], absorbed_weights(model, quantize=True)[0]
    assert plain.key.shape == (heads, rank, nope) and plain.key.is_contiguous() and plain.key_scale is None
    torch.testing.assert_close(plain.key, kv_b[:, :nope].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(plain.value, kv_b[:, nope:], rtol=0, atol=0)
    assert quantized.key.dtype == quantized.value.dtype == torch.int8
    assert quantized.key_scale.shape == (heads, rank) and quantized.value_scale.shape == (heads, attention.v_dim)
    for q, scale, exact in (
        (quantized.key, quantized.key_scale, plain.key),
        (quantized.value, quantized.value_scale, plain.value),
    ):
        assert ((q.float() * scale[..., None] - exact).abs() <= scale[..., None] / 2 + 1e-7).all()  # within half a step


@pytest.mark.parametrize("attention_kernel", [False, True], ids=["blas", "kernel"])
def test_decode_step_with_a_bfloat16_cache_equals_the_model_with_that_cache(tmp_path, attention_kernel):
    if attention_kernel and not kernels.load():
        pytest.skip("the C++ kernels do not build here (see the logged reason)")
    save_reference(reference_model(seed=5), tmp_path)
    model = fuse_projections(load_hf_checkpoint(tmp_path))
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected_cache, logits = _prefilled(model, prompt, 16, torch.bfloat16)
        cache, _ = _prefilled(model, prompt, 16, torch.bfloat16)
        token = logits[:, -1:].argmax(-1)
        weights = absorbed_weights(model)
        for got, expected in _side_by_side(model, model, weights, expected_cache, cache, token, 4, attention_kernel):
            assert got.dtype == torch.float32 and cache.entries.dtype == torch.bfloat16
            # bfloat16 products round their results: the two paths may round differently, never by much.
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
        torch.testing.assert_close(cache.entries.float(), expected_cache.entries.float(), rtol=1e-2, atol=1e-2)


def test_decode_step_of_a_bfloat16_model_is_as_close_to_float32_as_the_model(tmp_path):
    """bfloat16 activations keep each RMSNorm whole (decode._normed splits off the factor for float32 only).

    bfloat16 rounding moves this small random model's logits by several percent whichever way it
    runs (the step and the eager model round in different places), so both are held to the float32
    model: the step no further from it than the eager bfloat16 model, with a little slack.
    """
    save_reference(reference_model(seed=8), tmp_path)
    model = fuse_projections(load_hf_checkpoint(tmp_path, dtype=torch.bfloat16))
    reference = fuse_projections(load_hf_checkpoint(tmp_path))
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference_cache, logits = _prefilled(reference, prompt, 16)
        eager_cache, _ = _prefilled(model, prompt, 16)
        cache, _ = _prefilled(model, prompt, 16)
        assert cache.entries.dtype == torch.bfloat16
        token = logits[:, -1:].argmax(-1)
        weights = absorbed_weights(model)
        for _ in range(4):
            exact = reference(token, cache=reference_cache).float()
            eager = model(token, cache=eager_cache).float()
            got = decode_step(model, weights, token, torch.tensor([cache.length]), cache.entries).float()
            cache.advance(1)
            scale = exact.abs().max()
            assert (got - exact).abs().max() <= 1.5 * (eager - exact).abs().max() + 0.02 * scale
            token = exact[:, -1:].argmax(-1)
