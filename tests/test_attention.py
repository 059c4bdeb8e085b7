"""Multi-head latent attention (dsv2cli/model/attention.py) against hand-set weights and a float64 reference.

The reference below is written from the spec (§3.1, naive MLA) one head and one query at a time in float64;
it shares no code with the module but the weights. A tiny config: D 4, H 2, N 2, R 4, V 2, C 3, YaRN's
softmax scale. cos/sin are given as inputs (rope has its own tests): position t turns pair p by t * [1, 0.1][p].
"""

import math

import pytest
import torch

from dsv2cli.config import ModelConfig, YarnScaling
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.cache import LatentKVCache
from tests.helpers import one_thread_per_module  # noqa: F401 (autouse fixture)

D, H, N, R, V, C = 4, 2, 2, 4, 2, 3
INV_FREQ = [1.0, 0.1]
EPS = 1e-6
# (N + R) ** -0.5 * m**2, m = 0.1 * mscale_all_dim * ln(factor) + 1 (spec §3.4)
SCALE = 6**-0.5 * (0.1 * 0.707 * math.log(4.0) + 1) ** 2


def _config(q_lora_rank: int | None = None) -> ModelConfig:
    return ModelConfig(
        vocab_size=8,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=H,
        kv_lora_rank=C,
        qk_nope_head_dim=N,
        qk_rope_head_dim=R,
        v_head_dim=V,
        intermediate_size=8,
        q_lora_rank=q_lora_rank,
        rms_norm_eps=EPS,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707),
    )


def _attention(q_lora_rank: int | None = None, seed: int = 0) -> MultiHeadLatentAttention:
    attention = MultiHeadLatentAttention(_config(q_lora_rank), layer_idx=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in attention.named_parameters():
            if "layernorm" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.7)
    return attention


def _cos_sin(positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.tensor(positions, dtype=torch.float64)[..., None] * torch.tensor(INV_FREQ, dtype=torch.float64)
    return torch.cos(angles).float(), torch.sin(angles).float()  # [B, S, R/2]


def _forward(attention, x, positions, mask=None, kv=None, impl="absorbed"):
    cos, sin = _cos_sin(positions)
    with torch.no_grad():
        return attention(x, cos, sin, mask, kv, impl)


# The float64 reference --------------------------------------------------------------------------------------


def _rms(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean() + EPS) * weight.double()


def _rotate(v: torch.Tensor, position: int) -> torch.Tensor:
    out = v.clone()
    for p, freq in enumerate(INV_FREQ):
        a = position * freq
        out[2 * p] = v[2 * p] * math.cos(a) - v[2 * p + 1] * math.sin(a)
        out[2 * p + 1] = v[2 * p] * math.sin(a) + v[2 * p + 1] * math.cos(a)
    return out


def reference(attention: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """One sequence ``x [S, D]`` at positions 0..S-1, causal -> ``[S, D]`` float64 (spec §3.1)."""
    w = {name: p.detach().double() for name, p in attention.named_parameters()}
    x = x.double()
    seq = x.shape[0]
    out = torch.zeros(seq, H * V, dtype=torch.float64)
    latents, keys_pe = [], []
    for s in range(seq):
        compressed = w["kv_a_proj_with_mqa.weight"] @ x[s]
        latents.append(_rms(compressed[:C], w["kv_a_layernorm.weight"]))
        keys_pe.append(_rotate(compressed[C:], s))
    kv_b = w["kv_b_proj.weight"].view(H, N + V, C)
    for t in range(seq):
        if attention.q_lora_rank is None:
            q = w["q_proj.weight"] @ x[t]
        else:
            q = w["q_b_proj.weight"] @ _rms(w["q_a_proj.weight"] @ x[t], w["q_a_layernorm.weight"])
        for h in range(H):
            q_nope, q_pe = q[h * (N + R) : h * (N + R) + N], _rotate(q[h * (N + R) + N : (h + 1) * (N + R)], t)
            scores = [SCALE * (q_nope @ (kv_b[h, :N] @ latents[s]) + q_pe @ keys_pe[s]) for s in range(t + 1)]
            top = max(scores)
            exps = [math.exp(float(v) - top) for v in scores]
            for s in range(t + 1):
                out[t, h * V : (h + 1) * V] += exps[s] / sum(exps) * (kv_b[h, N:] @ latents[s])
    return out @ w["o_proj.weight"].T


# Tests ------------------------------------------------------------------------------------------------------


def test_scale_is_the_spec_formula():
    assert _config().softmax_scale == pytest.approx(SCALE, rel=1e-12)
    assert SCALE == pytest.approx(0.49219, abs=1e-5)  # 6 ** -0.5 x 1.0980 ** 2


@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_one_token_is_w_o_w_uv_of_its_normalised_latent(impl):
    """A lone token attends only to itself (probability 1), whatever its query: out = W_o W_UV c_KV. Hand-set:
    latent (3, 4, 0) -> RMS r = sqrt(25/3 + eps); norm weight (1, 0.5, 2) -> c = (3/r, 2/r, 0); W_UV of head 0 picks
    (c0, c1), of head 1 (c2, c0 + c1 + c2); W_o = 2 I -> (6/r, 4/r, 0, 10/r). The cache keeps c and k_pe turned by
    the token's position (spec §3.3): k_pe (1, 0, 0, 2) at position 1 -> (cos 1, sin 1, -2 sin 0.1, 2 cos 0.1)."""
    attention = _attention(seed=1)  # random query weights: they must not matter
    with torch.no_grad():
        kv_a = torch.zeros(C + R, D)
        kv_a[0, 0], kv_a[1, 1] = 3.0, 2.0  # latent = (3 x0, 2 x1, 0)
        kv_a[C, 0], kv_a[C + 3, 1] = 1.0, 1.0  # k_pe = (x0, 0, 0, x1)
        attention.kv_a_proj_with_mqa.weight.copy_(kv_a)
        attention.kv_a_layernorm.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
        kv_b = attention.kv_b_proj.weight.view(H, N + V, C)
        kv_b[0, N:] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        kv_b[1, N:] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
        attention.o_proj.weight.copy_(2 * torch.eye(D))
    cache = LatentKVCache(1, 1, 4, C, R)
    cache.advance(1)  # the token sits at slot and position 1; slot 0 is masked out below
    mask = torch.tensor([[[False, True]]])
    out = _forward(attention, torch.tensor([[[1.0, 2.0, 0.0, 0.0]]]), [[1]], mask, cache.layer_views(1)[0], impl)
    r = math.sqrt(25 / 3 + EPS)
    assert out.flatten().tolist() == pytest.approx([6 / r, 4 / r, 0.0, 10 / r], abs=1e-6)
    stored = [3 / r, 2 / r, 0.0, math.cos(1), math.sin(1), -2 * math.sin(0.1), 2 * math.cos(0.1)]
    assert cache.entries[0, 0, 1].tolist() == pytest.approx(stored, abs=1e-6)


@pytest.mark.parametrize("q_lora_rank", [None, 3], ids=["q_proj", "q_lora"])
@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_prefill_matches_the_float64_reference(impl, q_lora_rank):
    attention = _attention(q_lora_rank)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    out = _forward(attention, x, [list(range(5))] * 2, impl=impl)
    for row in range(2):
        torch.testing.assert_close(out[row].double(), reference(attention, x[row]), rtol=1e-5, atol=1e-5)


def test_absorbed_equals_naive():
    attention = _attention(3, seed=3)
    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(3))
    positions = [list(range(6))]
    absorbed, naive = _forward(attention, x, positions), _forward(attention, x, positions, impl="naive")
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_earlier_tokens_do_not_see_later_ones(impl):
    attention = _attention()
    x = torch.randn(1, 5, D, generator=torch.Generator().manual_seed(4))
    changed = x.clone()
    changed[:, 3:] = torch.randn(1, 2, D, generator=torch.Generator().manual_seed(5))
    positions = [list(range(5))]
    before, after = _forward(attention, x, positions, impl=impl), _forward(attention, changed, positions, impl=impl)
    torch.testing.assert_close(before[:, :3], after[:, :3], rtol=0, atol=1e-6)
    assert (before[:, 3:] - after[:, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_one_token_step_equals_the_last_row_of_the_full_prefill(impl, static):
    attention = _attention(3)
    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(6))
    full = _forward(attention, x, [list(range(6))], impl=impl)
    cache = LatentKVCache(1, 1, 8, C, R)
    prefill = _forward(attention, x[:, :5], [list(range(5))], kv=cache.layer_views(5)[0], impl=impl)
    cache.advance(5)
    mask = cache.attention_mask(1, static) if static else None
    step = _forward(attention, x[:, 5:], cache.positions(1, static).tolist(), mask, cache.layer_views(1, static)[0], impl)
    torch.testing.assert_close(prefill, full[:, :5], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step, full[:, 5:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step[0].double(), reference(attention, x[0])[5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_a_left_padded_row_gives_what_it_gives_alone(impl):
    """Row 1 holds 3 prompt tokens after 2 pad slots of garbage, then a step: its outputs are those of its 4 tokens alone."""
    attention = _attention(seed=7)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(7))
    x[1, :2] = 100.0  # pad slots: never attended to
    cache = LatentKVCache(1, 2, 8, C, R, pad=[0, 2])
    positions = cache.positions(5)
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    prefill = _forward(attention, x[:, :5], positions.tolist(), cache.attention_mask(5), cache.layer_views(5)[0], impl)
    cache.advance(5)
    step = _forward(attention, x[:, 5:], cache.positions(1).tolist(), cache.attention_mask(1), cache.layer_views(1)[0], impl)
    got = torch.cat((prefill, step), dim=1).double()
    torch.testing.assert_close(got[0], reference(attention, x[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 2:], reference(attention, x[1, 2:]), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got[1, :2]).all()  # pad rows attend to themselves only: finite, and ignored


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        _forward(_attention(), torch.zeros(1, 1, D), [[0]], impl="flash")
