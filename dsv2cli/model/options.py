"""What a forward may use besides torch: :class:`ForwardOptions`, passed down from ``DeepseekV2.forward``.

The model never loads kernels or reads switches of its own: its caller says, per forward, which of
dsv2's C++ kernels (``dsv2cli/kernels``) the modules may call. The options are a frozen dataclass, so
a compiled block reads them as constants (one graph per set of options, no recompiling per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv2cli.kernels import NO_KERNELS, Kernels


@dataclass(frozen=True)
class ForwardOptions:
    """``kernels``: the handle of ``dsv2cli.kernels.load()`` (int8 x int8 products of int8 models wherever they
    serve, see ``quantized.py``); the default has none and runs torch's operators only. ``attention_kernel``:
    one-token absorbed steps attend through the kernels' one-pass latent attention where it serves (else BLAS)."""

    kernels: Kernels = NO_KERNELS
    attention_kernel: bool = True

    @property
    def latent_attention(self) -> Kernels | None:
        """The kernels to attend through, or None for BLAS."""
        return self.kernels if self.attention_kernel and self.kernels.available else None


# Options that use no kernels (the default of every forward).
TORCH_ONLY = ForwardOptions()


def project(linear: nn.Module, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """``linear(x)``; linears with products of their own (int8, sharded: their class sets ``takes_kernels``) get the kernels too."""
    return linear(x, kernels) if getattr(type(linear), "takes_kernels", False) else linear(x)
