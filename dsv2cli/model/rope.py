"""Rotary embedding on the decoupled rope dims, with YaRN (spec §3.5, §3.6).

Pairs are adjacent dims ``(2p, 2p+1)`` of the rope sub-vector, rotated by ``t * w_p``
(the checkpoint convention, as in DeepSeek's ``apply_rotary_emb``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv2cli.config import ModelConfig, yarn_mscale
from dsv2cli.model.dtypes import cast


def rope_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [R/2], amplitude)`` for the config's rope dims.

    Under YaRN, pair ``p`` blends the original frequency and the one divided by
    ``factor`` with a linear ramp between the correction dims of ``beta_fast`` and
    ``beta_slow``; ``amplitude`` scales cos/sin (1.0 for every released config).
    """
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    extrapolation = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    yarn = config.rope_scaling
    if yarn is None:
        return extrapolation, 1.0
    interpolation = extrapolation / yarn.factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep_original = 1 - ramp
    inv_freq = interpolation * (1 - keep_original) + extrapolation * keep_original
    if yarn.attention_factor is not None:
        amplitude = yarn.attention_factor
    elif yarn.mscale and yarn.mscale_all_dim:
        amplitude = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        amplitude = yarn_mscale(yarn.factor)
    return inv_freq, float(amplitude)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary positions and rotates interleaved pairs."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, amplitude = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.amplitude = amplitude

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[B, S]`` (int) -> cos, sin ``[B, S, R/2]`` in float32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return torch.cos(angles) * self.amplitude, torch.sin(angles) * self.amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x [B, S, ..., R]`` by ``cos, sin [B, S, R/2]`` (computed in float32).

    Each pair ``(even, odd)`` is the complex number ``even + i odd`` multiplied by ``cos + i sin``:
    one complex product instead of six real ones (decode runs this twice per layer per token).
    Under ``torch.compile`` (which does not generate complex arithmetic) the same product is
    written out in real numbers; the compiler fuses it into one kernel either way.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    pairs = cast(x, torch.float32).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated_pairs = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return cast(rotated_pairs.flatten(-2), x.dtype)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.clone(memory_format=torch.contiguous_format)  # contiguous() keeps the odd offset of a [1, 1, ...] slice
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
    return cast(torch.view_as_real(rotated).flatten(-2), x.dtype)
