"""One decode step (one new token of one row), written to compile to a single graph.

Shape legend: L layers, T cache capacity, H heads, N qk_nope_head_dim, V v_head_dim,
C kv_lora_rank, R qk_rope_head_dim, D hidden size.

The same math as ``DeepseekV2.forward`` with a :class:`~dsv2cli.model.cache.LatentKVCache` for one
row and one new token, reusing the model's modules, in a form ``torch.compile`` turns into one
graph whose shapes never change from step to step (``dsv2cli/inference/compiled.py``):

* the token's slot is a tensor, not a Python int, so every step has the same shapes: it attends
  over the filled slots through the C++ kernel (``attention_kernel``), or over the cache's whole
  capacity with a mask of the filled slots (two BLAS calls);
* its latent entry is written with ``index_put_`` into the cache tensor itself (in place in
  the compiled graph, not a copy of the cache);
* every matrix-vector product is :func:`matvec`, a product and a sum that inductor turns into
  one vectorized reduction converting each weight (float32, bfloat16 or int8 with row scales) as
  it streams it; the K chosen experts are gathered by their id tensor inside those reductions, so
  no expert id becomes a Python integer and every token runs the same graph;
* an RMSNorm that feeds weight products (float32 activations) hands them ``x * weight`` and its
  factor ``1 / rms(x)`` separately (:class:`Normed`): the factor scales the products' outputs, so no
  square root runs inside a weight loop;
* W_UK comes pre-transposed (``[H, C, N]``, :func:`absorbed_weights`) so that the absorbed
  query product reduces over contiguous memory; W_UV ``[H, V, C]`` already does. For int8 models
  both are int8 with a scale per row (``kv_b_proj`` is the one float matrix of an int8 checkpoint;
  the compiled step reads it at a quarter of the bytes).

An int8 model's step is therefore weight-only int8 (activations stay float32), unlike eager int8
decoding, which also quantizes each activation to run int8 x int8 products.

Eager PyTorch pays a few microseconds per operation (about 450 per step for the benchmark
model); compiled, the small ones fuse into a few dozen C++ kernels around the matmuls. Rows of a
batch, padding and routing hooks take the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dsv2cli import kernels
from dsv2cli.model.attention import MultiHeadLatentAttention, _softmax
from dsv2cli.model.dtypes import cast
from dsv2cli.model.fusion import FusedLinears
from dsv2cli.model.moe import MLP, MoE
from dsv2cli.model.norm import RMSNorm
from dsv2cli.model.quantized import quantize_rows
from dsv2cli.model.rope import apply_rope
from dsv2cli.model.transformer import DeepseekV2


@dataclass(frozen=True)
class AbsorbedWeights:
    """One layer's W_UK^T ``[H, C, N]`` and W_UV ``[H, V, C]``: float, or int8 with row scales ``[H, C]`` / ``[H, V]``."""

    key: torch.Tensor
    value: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None


def absorbed_weights(model: DeepseekV2, quantize: bool = False) -> list[AbsorbedWeights]:
    """W_UK^T (a contiguous copy, ``H * C * N`` values per layer) and W_UV of every layer; int8 when ``quantize``."""
    layers = []
    for layer in model.layers:
        w_uk, w_uv = layer.self_attn._kv_b_weights()
        key = w_uk.transpose(1, 2).contiguous()
        if quantize:
            (key, key_scale), (value, value_scale) = quantize_rows(key), quantize_rows(w_uv)
            layers.append(AbsorbedWeights(key, value, key_scale, value_scale))
        else:
            layers.append(AbsorbedWeights(key, w_uv))
    return layers


def decode_step(
    model: DeepseekV2,
    weights: list[AbsorbedWeights],
    token: torch.Tensor,
    slot: torch.Tensor,
    entries: torch.Tensor,
    attention_kernel: bool = False,
) -> torch.Tensor:
    """token ``[1, 1]`` at cache slot ``slot [1]`` (int64; also its position) -> logits ``[1, 1, vocab]``.

    ``entries`` is the cache tensor ``[L, 1, T, C + R]`` with slots ``0..slot-1`` filled; this step
    writes slot ``slot``. ``weights`` is :func:`absorbed_weights` of ``model``. ``attention_kernel``:
    attend with ``torch.ops.dsv2cli.latent_attention`` where it serves (the caller loaded it,
    :func:`dsv2cli.kernels.load`).
    """
    capacity = entries.shape[2]
    mask = (torch.arange(capacity, device=entries.device) <= slot)[None, None, :]  # [1, 1, T]
    cos, sin = model.rotary.cos_sin(slot[None])  # [1, 1, R/2]
    x = model.embed_tokens(token)  # [1, 1, D]
    for layer, absorbed in zip(model.layers, weights, strict=True):
        h = x + _attention(layer.self_attn, _normed(layer.input_layernorm, x), cos, sin, mask, slot, entries, absorbed, attention_kernel)
        if isinstance(layer.mlp, MoE):
            x = h + _moe(layer.mlp, layer.post_attention_layernorm(h))  # read by three products: stored once
        else:
            x = h + _mlp(layer.mlp, _normed(layer.post_attention_layernorm, h))
    return cast(_linear(model.lm_head, _normed(model.norm, x)), x.dtype)


@dataclass(frozen=True)
class Normed:
    """``norm(x)`` for the products that read it: ``values``, times ``factor`` (``[..., 1]``) when it is not None.

    For float32 activations the RMS factor ``1 / sqrt(mean(x^2) + eps)`` is kept apart and applied to
    the products' outputs (``W @ (x * weight) * factor``): left inside, inductor recomputes the
    factor's square root and division in the weight loop, once per 16 weights (it compiles with
    ``-fmath-errno``, so the C++ compiler may not hoist them; docs/performance.md).
    """

    values: torch.Tensor
    factor: torch.Tensor | None = None


def _normed(norm: RMSNorm, x: torch.Tensor) -> Normed:
    """RMSNorm of ``x [..., D]`` for weight products: the factor kept apart for float32, applied here otherwise."""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return Normed(norm(x))
    return Normed(x * norm.weight, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def matvec(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``weight [..., O, I] @ x [..., I]`` -> ``[..., O]`` float32; int8 weights are scaled by their rows' ``scale [..., O]``.

    Written as a product and a sum so that inductor emits one vectorized reduction that converts
    each weight as it streams it (gathers such as ``experts[ids]`` fuse into the same loop). For one
    token this reads weights faster than the library GEMV kernels called one by one
    (``docs/performance.md``).
    """
    product = (weight.to(torch.float32) * cast(x, torch.float32).unsqueeze(-2)).sum(-1)
    return product if scale is None else product * scale


def _linear(linear: nn.Module, x: torch.Tensor | Normed) -> torch.Tensor:
    """A bias-free ``nn.Linear`` or ``Int8Linear`` on ``x [..., I]`` -> ``[..., O]`` float32."""
    return _product(linear.weight, x, getattr(linear, "scale", None))


def _stacked(stack: FusedLinears, x: torch.Tensor | Normed) -> tuple[torch.Tensor, ...]:
    """Stacked linears (``fuse_projections``) on ``x [..., I]`` -> one float32 output per linear."""
    return _product(stack.weight, x, stack.scale).split(stack.sizes, dim=-1)


def _product(weight: torch.Tensor, x: torch.Tensor | Normed, scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`matvec` of a plain or a :class:`Normed` input (its factor applied to the outputs)."""
    if not isinstance(x, Normed):
        return matvec(weight, x, scale)
    out = matvec(weight, x.values, scale)
    return out if x.factor is None else out * x.factor


def _attention(
    attn: MultiHeadLatentAttention,
    x: Normed,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    slot: torch.Tensor,
    entries: torch.Tensor,
    absorbed: AbsorbedWeights,
    attention_kernel: bool,
) -> torch.Tensor:
    """Absorbed MLA for the one (normed) token ``x [1, 1, D]`` -> ``[1, 1, D]``; writes its cache entry."""
    heads, dtype = attn.num_heads, x.values.dtype
    query_proj = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
    if attn.fused_input is not None and attn.fused_input.usable():
        q, compressed = _stacked(attn.fused_input, x)
    else:
        q, compressed = _linear(query_proj, x), _linear(attn.kv_a_proj_with_mqa, x)
    q, compressed = cast(q, dtype), cast(compressed, dtype)
    if attn.q_lora_rank is not None:
        q = cast(_linear(attn.q_b_proj, _normed(attn.q_a_layernorm, q)), dtype)
    q_nope, q_pe = q.view(1, 1, heads, -1).split([attn.nope_dim, attn.rope_dim], dim=-1)  # [1, 1, H, N], [1, 1, H, R]
    latent, k_pe = compressed.split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    entry = torch.cat((attn.kv_a_layernorm(latent), apply_rope(k_pe, cos, sin)), dim=-1)  # [1, 1, C + R]
    layer = torch.full((1,), attn.layer_idx, dtype=torch.long, device=entries.device)
    entries.index_put_((layer, torch.zeros_like(slot), slot), cast(entry[:, 0], entries.dtype))
    kv = entries[attn.layer_idx]  # [1, T, C + R]
    q_latent = matvec(absorbed.key, q_nope.reshape(heads, -1), absorbed.key_scale)  # [H, C]
    query = torch.cat((cast(q_latent, q_pe.dtype).view(1, 1, heads, -1), apply_rope(q_pe, cos, sin)), dim=-1)
    query = query.view(heads, -1)
    if attention_kernel and kernels.latent_attention_supported(query, kv[0], attn.kv_lora_rank):
        out_latent = kernels.latent_attention(query, kv[0], slot + 1, attn.kv_lora_rank, attn.softmax_scale)  # [H, C]
    else:
        out_latent = _attend(query, kv[0], attn.kv_lora_rank, mask[0, 0], attn.softmax_scale)
    out = matvec(absorbed.value, out_latent, absorbed.value_scale)  # [H, V]
    return cast(_linear(attn.o_proj, cast(out, dtype).reshape(1, 1, heads * attn.v_dim)), dtype)


def _attend(query: torch.Tensor, kv: torch.Tensor, rank: int, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One row's absorbed attention: query ``[H, C + R]`` over kv ``[T, C + R]`` with mask ``[T]`` -> ``[H, C]``.

    ``_attend_shared``'s math for one row as two 2-D matmuls in the cache's dtype (a bfloat16 cache: bfloat16
    products, float32 softmax), which skip the batched matmul's copies of the strided latent view.
    The C++ kernel (``dsv2cli/kernels``) does the same in one pass over the filled slots only.
    """
    query = cast(query, kv.dtype)
    scores = torch.mm(kv, query.t()).t() * scale  # [H, T]
    probs = _softmax(scores, mask, kv.dtype)  # float32 softmax, back in the cache's dtype
    return cast(torch.mm(probs, kv[:, :rank]), torch.float32)


def _mlp(mlp: MLP, x: torch.Tensor | Normed) -> torch.Tensor:
    """SwiGLU MLP (dense layer or shared experts) on ``x [..., D]`` -> ``[..., D]`` in x's dtype."""
    dtype = x.values.dtype if isinstance(x, Normed) else x.dtype
    if mlp.fused_gate_up is not None and mlp.fused_gate_up.usable():
        gate, up = _stacked(mlp.fused_gate_up, x)
    else:
        gate, up = _linear(mlp.gate_proj, x), _linear(mlp.up_proj, x)
    hidden = cast(F.silu(gate) * up, dtype)
    return cast(_linear(mlp.down_proj, hidden), dtype)


def _moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE for the one token ``x [1, 1, D]`` (no routing hook) -> ``[1, 1, D]``.

    The K chosen experts are gathered by their ids inside the reductions (no Python integers, so
    the graph is the same whichever experts a token picks).
    """
    flat = x.reshape(1, -1)  # [1, D]
    _, ids, weights = moe.gate.choose(matvec(moe.gate.weight, flat))  # [1, K] each
    experts, ids = moe.experts, ids[0]
    gate_up_scale = getattr(experts, "gate_up_proj_scale", None)
    down_scale = getattr(experts, "down_proj_scale", None)
    gate, up = matvec(experts.gate_up_proj[ids], flat, None if gate_up_scale is None else gate_up_scale[ids]).chunk(2, dim=-1)
    hidden = cast(F.silu(gate) * up, x.dtype)  # [K, M]
    down = matvec(experts.down_proj[ids], hidden, None if down_scale is None else down_scale[ids])  # [K, D]
    out = (weights.view(-1, 1) * down).sum(0, keepdim=True)  # [1, D]: a reduction inductor fuses (a matmul is a BLAS call)
    if moe.shared_experts is not None:
        out = out + _mlp(moe.shared_experts, flat)
    return cast(out, x.dtype).view(1, 1, -1)
