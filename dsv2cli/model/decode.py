"""One decode step (one new token of one row), written to compile to a single graph.

Shape legend: L layers, T cache capacity, H heads, N qk_nope_head_dim, V v_head_dim,
C kv_lora_rank, R qk_rope_head_dim, D hidden size.

The same math as ``DeepseekV2.forward`` with a :class:`~dsv2cli.model.cache.LatentKVCache` for one
row and one new token, reusing the model's modules, in a form ``torch.compile`` turns into one
graph whose shapes never change from step to step (``dsv2cli/inference/compiled.py``):

* the token attends over the cache's whole capacity with a mask of the filled slots, and its
  slot is a tensor, not a Python int, so every step has the same shapes;
* its latent entry is written with ``index_put_`` into the cache tensor itself (in place in
  the compiled graph, not a copy of the cache);
* the K chosen experts are read with ``.tolist()`` (the compiler captures them as symbolic
  integers) and run as in eager decoding;
* W_UK comes pre-transposed (``[H, C, N]``, :func:`absorbed_weights`) so that the absorbed
  query product reduces over contiguous memory; W_UV ``[H, V, C]`` already does. For int8 models
  both are int8 with a scale per row (``kv_b_proj`` is the one float matrix of an int8 checkpoint;
  the compiled step reads it at a quarter of the bytes, dequantizing inside the fused reduction).

Eager PyTorch pays a few microseconds per operation (about 450 per step for the benchmark
model); compiled, the small ones fuse into a few dozen C++ kernels around the matmuls. Rows of a
batch, padding and routing hooks take the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2cli.model.attention import MultiHeadLatentAttention, _attend_shared
from dsv2cli.model.dtypes import cast
from dsv2cli.model.moe import MoE
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
) -> torch.Tensor:
    """token ``[1, 1]`` at cache slot ``slot [1]`` (int64; also its position) -> logits ``[1, 1, vocab]``.

    ``entries`` is the cache tensor ``[L, 1, T, C + R]`` with slots ``0..slot-1`` filled; this step
    writes slot ``slot``. ``weights`` is :func:`absorbed_weights` of ``model``.
    """
    capacity = entries.shape[2]
    mask = (torch.arange(capacity, device=entries.device) <= slot)[None, None, :]  # [1, 1, T]
    cos, sin = model.rotary.cos_sin(slot[None])  # [1, 1, R/2]
    x = model.embed_tokens(token)  # [1, 1, D]
    for layer, absorbed in zip(model.layers, weights, strict=True):
        h = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask, slot, entries, absorbed)
        normed = layer.post_attention_layernorm(h)
        x = h + (_moe(layer.mlp, normed) if isinstance(layer.mlp, MoE) else layer.mlp(normed))
    return model.lm_head(model.norm(x))


def _attention(
    attn: MultiHeadLatentAttention,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    slot: torch.Tensor,
    entries: torch.Tensor,
    absorbed: AbsorbedWeights,
) -> torch.Tensor:
    """Absorbed MLA for the one token ``x [1, 1, D]`` -> ``[1, 1, D]``; writes its cache entry."""
    heads = attn.num_heads
    q, compressed = attn._project(x)  # [1, 1, H, N + R], [1, 1, C + R]
    q_nope, q_pe = q.split([attn.nope_dim, attn.rope_dim], dim=-1)
    latent, k_pe = compressed.split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    entry = torch.cat((attn.kv_a_layernorm(latent), apply_rope(k_pe, cos, sin)), dim=-1)  # [1, 1, C + R]
    layer = torch.full((1,), attn.layer_idx, dtype=torch.long, device=entries.device)
    entries.index_put_((layer, torch.zeros_like(slot), slot), entry[:, 0])
    kv = entries[attn.layer_idx]  # [1, T, C + R]
    q_latent = _per_head(absorbed.key, absorbed.key_scale, q_nope.reshape(heads, -1))  # [H, C]
    query = torch.cat((cast(q_latent, q_pe.dtype).view(1, 1, heads, -1), apply_rope(q_pe, cos, sin)), dim=-1)
    out_latent = _attend_shared(query, kv, kv[..., : attn.kv_lora_rank], mask, attn.softmax_scale)  # [1, 1, H, C]
    out = _per_head(absorbed.value, absorbed.value_scale, out_latent.view(heads, -1))  # [H, V]
    return attn.o_proj(cast(out, x.dtype).reshape(1, 1, heads * attn.v_dim))


def _per_head(weight: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``weight [H, O, I] @ x [H, I]`` per head -> ``[H, O]``, int8 weights dequantized by their row ``scale [H, O]``."""
    if scale is None:
        return (weight * cast(x, weight.dtype)[:, None, :]).sum(-1)
    return (weight.to(torch.float32) * cast(x, torch.float32)[:, None, :]).sum(-1) * scale


def _moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE for the one token ``x [1, 1, D]`` (no routing hook) -> ``[1, 1, D]``."""
    flat = x.reshape(1, -1)
    _, _, ids, weights = moe.gate(flat)
    expert_ids = ids[0].tolist()
    for index in expert_ids:  # tells the compiler the ids index the expert stack
        torch._check(index >= 0)
        torch._check(index < moe.experts.num_experts)
    out = cast(moe.experts.one_token(flat, expert_ids, weights), x.dtype)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(1, 1, -1)
