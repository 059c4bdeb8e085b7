"""Weight-only int8 (symmetric, per output channel): modules and the transform that installs them.

Shape legend: N tokens, D hidden size, O output features, I input features, E routed experts,
M moe_intermediate_size.

A weight ``W [O, I]`` is stored as ``q [O, I]`` int8 and ``scale [O]`` with ``W ~ q * scale[:, None]``
and ``scale = max|W[o, :]| / 127``. Activations stay in floating point.

Like gpt-fast's ``quantize.py`` this is a transform applied to a built model (``quantize_int8``);
the model files do not know about it. Embeddings, norms and the router stay in floating point,
and so does ``kv_b_proj``: absorbed attention reads its weight directly as W_UK / W_UV, except in
int8 x int8 rows, which read int8 copies made at load time (:func:`absorb_int8`). ``lm_head`` is int8
too (it is the largest matrix a decode step reads) unless it is tied to the embedding; int8
checkpoints written before it was quantized keep a float head (``quantize_head=False``).

On CPU, the rows :func:`int8_rows` picks (decode rows, eager or compiled; every row on CPUs without
AMX tiles) are quantized per row and run int8 x int8 through dsv2's kernel
(``dsv2cli/kernels/int8_matmul.cpp``) when the forward's options give the kernels (``model/options.py``;
the int8 modules take them as an argument, ``takes_kernels``). More rows on a CPU with AMX tiles run
bfloat16 GEMMs on the int8 values (:func:`prefill_in_bfloat16`). Where the kernels cannot be built, one token
takes :func:`int8_row` (int8 x int8 with VNNI, torch's int8-weight kernel on the bfloat16 token elsewhere),
bfloat16 activations ``torch._weight_int8pack_mm`` and other activation dtypes dequantize the weight on the fly, one
matrix (or one expert) at a time (``benchmarks/bench_int8_kernel.py`` and
``benchmarks/bench_vs_llamacpp.py`` measure them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dsv2cli.kernels import NO_KERNELS, Kernels
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.dtypes import cast
from dsv2cli.model.moe import RoutedExperts, experts_on_one_token, run_experts, weighted_experts_of_one_token

# Linear layers that stay in floating point (see the module docstring for why).
FLOAT_LINEARS = ("kv_b_proj",)

# Up to this many rows (decode steps of a batch, short prompts), CPU products quantize each row to int8 and run
# int8 x int8 (``dsv2cli/kernels/int8_matmul.cpp``): they read the weight at memory speed. More rows (a prefill)
# are compute-bound: they run int8 x int8 too (twice the float32 rate with AVX2, 64 products an instruction with
# AVX512-VNNI), except on CPUs with AMX tiles, where bfloat16 GEMMs on the int8 values (:func:`prefill_in_bfloat16`).
DECODE_ROWS = 16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., O, I]`` (any float dtype) -> ``(q [..., O, I] int8, scale [..., O] float32)``.

    Symmetric: ``q = round(w / scale)`` in ``[-127, 127]``; an all-zero row gets scale 1.
    """
    w = weight.float()
    amax = w.abs().amax(dim=-1)  # [..., O]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q [..., O, I]`` int8, ``scale [..., O]`` -> the float weight ``[..., O, I]`` in ``dtype``."""
    return (q.to(dtype) * scale.to(dtype)[..., None]).to(dtype)


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernels: Kernels, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., I] @ (q * scale)^T`` -> ``[..., O]`` in x's dtype.

    On CPU, rows that :func:`int8_rows` picks (decode rows; every row on CPUs without AMX tiles) are
    quantized per row and run int8 x int8 through dsv2's kernel (from ``kernels``). Otherwise (more rows on a CPU
    with AMX tiles, or without the kernels): one token takes :func:`int8_row`; several tokens on
    a CPU with AMX tiles run a bfloat16 GEMM on the int8 values (exact in bfloat16), scaled after; with
    bfloat16 activations torch's int8-weight kernel; with other dtypes the weight is dequantized.
    torch's CPU int8-weight kernel (2.13) needs I to be a multiple of 16 and the weight 16-byte aligned:
    otherwise it returns NaNs or crashes, so such weights take the dequantizing path. Every released
    DeepSeek-V2 dimension is a multiple of 16, and the native writer aligns int8 weights. ``amax``: the
    token's largest ``|x|`` over a longer row than ``x`` (see :func:`quantize_activation`); only the
    int8 x int8 paths quantize ``x``.
    """
    if through_int8_kernel(x, q, kernels):
        rows = x.reshape(-1, x.shape[-1])
        out = kernels.int8_matmul(*quantize_activation(rows, amax), q[None], scale[None])
        return cast(out, x.dtype).reshape(*x.shape[:-1], q.shape[0])
    if is_one_cpu_token(x):
        row = x.reshape(1, -1)
        out = int8_row(row, q, scale, lambda: quantize_activation(row, amax))
        return cast(out, x.dtype).reshape(*x.shape[:-1], q.shape[0])
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and prefill_in_bfloat16():
        # int8 values are exact in bfloat16, and with AMX a bfloat16 GEMM runs ~4x faster than a float32 one and ~3x
        # faster than torch's int8-weight kernel (float32 activations and outputs round to bfloat16). Not with
        # AVX512-BF16 alone: there, under torchrun, each rank's partial sums rounded to bfloat16 changed greedy
        # tokens against one process (tests/test_parallel_native.py, on Zen 4).
        return cast(F.linear(cast(x, torch.bfloat16), q.to(torch.bfloat16)), x.dtype) * cast(scale, x.dtype)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and int8pack_ok(q):
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch._weight_int8pack_mm(flat, q, scale.to(torch.bfloat16))  # [N, O]
        return out.reshape(*x.shape[:-1], q.shape[0])
    # Multiplying the output by the scale is exact in real arithmetic and avoids a scaled weight copy.
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


@functools.cache
def fast_cpu_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16); elsewhere bfloat16 GEMMs are slower than float32."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


@functools.cache
def prefill_in_bfloat16() -> bool:
    """Whether a prefill's rows (more than :data:`DECODE_ROWS`) run bfloat16 GEMMs on the int8 values rather than dsv2's
    int8 kernel: on CPUs with AMX tiles only.

    With AVX512-BF16 but no AMX (AMD Zen 4), the kernel's VNNI products are faster, and they read the int8 weight
    as it lies where a bfloat16 GEMM first writes a bfloat16 copy of it: a V2-Lite int8 prefill of 16 prompts of
    13 tokens took 3.0 s against 5.2 s, one of 512 tokens 7.1 s against 11.9 s (2 Zen 4 cores).
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe()) and fast_cpu_bfloat16()


def _float_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def int8_rows(x: torch.Tensor) -> bool:
    """Whether the rows of ``x [..., I]`` (float activations on CPU) run int8 x int8: up to :data:`DECODE_ROWS` of
    them, or any number unless :func:`prefill_in_bfloat16`."""
    return _float_on_cpu(x) and (x.numel() <= DECODE_ROWS * x.shape[-1] or not prefill_in_bfloat16())


def through_int8_kernel(x: torch.Tensor, weight: torch.Tensor, kernels: Kernels) -> bool:
    """Whether ``x``'s rows against the int8 ``weight`` run through dsv2's kernel (:func:`int8_rows`, and ``kernels`` take ``weight``)."""
    return int8_rows(x) and kernels.int8_matmul_supported(weight)


def is_one_cpu_token(x: torch.Tensor) -> bool:
    """Whether ``x [..., I]`` is a single row of float activations on CPU (the one-token paths without the kernel)."""
    return _float_on_cpu(x) and x.numel() == x.shape[-1]


# 127 as a tensor: arithmetic with a Python float costs an extra cast kernel per call on CPU.
_INT8_LEVELS = torch.tensor(127.0)


def row_amax(x: torch.Tensor) -> torch.Tensor:
    """The largest ``|x|`` of each row ``x [n, I]`` -> ``[n, 1]`` float32 (at least 1e-30): what sets a row's int8 step."""
    return torch.linalg.vector_norm(cast(x, torch.float32), float("inf"), dim=-1, keepdim=True).clamp_min_(1e-30)


def quantize_activation(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x [n, I]`` -> ``(int8 [n, I], step [n, 1] float32)`` with ``x ~ int8 * step`` (symmetric, per row).

    8 bits per value with one scale per token, like llama.cpp's Q8_0 activations (which keep one
    scale per 32 values). ``amax [n, 1]``: the rows' :func:`row_amax` when ``x`` holds only some of
    their columns (one rank's share under tensor parallelism), so that every share is quantized with
    the whole row's step.
    """
    x = cast(x, torch.float32)
    step = (row_amax(x) if amax is None else amax) / _INT8_LEVELS
    return torch.div(x, step).round_().to(torch.int8), step


def int8_gemv(token: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A quantized token (:func:`quantize_activation`) against ``q [O, I]`` int8 -> ``[1, O]`` float32.

    ``torch._int_mm`` (int8 x int8 -> int32 dot products) streams the int8 weight at memory speed for
    one row, about twice as fast as a kernel that converts each weight to float (compute-bound on
    AVX-512 CPUs); the int32 sums are exact, then scaled by the weight's rows and the token's step.
    One quantized token serves every matrix that reads it (q_a and kv_a, all experts' gate_up).
    """
    values, step = token
    return torch._int_mm(values, q.t()).mul(cast(scale, torch.float32)).mul_(step)


@functools.cache
def int8_dot_products() -> bool:
    """Whether this CPU has VNNI (native int8 dot products), where one token's int8 x int8 product is fastest."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe and probe())


def int8pack_ok(q: torch.Tensor) -> bool:
    """Whether torch's CPU int8-weight kernel takes ``q [O, I]``: I a multiple of 16, the weight 16-byte aligned
    (torch 2.13 returns NaNs or crashes otherwise)."""
    return q.shape[-1] % 16 == 0 and q.data_ptr() % 16 == 0


def int8_row(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, token: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """One row ``x [1, I]`` against ``q [O, I]`` int8 -> ``[1, O]`` float32, by the kernel this CPU streams fastest.

    With VNNI, int8 x int8 dot products on the quantized row (:func:`int8_gemv`; ``token()`` quantizes it,
    so a caller can share one quantization between matrices). Without VNNI (AVX2 CPUs), oneDNN's int8
    products read the weight at ~2.6 GB/s on a Zen 2 while torch's int8-weight kernel on the bfloat16 row
    reads it at ~12 GB/s from memory (``benchmarks/notes/2026-12-05-one-forward.md``): that one (bfloat16
    activations and outputs, float32 scale rounded to bfloat16: the error of the int8 token).
    """
    if int8_dot_products() or not int8pack_ok(q):
        return int8_gemv(token(), q, scale)
    return torch._weight_int8pack_mm(cast(x, torch.bfloat16), q, cast(scale, torch.bfloat16)).float()


def _stacked_int8_product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kernels: Kernels) -> torch.Tensor:
    assert scale is not None  # an int8 stack always has its scales
    return int8_linear(x, weight, scale, kernels)


class Int8Linear(nn.Module):
    """``nn.Linear`` (no bias) with an int8 ``weight [O, I]`` and a float32 ``scale [O]``."""

    takes_kernels = True  # called with the forward's kernels (``options.project``)
    stacked_product = staticmethod(_stacked_int8_product)  # how stacks of these run (``fusion.fused``)

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        if linear.weight.is_meta:
            return module
        module.weight, module.scale = quantize_rows(linear.weight.detach())
        return module

    def forward(self, x: torch.Tensor, kernels: Kernels = NO_KERNELS) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, kernels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8RoutedExperts(nn.Module):
    """:class:`RoutedExperts` with int8 stacked weights.

    ``gate_up_proj [E, 2M, D]`` int8 with ``gate_up_proj_scale [E, 2M]``, ``down_proj [E, D, M]`` int8
    with ``down_proj_scale [E, D]``; the same forward contract as ``RoutedExperts``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device: torch.device | str | None = None):
        super().__init__()
        e, d, m = num_experts, hidden_size, intermediate_size
        self.num_experts = e
        self.register_buffer("gate_up_proj", torch.empty(e, 2 * m, d, dtype=torch.int8, device=device))
        self.register_buffer("gate_up_proj_scale", torch.ones(e, 2 * m, dtype=torch.float32, device=device))
        self.register_buffer("down_proj", torch.empty(e, d, m, dtype=torch.int8, device=device))
        self.register_buffer("down_proj_scale", torch.ones(e, d, dtype=torch.float32, device=device))

    @classmethod
    def from_experts(cls, experts: RoutedExperts) -> Int8RoutedExperts:
        e, two_m, d = experts.gate_up_proj.shape
        module = cls(e, d, two_m // 2, device=experts.gate_up_proj.device)
        if experts.gate_up_proj.is_meta:
            return module
        module.gate_up_proj, module.gate_up_proj_scale = quantize_rows(experts.gate_up_proj.detach())
        module.down_proj, module.down_proj_scale = quantize_rows(experts.down_proj.detach())
        return module

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on its tokens ``x [n, D]`` -> ``[n, D]`` (the rows that do not run through dsv2's kernel)."""
        gate, up = int8_linear(x, self.gate_up_proj[index], self.gate_up_proj_scale[index], NO_KERNELS).chunk(2, dim=-1)
        return int8_linear(F.silu(gate) * up, self.down_proj[index], self.down_proj_scale[index], NO_KERNELS)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, kernels: Kernels = NO_KERNELS
    ) -> torch.Tensor:
        """x ``[N, D]``, expert_ids/weights ``[N, K]`` -> ``[N, D]`` float32 (see ``RoutedExperts.forward``).

        Rows that run through dsv2's int8 kernel (from ``kernels``): :meth:`int8_rows`. Otherwise one token on CPU
        takes :meth:`one_token` and several tokens run each chosen expert over its tokens.
        """
        if through_int8_kernel(x, self.gate_up_proj, kernels):
            return self.int8_rows(x, expert_ids, weights, kernels)
        if not is_one_cpu_token(x):
            return run_experts(x, expert_ids, weights, self.num_experts, self.expert)
        return experts_on_one_token(x, expert_ids, weights, self.one_token)

    def int8_rows(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """Rows ``x [N, D]`` through their K experts each, every product int8 x int8 -> ``[N, D]`` float32.

        The experts are read where they lie, picked by id inside the kernel (no Python integers: a compiled
        step runs the same graph whichever experts the rows choose), each read once for all the rows that
        chose it. A dropped assignment (id -1) adds nothing.
        """
        rows, top_k = expert_ids.shape
        ids = expert_ids.reshape(-1)  # [N*K]: row n's k-th expert at n*K + k
        values, step = quantize_activation(x)  # [N, D], [N, 1]
        gate_up = kernels.int8_matmul(
            values.repeat_interleave(top_k, 0), step.repeat_interleave(top_k, 0), self.gate_up_proj, self.gate_up_proj_scale, ids
        )  # [N*K, 2M]
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up  # [N*K, M] float32
        down = kernels.int8_matmul(*quantize_activation(hidden), self.down_proj, self.down_proj_scale, ids)  # [N*K, D]
        return (down.view(rows, top_k, -1) * cast(weights, torch.float32)[..., None]).sum(1)

    def one_token(self, x: torch.Tensor, ids: list[int], weights: torch.Tensor) -> torch.Tensor:
        """x ``[1, D]`` on CPU through experts ``ids`` (none dropped), weights ``[1, K]`` -> ``[1, D]`` float32.

        Each product through :func:`int8_row`; where that quantizes, ``x`` is quantized once for every gate_up.
        """
        token = functools.cache(lambda: quantize_activation(x))

        def down(indices: list[int], hidden: torch.Tensor) -> torch.Tensor:
            rows = [
                int8_row(
                    hidden[k : k + 1],
                    self.down_proj[i],
                    self.down_proj_scale[i],
                    lambda k=k: quantize_activation(hidden[k : k + 1]),
                )
                for k, i in enumerate(indices)
            ]
            return torch.cat(rows)

        return weighted_experts_of_one_token(
            x, ids, weights, lambda i: int8_row(x, self.gate_up_proj[i], self.gate_up_proj_scale[i], token), down
        )


class Int8Absorbed:
    """One MLA layer's absorbed products in int8 for decode rows: W_UK^T ``[H, C, N]`` and W_UV ``[H, V, C]``.

    ``kv_b_proj`` stays float in int8 checkpoints (attention reads its halves per head), yet a decode step
    reads all of it: 16 x 256 x 512 values per layer of DeepSeek-V2-Lite, as much as its ``o_proj``. These
    int8 copies with a scale per row (made from the loaded weight, never stored) read a quarter of the float32
    bytes: each head's rows of ``q_nope`` (and of the attention's latent output) go through their head's
    matrix, picked by id in dsv2's int8 kernel.
    """

    def __init__(self, kv_b_weight: torch.Tensor, heads: int, nope_dim: int, v_dim: int) -> None:
        w = kv_b_weight.detach().view(heads, nope_dim + v_dim, -1)  # [H, N + V, C]
        self.key, self.key_scale = quantize_rows(w[:, :nope_dim].transpose(1, 2).contiguous())  # [H, C, N], [H, C]
        self.value, self.value_scale = quantize_rows(w[:, nope_dim:].contiguous())  # [H, V, C], [H, V]
        self.heads = heads

    def serves(self, x: torch.Tensor, kernels: Kernels) -> bool:
        """Whether the tokens of ``x [B, S, H, *]`` run int8 x int8 (:func:`int8_rows`) through ``kernels``."""
        return int8_rows(x.flatten(2)) and kernels.int8_matmul_supported(self.key)

    def _per_head(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [B*S*H, I]: row r is head r % H
        ids = torch.arange(self.heads, device=x.device).repeat(rows.shape[0] // self.heads)
        out = kernels.int8_matmul(*quantize_activation(rows), weight, scale, ids)
        return cast(out, x.dtype).view(*x.shape[:-1], -1)

    def absorb_key(self, q_nope: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """``q_nope [B, S, H, N]`` -> ``W_UK^T q_nope`` ``[B, S, H, C]``."""
        return self._per_head(q_nope, self.key, self.key_scale, kernels)

    def apply_value(self, latent: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """Attention's latent output ``[B, S, H, C]`` -> ``W_UV`` applied per head ``[B, S, H, V]``."""
        return self._per_head(latent, self.value, self.value_scale, kernels)


def absorb_int8(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Give every MLA layer of an int8 ``model`` on CPU its :class:`Int8Absorbed` products where ``kernels`` (the
    handle forwards will be given) run them; returns it."""
    for module in model.modules():
        if (
            isinstance(module, MultiHeadLatentAttention)
            and isinstance(module.kv_a_proj_with_mqa, Int8Linear)  # (o_proj is split under tensor parallelism)
            and kernels.int8_matmul_supported(module.kv_a_proj_with_mqa.weight)
        ):
            module.int8_absorbed = Int8Absorbed(module.kv_b_proj.weight, module.num_heads, module.nope_dim, module.v_dim)
    return model


def quantize_int8(model: nn.Module, quantize_head: bool = True) -> nn.Module:
    """Replace the quantizable linears and every ``RoutedExperts`` of ``model`` in place; returns it.

    On a meta-device model this only installs the int8 structure (to assign an int8 checkpoint);
    on a loaded model it quantizes the weights. ``lm_head`` stays float when ``quantize_head`` is
    False or when it is tied to the embedding.
    """
    embedding = getattr(model, "embed_tokens", None)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RoutedExperts):
                setattr(module, child_name, Int8RoutedExperts.from_experts(child))
            elif isinstance(child, nn.Linear) and child_name not in FLOAT_LINEARS and child.bias is None:
                tied = embedding is not None and child.weight is embedding.weight
                if child_name == "lm_head" and (tied or not quantize_head):
                    continue
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model


def has_int8(model: nn.Module) -> bool:
    """Whether ``model`` holds int8 modules (``quantize_int8`` installed them, or a sharded form of them)."""
    return any(buffer.dtype == torch.int8 for buffer in model.buffers())
