"""Rotary embedding (dsv2cli/model/rope.py): frequencies, YaRN ramp and amplitude, pair rotation; hand-checked numbers."""

import math

import pytest
import torch

from dsv2cli.config import ModelConfig, YarnScaling
from dsv2cli.model.rope import RotaryEmbedding, apply_rope, rope_inverse_frequencies
from tests.helpers import one_thread_per_module  # noqa: F401 (autouse fixture)


def _config(rope_dim: int, yarn: YarnScaling | None = None, theta: float = 10000.0) -> ModelConfig:
    return ModelConfig(
        vocab_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        kv_lora_rank=4,
        qk_nope_head_dim=4,
        qk_rope_head_dim=rope_dim,
        v_head_dim=4,
        intermediate_size=8,
        rope_theta=theta,
        rope_scaling=yarn,
    )


# DeepSeek-V2 and V2-Lite (spec §1.1, §3.6): dim 64, base 10000, factor 40 over 4096 positions, betas 32 / 1.
V2_YARN = YarnScaling(
    factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707
)


def test_plain_frequencies_are_powers_of_the_base():
    # base ** (-2p / dim) with dim 8: 10000 ** (-p / 4) = 10 ** -p.
    inv_freq, amplitude = rope_inverse_frequencies(_config(8))
    assert inv_freq.tolist() == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-6)
    assert amplitude == 1.0
    inv_freq, _ = rope_inverse_frequencies(_config(4, theta=100.0))
    assert inv_freq.tolist() == pytest.approx([1.0, 0.1], rel=1e-6)  # 100 ** (-2/4)


def test_v2_yarn_ramp_runs_from_pair_10_to_pair_23():
    """Spec §3.6: low = floor(10.47) = 10, high = ceil(22.51) = 23; pairs up to 10 keep their frequency,
    pairs from 23 on are divided by 40, and the ones between blend linearly."""
    inv_freq, amplitude = rope_inverse_frequencies(_config(64, V2_YARN))
    assert inv_freq.shape == (32,)
    for p in range(32):
        original = 10000.0 ** (-2 * p / 64)
        ramp = min(max((p - 10) / 13, 0.0), 1.0)
        expected = original * (1 - ramp) + original / 40 * ramp
        assert inv_freq[p].item() == pytest.approx(expected, rel=2e-6), p
    assert inv_freq[8].item() == pytest.approx(0.1, rel=1e-6)  # 10000 ** -0.25, untouched
    assert inv_freq[16].item() == pytest.approx(0.0055, rel=1e-6)  # 0.01 * (7/13 + 6/13 / 40)
    assert inv_freq[24].item() == pytest.approx(2.5e-5, rel=1e-6)  # 10000 ** -0.75 / 40
    assert inv_freq[10].item() == pytest.approx(10000.0**-0.3125, rel=1e-6)  # last unchanged pair
    assert inv_freq[11].item() < 10000.0**-0.34375 * 0.99  # first blended pair
    assert amplitude == 1.0  # mscale == mscale_all_dim: cos/sin keep unit length


def test_small_yarn_divides_every_pair_but_the_first():
    # dim 8, 16 original positions: d(32) < 0 -> low 0; d(1) = 8 ln(16 / 2pi) / (2 ln 1e4) = 0.41 -> high 1.
    yarn = YarnScaling(factor=4.0, original_max_position_embeddings=16)
    inv_freq, amplitude = rope_inverse_frequencies(_config(8, yarn))
    assert inv_freq.tolist() == pytest.approx([1.0, 0.025, 0.0025, 0.00025], rel=1e-6)
    assert amplitude == pytest.approx(0.1 * math.log(4.0) + 1)  # no mscale given: yarn_mscale(factor)


def test_zero_width_ramp_does_not_divide_by_zero():
    # One original position: both correction dims are negative, so low == high == 0 (the code widens it by 0.001).
    yarn = YarnScaling(factor=2.0, original_max_position_embeddings=1)
    inv_freq, _ = rope_inverse_frequencies(_config(6, yarn))
    assert torch.isfinite(inv_freq).all()
    assert inv_freq.tolist() == pytest.approx([1.0, 10000 ** (-1 / 3) / 2, 10000 ** (-2 / 3) / 2], rel=1e-6)


@pytest.mark.parametrize(
    "mscale, mscale_all_dim, attention_factor, expected",
    [
        (0.707, 0.707, None, 1.0),
        (1.0, 1.0, None, 1.0),
        (1.0, 0.707, None, (0.1 * math.log(40) + 1) / (0.0707 * math.log(40) + 1)),  # 1.0857
        (None, None, None, 0.1 * math.log(40) + 1),  # 1.3689
        (0.707, 0.707, 1.5, 1.5),  # an explicit attention_factor wins
    ],
)
def test_yarn_amplitude(mscale, mscale_all_dim, attention_factor, expected):
    yarn = YarnScaling(40.0, 4096, mscale=mscale, mscale_all_dim=mscale_all_dim, attention_factor=attention_factor)
    _, amplitude = rope_inverse_frequencies(_config(64, yarn))
    assert amplitude == pytest.approx(expected, rel=1e-12)


def test_v2_softmax_scale_includes_the_squared_mscale():
    # Spec §3.4: 192 ** -0.5 * m**2 with m = 0.1 * 0.707 * ln 40 + 1 = 1.2608; V2 scale = 0.1147214.
    config = _config(64, V2_YARN).replace(qk_nope_head_dim=128)
    m = 0.1 * 0.707 * math.log(40) + 1
    assert config.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert config.softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert _config(64).replace(qk_nope_head_dim=128).softmax_scale == pytest.approx(0.0721688, abs=1e-7)


def test_cos_sin_are_position_times_frequency_scaled_by_the_amplitude():
    rotary = RotaryEmbedding(_config(4, theta=100.0))  # inv_freq [1, 0.1]
    cos, sin = rotary.cos_sin(torch.tensor([[0, 3], [5, 0]]))
    assert cos.shape == sin.shape == (2, 2, 2) and cos.dtype == torch.float32
    angles = [[[0.0, 0.0], [3.0, 0.3]], [[5.0, 0.5], [0.0, 0.0]]]
    assert cos.flatten().tolist() == pytest.approx([math.cos(a) for row in angles for pair in row for a in pair], abs=1e-6)
    assert sin.flatten().tolist() == pytest.approx([math.sin(a) for row in angles for pair in row for a in pair], abs=1e-6)
    yarn = YarnScaling(factor=4.0, original_max_position_embeddings=16, attention_factor=2.0)
    cos, sin = RotaryEmbedding(_config(4, yarn)).cos_sin(torch.tensor([[0]]))
    assert cos.flatten().tolist() == [2.0, 2.0] and sin.flatten().tolist() == [0.0, 0.0]


def _angles(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.tensor(values, dtype=torch.float64)[None, None]  # [1, 1, R/2]
    return torch.cos(angles).float(), torch.sin(angles).float()


@pytest.fixture(params=["complex", "real"])
def rope_branch(request, monkeypatch):
    """apply_rope multiplies complex numbers eagerly and writes the product out in reals under torch.compile."""
    if request.param == "real":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


def test_quarter_and_half_turns_rotate_adjacent_pairs(rope_branch):
    # Pairs are (0, 1) and (2, 3): (1, 0) turned by pi/2 is (0, 1); (0, 2) turned by pi is (0, -2).
    # (The half layout would pair (0, 2) and (1, 3) and give [0, 0, 1, -2].)
    x = torch.tensor([1.0, 0.0, 0.0, 2.0]).view(1, 1, 1, 4)  # [B, S, H, R]
    cos, sin = _angles([math.pi / 2, math.pi])
    assert apply_rope(x, cos, sin).flatten().tolist() == pytest.approx([0.0, 1.0, 0.0, -2.0], abs=1e-6)


def test_rotation_of_random_pairs_matches_the_formula(rope_branch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)  # [B, S, H, R]: every head gets its row's angles
    angles = torch.rand(2, 3, 3, dtype=torch.float64) * 20 - 10
    got = apply_rope(x, torch.cos(angles).float(), torch.sin(angles).float())
    expected = torch.empty(2, 3, 4, 6, dtype=torch.float64)
    for b in range(2):
        for s in range(3):
            for h in range(4):
                for p in range(3):
                    even, odd, a = x[b, s, h, 2 * p].item(), x[b, s, h, 2 * p + 1].item(), angles[b, s, p].item()
                    expected[b, s, h, 2 * p] = even * math.cos(a) - odd * math.sin(a)
                    expected[b, s, h, 2 * p + 1] = even * math.sin(a) + odd * math.cos(a)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6)


def test_rope_keeps_the_dtype_and_reads_strided_slices():
    torch.manual_seed(1)
    wide = torch.randn(2, 3, 9)
    x = wide[..., 1:]  # odd storage offset: the pairs cannot be viewed as complex numbers in place
    cos, sin = _angles([0.3, -1.2, 2.0, 4.0])
    torch.testing.assert_close(apply_rope(x, cos, sin), apply_rope(x.contiguous(), cos, sin), rtol=0, atol=0)
    # One token of one row sliced at an odd offset is "contiguous" to torch but still cannot be viewed as complex.
    single = torch.randn(1, 1, 7)[..., 3:]  # k_pe of a cache row with an odd kv_lora_rank (3)
    cos1, sin1 = _angles([0.3, -1.2])
    torch.testing.assert_close(apply_rope(single, cos1, sin1), apply_rope(single.clone(), cos1, sin1), rtol=0, atol=0)
    narrow = apply_rope(x.bfloat16(), cos, sin)
    assert narrow.dtype == torch.bfloat16
    torch.testing.assert_close(narrow, apply_rope(x.bfloat16().float(), cos, sin).bfloat16(), rtol=0, atol=0)


def test_scores_depend_only_on_the_distance_between_positions():
    """q(m) . k(n) is a function of m - n: the point of rotary embeddings."""
    rotary = RotaryEmbedding(_config(64, V2_YARN))
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 64)

    def score(m: int, n: int) -> float:
        cos_m, sin_m = rotary.cos_sin(torch.tensor([[m]]))
        cos_n, sin_n = rotary.cos_sin(torch.tensor([[n]]))
        return float((apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4, abs=1e-4)
    assert score(7, 3) == pytest.approx(score(4, 0), rel=1e-4, abs=1e-4)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), rel=1e-6)  # position 0 is the identity
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # not symmetric: the sign of the distance matters
