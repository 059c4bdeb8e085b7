"""Linears that read the same input, run as one matrix at inference time.

MLA projects its input twice (``q_a_proj`` and ``kv_a_proj_with_mqa``), and every SwiGLU MLP
projects its input twice (``gate_proj`` and ``up_proj``). A decode step reads each weight once per
token, so one matmul over the stacked rows saves a call, its fixed cost, and (for int8 weights)
one quantization of the input. :func:`fuse_projections` stacks the weights once and makes the
original modules' weights row views of the stack: no memory is duplicated, the state dict keeps
its names, and the modules still work on their own.

A stack is used only while it is current (the first module's weight still views it) and no
gradient is being recorded (training goes through the separate modules).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FusedLinears:
    """Several bias-free linears (``nn.Linear`` or int8 ones with a ``scale``) sharing one input."""

    def __init__(self, linears: list[nn.Module]) -> None:
        self.first = linears[0]
        self.sizes = [int(linear.weight.shape[0]) for linear in linears]
        weight = torch.cat([linear.weight.detach() for linear in linears])
        scales = [getattr(linear, "scale", None) for linear in linears]
        self.scale = None if scales[0] is None else torch.cat([s.detach() for s in scales])  # type: ignore[union-attr]
        self.weight = weight
        if self.scale is not None:
            from dsv2cli.model.quantized import int8_linear

            self.int8_linear = int8_linear
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

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x ``[..., I]`` -> one output per linear, ``[..., O_i]`` each."""
        if self.scale is None:
            out = F.linear(x, self.weight)
        else:
            out = self.int8_linear(x, self.weight, self.scale)
        return out.split(self.sizes, dim=-1)


def _fusable(*linears: nn.Module) -> bool:
    kinds = {type(linear) for linear in linears}
    if len(kinds) != 1 or any(getattr(linear, "bias", None) is not None for linear in linears):
        return False
    weights = [linear.weight for linear in linears]
    if any(w.is_meta for w in weights) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return False
    return all(type(linear) is nn.Linear or hasattr(linear, "scale") for linear in linears)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack MLA's input projections and every MLP's gate/up projections of ``model`` in place; returns it."""
    from dsv2cli.model.attention import MultiHeadLatentAttention
    from dsv2cli.model.moe import MLP

    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            query = module.q_proj if module.q_lora_rank is None else module.q_a_proj
            if _fusable(query, module.kv_a_proj_with_mqa):
                module.fused_input = FusedLinears([query, module.kv_a_proj_with_mqa])
        elif isinstance(module, MLP) and _fusable(module.gate_proj, module.up_proj):
            module.fused_gate_up = FusedLinears([module.gate_proj, module.up_proj])
    return model
