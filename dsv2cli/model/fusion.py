"""Linears that read the same input, run as one matrix at inference time.

MLA projects its input twice (``q_a_proj`` and ``kv_a_proj_with_mqa``), and every SwiGLU MLP
projects its input twice (``gate_proj`` and ``up_proj``). A decode step reads each weight once per
token, so one matmul over the stacked rows saves a call, its fixed cost, and (for int8 weights)
one quantization of the input. :func:`fused` stacks the weights once and makes the original
modules' weights row views of the stack: no memory is duplicated, the state dict keeps its names,
and the modules still work on their own (``fuse_projections`` in ``transformer.py`` applies it to a model).

A stack runs the product of its linears' kind: ``F.linear`` for ``nn.Linear``; a linear class with
products of its own declares the one for its stack (``stacked_product``, e.g. ``quantized.Int8Linear``).
A stack is used only while it is current (the first module's weight still views it) and no gradient
is being recorded (training goes through the separate modules).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dsv2cli.kernels import Kernels

# x [..., I], the stacked weight [O, I], its per-row scale [O] (None for a float stack), the kernels -> [..., O].
Product = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", Kernels], torch.Tensor]


def float_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kernels: Kernels) -> torch.Tensor:
    """A float stack's product: ``x @ weight^T``."""
    return F.linear(x, weight)


class FusedLinears:
    """Several bias-free linears sharing one input, their weights (and per-row ``scale`` s, if any) stacked."""

    def __init__(self, linears: list[nn.Module], product: Product = float_product) -> None:
        self.first = linears[0]
        self.product = product
        self.sizes = [int(linear.weight.shape[0]) for linear in linears]
        weight = torch.cat([linear.weight.detach() for linear in linears])
        scales = [getattr(linear, "scale", None) for linear in linears]
        self.scale = None if scales[0] is None else torch.cat([s.detach() for s in scales])  # type: ignore[union-attr]
        self.weight = weight
        start = 0
        for linear, size in zip(linears, self.sizes, strict=True):
            rows = weight[start : start + size]
            if isinstance(linear.weight, nn.Parameter):
                linear.weight = nn.Parameter(rows, requires_grad=False)
            else:
                linear.weight = rows
                linear.scale = self.scale[start : start + size]  # type: ignore[index]
            start += size

    def usable(self) -> bool:
        """True while the modules still view the stack and no gradient is being recorded.

        Under ``torch.compile`` pointers cannot be compared; the compiled decode step checks
        :meth:`current` before it compiles (``dsv2cli/inference/compiled.py``).
        """
        if torch.compiler.is_compiling():
            return not torch.is_grad_enabled()
        return not torch.is_grad_enabled() and self.current()

    def current(self) -> bool:
        """Whether the first module's weight still views the stack."""
        return self.first.weight.data_ptr() == self.weight.data_ptr()

    def __call__(self, x: torch.Tensor, kernels: Kernels) -> tuple[torch.Tensor, ...]:
        """x ``[..., I]`` -> one output per linear, ``[..., O_i]`` each."""
        return self.product(x, self.weight, self.scale, kernels).split(self.sizes, dim=-1)


def fused(*linears: nn.Module) -> FusedLinears | None:
    """``linears`` stacked into one :class:`FusedLinears`, or None when they cannot be: different kinds, a bias,
    meta weights, or weights of different dtypes, devices or input widths."""
    kind = type(linears[0])
    if any(type(linear) is not kind or getattr(linear, "bias", None) is not None for linear in linears):
        return None
    weights = [linear.weight for linear in linears]
    if any(w.is_meta for w in weights) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    if kind is nn.Linear:
        return FusedLinears(list(linears))
    product = getattr(kind, "stacked_product", None)
    return None if product is None else FusedLinears(list(linears), product)
