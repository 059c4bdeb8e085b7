"""Multi-head Latent Attention (spec §3), naive and absorbed.

Shape legend: B batch, S new tokens, T attended slots (cached + new), H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, D hidden size.

* naive: expand every attended latent into per-head K ``[N | R]`` and V, then attend.
* absorbed: fold W_UK into the query (``q~ = W_UK^T q_nope``, C wide) and attend over
  ``[c_KV | k_pe]`` directly (one shared "head" of C + R); apply W_UV after attention.
  Nothing per head is ever built for the cached tokens.

dsv2's C++ kernels run where the forward's :class:`ForwardOptions` give them and they serve: one-token
absorbed steps attend in one pass over the cache, and int8 models (``quantized.py``) run their products
int8 x int8.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dsv2cli.config import ModelConfig
from dsv2cli.kernels import Kernels
from dsv2cli.model.cache import LayerKV
from dsv2cli.model.dtypes import cast
from dsv2cli.model.fusion import FusedLinears, fused
from dsv2cli.model.norm import RMSNorm
from dsv2cli.model.options import TORCH_ONLY, ForwardOptions, project
from dsv2cli.model.rope import apply_rope

ATTENTION_IMPLS = ("absorbed", "naive")

# Upper bound on the float32 score elements materialised at once (queries are chunked above it).
_SCORE_BUDGET = 1 << 25


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        d, h, qk = config.hidden_size, config.num_attention_heads, config.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * config.v_head_dim, d, bias=False)
        self.fused_input: FusedLinears | None = None  # set by fuse_projections(): query + kv_a in one matmul
        # Set by quantized.absorb_int8() on int8 models: decode rows' W_UK / W_UV products in int8.
        self.int8_absorbed = None

    def fuse_projections(self) -> None:
        """Stack the query's and ``kv_a_proj_with_mqa``'s weights (``fusion.py``) where they can be."""
        query = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        self.fused_input = fused(query, self.kv_a_proj_with_mqa)

    def _project(self, x: torch.Tensor, kernels: Kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, S, D]`` -> q ``[B, S, H, N + R]`` and the compressed kv ``[B, S, C + R]`` (before norm and rope)."""
        query = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        if self.fused_input is not None and self.fused_input.usable():
            q, kv = self.fused_input(x, kernels)
        else:
            q, kv = project(query, x, kernels), project(self.kv_a_proj_with_mqa, x, kernels)
        if self.q_lora_rank is not None:
            q = project(self.q_b_proj, self.q_a_layernorm(q), kernels)
        return q.unflatten(-1, (self.num_heads, -1)), kv

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[H, N, C]`` and W_UV ``[H, V, C]`` as views of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: LayerKV | None = None,
        impl: str = "absorbed",
        options: ForwardOptions = TORCH_ONLY,
    ) -> torch.Tensor:
        """x ``[B, S, D]``; cos/sin ``[B, S, R/2]``; mask ``[B, S, T]`` bool or None (causal); ``kv``: this layer's
        cache, written and read (None: the new tokens attend to each other only). Returns ``[B, S, D]``."""
        batch, seq, _ = x.shape
        q, compressed = self._project(x, options.kernels)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)  # [B, S, H, R]
        latent, k_pe = compressed.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        entries = torch.cat((self.kv_a_layernorm(latent), apply_rope(k_pe, cos, sin)), dim=-1)  # [B, S, C + R]
        bounds = None if kv is None else kv.bounds
        kv = entries if kv is None else kv.write(entries)  # [B, T, C + R]
        if impl == "absorbed":
            out = self._absorbed(q_nope, q_pe, kv, mask, bounds, options)
        elif impl == "naive":
            out = self._naive(q_nope, q_pe, kv, mask)
        else:
            raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
        return project(self.o_proj, out.reshape(batch, seq, self.num_heads * self.v_dim), options.kernels)

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv: torch.Tensor,
        mask: torch.Tensor | None,
        bounds: torch.Tensor | None,
        options: ForwardOptions,
    ) -> torch.Tensor:
        w_uk, w_uv = self._kv_b_weights()
        batch, seq, heads, _ = q_nope.shape
        kernels = options.kernels
        int8 = self.int8_absorbed if self.int8_absorbed is not None and self.int8_absorbed.serves(q_nope, kernels) else None
        if int8 is not None:
            q_latent = int8.absorb_key(q_nope, kernels)  # [B, S, H, C]
        else:  # per-head products as one batched matmul over heads (what einsum would do, minus its planning)
            q_latent = (
                torch.bmm(q_nope.reshape(batch * seq, heads, -1).transpose(0, 1), w_uk).transpose(0, 1).unflatten(0, (batch, seq))
            )
        query = torch.cat((q_latent, q_pe), dim=-1)  # [B, S, H, C + R]
        attend = options.latent_attention
        if attend is not None and seq == 1 and attend.latent_attention_supported(query[0, 0], kv[0], self.kv_lora_rank):
            if bounds is None:  # no cache: the one token attends to itself
                bounds = torch.tensor([[0, kv.shape[1]]]).expand(batch, 2)
            out_latent = self._attend_kernel(query, kv, bounds, attend)  # [B, 1, H, C]
        else:
            out_latent = _attend_shared(query, kv, kv[..., : self.kv_lora_rank], mask, self.softmax_scale)  # [B, S, H, C]
        if int8 is not None:
            return int8.apply_value(out_latent, kernels)  # [B, S, H, V]
        out = torch.bmm(out_latent.reshape(batch * seq, heads, -1).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*S, V]
        return out.transpose(0, 1).unflatten(0, (batch, seq))  # [B, S, H, V]

    def _attend_kernel(self, query: torch.Tensor, kv: torch.Tensor, bounds: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """One new token per row: query ``[B, 1, H, C + R]`` over kv ``[B, T, C + R]`` -> ``[B, 1, H, C]``.

        ``dsv2cli/kernels``: one pass over each row's slots ``bounds[b, 0]..bounds[b, 1]-1`` (``[B, 2]``:
        after its left padding, up to the token's own), the latent read once for scores and values.
        """
        rows = [
            kernels.latent_attention(query[b, 0], kv[b], bounds[b], self.kv_lora_rank, self.softmax_scale)
            for b in range(kv.shape[0])
        ]
        return cast(torch.stack(rows)[:, None], query.dtype)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latent, k_pe = cast(kv, q_nope.dtype).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # the cache may be narrower
        expanded = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, -1))  # [B, T, H, N + V]
        k_nope, value = expanded.split([self.nope_dim, self.v_dim], dim=-1)
        key = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)), dim=-1)  # [B, T, H, N + R]
        query = torch.cat((q_nope, q_pe), dim=-1)  # [B, S, H, N + R]
        return _attend_per_head(query, key, value, mask, self.softmax_scale)


def _chunks(batch: int, seq: int, heads: int, keys: int) -> int:
    """Queries per chunk so that one chunk's scores stay under the budget."""
    return max(1, min(seq, _SCORE_BUDGET // max(1, batch * heads * keys)))


def _causal_or(mask: torch.Tensor | None, seq: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """The explicit mask, or a causal one aligned to the last query when several queries are new."""
    if mask is not None or seq == 1:
        return mask
    query = torch.arange(keys - seq, keys, device=device)[:, None]
    return (torch.arange(keys, device=device)[None, :] <= query)[None]


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim in float32, cast back to the activation dtype (spec §3.7)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return cast(scores.softmax(dim=-1, dtype=torch.float32), dtype)


def _attend_shared(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """MQA with one key/value shared by all heads.

    query ``[B, S, H, C + R]``, keys ``[B, T, C + R]``, values ``[B, T, C]``, mask ``[B, S, T]`` -> ``[B, S, H, C]``.
    Scores are computed as ``keys @ query^T`` (``[B, T, S*H]``): with few queries and many cached
    slots, BLAS streams the cache row by row this way, several times faster than ``query @ keys^T``.
    Both products run in the cache's dtype (a bfloat16 cache: bfloat16 products with float32
    accumulation, as fast again as float32 ones on CPUs with AVX512-BF16) and the softmax in float32;
    the result comes back in the query's dtype.
    """
    out_dtype = query.dtype
    query = cast(query, keys.dtype)
    batch, seq, heads, _ = query.shape
    total = keys.shape[1]
    mask = _causal_or(mask, seq, total, query.device)
    step = _chunks(batch, seq, heads, total)
    outputs = []
    for start in range(0, seq, step):
        q = query[:, start : start + step]
        s = q.shape[1]
        scores = torch.matmul(keys, q.reshape(batch, s * heads, -1).transpose(1, 2))  # [B, T, s*H]
        scores = scores.transpose(1, 2).view(batch, s, heads, total) * scale
        m = None if mask is None else mask[:, start : start + step, None, :]  # [B, s, 1, T]
        probs = _softmax(scores, m, query.dtype)  # [B, s, H, T]
        outputs.append(cast(torch.matmul(probs.view(batch, s * heads, total), values), out_dtype).view(batch, s, heads, -1))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _attend_per_head(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Standard attention. query ``[B, S, H, N + R]``, key ``[B, T, H, N + R]``, value ``[B, T, H, V]`` -> ``[B, S, H, V]``.

    Queries are chunked like the absorbed path, so a long prefill never holds all ``S x T`` scores.
    On CPU the values are padded with zero columns to the query's head size (dropped after): torch's
    CPU flash-attention kernel needs one head size, and without it SDPA materializes every score
    and runs a separate softmax (2x slower for a 1024-token prefill of the benchmark model). A causal
    prefill from an empty cache (no mask, ``S == T``) uses the kernel's own causal masking.
    """
    batch, seq, heads, _ = query.shape
    total, v_dim = key.shape[1], value.shape[-1]
    step = _chunks(batch, seq, heads, total)
    causal = mask is None and seq == total and step >= seq
    mask = None if causal else _causal_or(mask, seq, total, query.device)
    if query.device.type == "cpu" and v_dim < query.shape[-1]:
        value = F.pad(value, (0, query.shape[-1] - v_dim))
    key_t, value_t = key.transpose(1, 2), value.transpose(1, 2)  # [B, H, T, .]
    outputs = []
    for start in range(0, seq, step):
        q = query[:, start : start + step].transpose(1, 2)  # [B, H, s, N + R]
        attn_mask = None if mask is None else mask[:, None, start : start + step]  # [B, 1, s, T]
        out = F.scaled_dot_product_attention(q, key_t, value_t, attn_mask=attn_mask, is_causal=causal, scale=scale)
        outputs.append(out[..., :v_dim].transpose(1, 2))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
