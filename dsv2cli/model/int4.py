"""Weight-only int4 (symmetric, group-wise along the input dimension): modules and the transform that installs them.

Shape legend: N tokens, D hidden size, O output features, I input features, G groups per row (I / group
size), E routed experts, M moe_intermediate_size.

A weight ``W [O, I]`` is cut into groups of ``group_size`` (32, 64 or 128) consecutive input values; each
group has one float16 scale ``d`` and 4-bit levels ``q`` in ``[0, 15]`` with ``W ~ (q - 8) * d``. As in
llama.cpp's Q4_0, ``d = m / -8`` where ``m`` is the group's value of largest magnitude, so ``m`` itself is
exact and the 16 levels are all used. Symmetric (no zero point): the products need no per-group
correction term beyond the constant 8, a stack of linears (``fusion.py``) or a tensor slice carries only
its scales, and the probe on the bundled demo shows the cost is small (docs/convert.md).

Packing: every block of 32 input values is 16 bytes; byte ``j`` holds value ``j`` in its low nibble and value
``16 + j`` in its high nibble (llama.cpp's Q4_0 order), so a 16-byte load unpacks into 32 values with one
shift and one mask. Stored as ``weight [..., O, I / 2]`` uint8 and ``scale [..., O, G]`` float16.

Like ``quantized.py`` (int8) this is a transform applied to a built model (:func:`quantize_int4`); the same
layers stay in floating point (embedding, norms, router, ``kv_b_proj``). On CPU the rows int8 weights run
int8 x int8 (``quantized.int8_rows``: decode rows, and prefills too on CPUs without AMX tiles)
are quantized per row to int8 and multiplied int8 x int4 with int32 sums per group in dsv2's kernel
(``dsv2cli/kernels/int4_matmul.cpp``), experts picked by id inside it; other rows (no kernels, other devices)
dequantize one matrix, or one expert, to the activation dtype at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dsv2cli.errors import UnsupportedError
from dsv2cli.kernels import NO_KERNELS, Kernels
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.dtypes import cast
from dsv2cli.model.moe import RoutedExperts, run_experts
from dsv2cli.model.quantized import FLOAT_LINEARS, Int8Absorbed, int8_rows, quantize_activation

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
BLOCK = 32  # values per packed block (16 bytes); every group size is a multiple of it
_OFFSET = 8  # level q stands for q - 8


def check_group_size(group_size: int, width: int, name: str) -> None:
    """Raise :class:`UnsupportedError` naming ``name`` unless ``group_size`` is one of :data:`GROUP_SIZES` and divides ``width``."""
    if group_size not in GROUP_SIZES:
        raise UnsupportedError(f"`group_size` must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if width % group_size:
        raise UnsupportedError(
            f"int4 group size {group_size} does not divide the input dimension {width} of {name}",
            hint="choose a `group_size` that divides every input dimension (32 does for every released DeepSeek-V2 shape)",
        )


def quantize_groups(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., O, I]`` (any float dtype) -> ``(packed [..., O, I / 2] uint8, scale [..., O, I / group_size] float16)``."""
    *lead, width = weight.shape
    w = weight.float().reshape(*lead, width // group_size, group_size)  # [..., O, G, g]
    high, low = w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True)
    extreme = torch.where(-low >= high, low, high)  # the value of largest magnitude (the negative one on a tie)
    scale = (extreme / -_OFFSET).to(torch.float16)  # [..., O, G, 1]; rounded first so that the levels match it
    d = scale.float()
    inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    values = torch.mul(w, inverse).round_().clamp_(-_OFFSET, _OFFSET - 1).reshape(*lead, width // BLOCK, 2, BLOCK // 2)
    # pack() on float values: one conversion of half as many (float -> int32 -> uint8 is vectorized, float -> uint8 is not).
    byte = torch.add(values[..., 0, :], values[..., 1, :], alpha=16).add_(_OFFSET * 17)  # (q_lo + 8) + 16 (q_hi + 8)
    return byte.to(torch.int32).to(torch.uint8).reshape(*lead, width // 2), scale.squeeze(-1)


def pack(levels: torch.Tensor) -> torch.Tensor:
    """Levels ``[..., I]`` uint8 in ``[0, 15]`` -> ``[..., I / 2]`` (per block of 32: value j low, value 16 + j high)."""
    *lead, width = levels.shape
    blocks = levels.reshape(*lead, width // BLOCK, 2, BLOCK // 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*lead, width // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``[..., I / 2]`` uint8 -> the signed values ``q - 8`` ``[..., I]`` int8 (the inverse of :func:`pack`)."""
    *lead, half = packed.shape
    blocks = packed.reshape(*lead, half * 2 // BLOCK, 1, BLOCK // 2)
    levels = torch.cat([blocks & 15, blocks >> 4], dim=-2)  # [..., I / 32, 2, 16]
    return levels.reshape(*lead, half * 2).to(torch.int8) - _OFFSET


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``packed [..., O, I / 2]``, ``scale [..., O, G]`` -> the float weight ``[..., O, I]`` in ``dtype``."""
    values = unpack(packed)  # [..., O, I]
    *lead, width = values.shape
    groups = scale.shape[-1]
    grouped = values.reshape(*lead, groups, width // groups).to(dtype) * scale.to(dtype)[..., None]
    return grouped.reshape(*lead, width)


def through_int4_kernel(x: torch.Tensor, weight: torch.Tensor, kernels: Kernels) -> bool:
    """Whether ``x``'s rows against the packed ``weight`` run through dsv2's int4 kernel: the rows int8 products take
    (``quantized.int8_rows``: decode rows, and every row on CPUs without AMX tiles) and ``kernels``
    that take ``weight``."""
    return int8_rows(x) and kernels.int4_matmul_supported(weight)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, kernels: Kernels, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., I] @ W^T`` with ``W`` the dequantized int4 weight -> ``[..., O]`` in x's dtype.

    Rows on CPU through the kernel as :func:`through_int4_kernel` says (each row quantized to int8 with one step,
    int32 sums per group); other rows (more than a decode step's on CPUs with AMX tiles, no kernels, other
    devices) against the weight dequantized to x's dtype. ``amax``: as in ``quantized.int8_linear`` (the rows'
    largest ``|x|`` when ``x`` is one rank's share of their columns).
    """
    if through_int4_kernel(x, packed, kernels):
        rows = x.reshape(-1, x.shape[-1])
        out = kernels.int4_matmul(*quantize_activation(rows, amax), packed[None], scale[None])
        return cast(out, x.dtype).reshape(*x.shape[:-1], packed.shape[0])
    return F.linear(x, dequantize_groups(packed, scale, x.dtype))


def _stacked_int4_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kernels: Kernels) -> torch.Tensor:
    assert scale is not None  # an int4 stack always has its scales
    return int4_linear(x, weight, scale, kernels)


class Int4Linear(nn.Module):
    """``nn.Linear`` (no bias) with a packed int4 ``weight [O, I / 2]`` uint8 and ``scale [O, I / group_size]`` float16."""

    takes_kernels = True  # called with the forward's kernels (``options.project``)
    stacked_product = staticmethod(_stacked_int4_product)  # how stacks of these run (``fusion.fused``)

    def __init__(
        self, in_features: int, out_features: int, group_size: int = DEFAULT_GROUP_SIZE, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size, dtype=torch.float16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, group_size, device=linear.weight.device)
        if linear.weight.is_meta:
            return module
        module.weight, module.scale = quantize_groups(linear.weight.detach(), group_size)
        return module

    def forward(self, x: torch.Tensor, kernels: Kernels = NO_KERNELS) -> torch.Tensor:
        return int4_linear(x, self.weight, self.scale, kernels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


class Int4RoutedExperts(nn.Module):
    """:class:`RoutedExperts` with packed int4 stacked weights.

    ``gate_up_proj [E, 2M, D / 2]`` uint8 with ``gate_up_proj_scale [E, 2M, D / g]``, ``down_proj [E, D, M / 2]``
    with ``down_proj_scale [E, D, M / g]`` (float16); the same forward contract as ``RoutedExperts``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        e, d, m, g = num_experts, hidden_size, intermediate_size, group_size
        self.num_experts = e
        self.group_size = g
        self.register_buffer("gate_up_proj", torch.empty(e, 2 * m, d // 2, dtype=torch.uint8, device=device))
        self.register_buffer("gate_up_proj_scale", torch.ones(e, 2 * m, d // g, dtype=torch.float16, device=device))
        self.register_buffer("down_proj", torch.empty(e, d, m // 2, dtype=torch.uint8, device=device))
        self.register_buffer("down_proj_scale", torch.ones(e, d, m // g, dtype=torch.float16, device=device))

    @classmethod
    def from_experts(cls, experts: RoutedExperts, group_size: int = DEFAULT_GROUP_SIZE) -> Int4RoutedExperts:
        e, two_m, d = experts.gate_up_proj.shape
        module = cls(e, d, two_m // 2, group_size, device=experts.gate_up_proj.device)
        if experts.gate_up_proj.is_meta:
            return module
        module.gate_up_proj, module.gate_up_proj_scale = quantize_groups(experts.gate_up_proj.detach(), group_size)
        module.down_proj, module.down_proj_scale = quantize_groups(experts.down_proj.detach(), group_size)
        return module

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on its tokens ``x [n, D]`` -> ``[n, D]``, its weights dequantized to x's dtype."""
        gate, up = int4_linear(x, self.gate_up_proj[index], self.gate_up_proj_scale[index], NO_KERNELS).chunk(2, dim=-1)
        return int4_linear(F.silu(gate) * up, self.down_proj[index], self.down_proj_scale[index], NO_KERNELS)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, kernels: Kernels = NO_KERNELS
    ) -> torch.Tensor:
        """x ``[N, D]``, expert_ids/weights ``[N, K]`` -> ``[N, D]`` float32 (see ``RoutedExperts.forward``).

        Rows through dsv2's int4 kernel where :func:`through_int4_kernel` says (:meth:`kernel_rows`); otherwise each
        chosen expert over its tokens, its weights dequantized.
        """
        if through_int4_kernel(x, self.gate_up_proj, kernels):
            return self.kernel_rows(x, expert_ids, weights, kernels)
        return run_experts(x, expert_ids, weights, self.num_experts, self.expert)

    def kernel_rows(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """Rows ``x [N, D]`` through their K experts each, int8 x int4 -> ``[N, D]`` float32.

        Experts are read where they lie, picked by id inside the kernel (one compiled graph whichever experts the
        rows choose), each read once for all the rows that chose it; a dropped assignment (id -1) adds nothing.
        """
        rows, top_k = expert_ids.shape
        ids = expert_ids.reshape(-1)  # [N*K]: row n's k-th expert at n*K + k
        values, step = quantize_activation(x)  # [N, D], [N, 1]
        gate_up = kernels.int4_matmul(
            values.repeat_interleave(top_k, 0), step.repeat_interleave(top_k, 0), self.gate_up_proj, self.gate_up_proj_scale, ids
        )  # [N*K, 2M]
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up  # [N*K, M] float32
        down = kernels.int4_matmul(*quantize_activation(hidden), self.down_proj, self.down_proj_scale, ids)  # [N*K, D]
        return (down.view(rows, top_k, -1) * cast(weights, torch.float32)[..., None]).sum(1)


def quantize_int4(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace the quantizable linears and every ``RoutedExperts`` of ``model`` in place; returns it.

    The same layers as ``quantized.quantize_int8`` (``lm_head`` too unless tied to the embedding). On a
    meta-device model this only installs the int4 structure (to assign an int4 checkpoint); on a loaded model
    it quantizes the weights. A ``group_size`` that does not divide an input dimension is refused naming the tensor.
    """
    embedding = getattr(model, "embed_tokens", None)
    for prefix, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, RoutedExperts):
                check_group_size(group_size, child.gate_up_proj.shape[-1], f"{path}.gate_up_proj")
                check_group_size(group_size, child.down_proj.shape[-1], f"{path}.down_proj")
                setattr(module, child_name, Int4RoutedExperts.from_experts(child, group_size))
            elif isinstance(child, nn.Linear) and child_name not in FLOAT_LINEARS and child.bias is None:
                if child_name == "lm_head" and embedding is not None and child.weight is embedding.weight:
                    continue
                check_group_size(group_size, child.in_features, f"{path}.weight")
                setattr(module, child_name, Int4Linear.from_linear(child, group_size))
    return model


def has_int4(model: nn.Module) -> bool:
    """Whether ``model`` holds int4 modules (``quantize_int4`` installed them)."""
    return any(isinstance(module, (Int4Linear, Int4RoutedExperts)) for module in model.modules())


def absorb_int4(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Give every MLA layer of an int4 ``model`` on CPU int8 copies of ``kv_b_proj`` for decode rows, as
    ``quantized.absorb_int8`` does for int8 models (``kv_b_proj`` stays float in both); returns it."""
    for module in model.modules():
        if (
            isinstance(module, MultiHeadLatentAttention)
            and isinstance(module.kv_a_proj_with_mqa, Int4Linear)
            and module.kv_b_proj.weight.device.type == "cpu"
            and kernels.available
        ):
            module.int8_absorbed = Int8Absorbed(module.kv_b_proj.weight, module.num_heads, module.nope_dim, module.v_dim)
    return model
