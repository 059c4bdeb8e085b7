"""Measured KV-cache bytes and decode speed: dsv2's latent cache against an expanded per-head K/V cache.

Both runs use one model and the same tokens: a prefill of ``context - decode_steps`` tokens, then
``decode_steps`` single-token steps, so each cache ends exactly full at ``context`` tokens.

* ``mla``: :class:`~dsv2cli.model.LatentKVCache` from ``model.new_cache`` with absorbed attention.
* ``mla-expanded``: :class:`ExpandedKVCache`, what a naive implementation (the original HF remote code)
  holds: every token's per-head K ``[H, N + R]`` and V ``[H, V]``, attended with standard attention.

Bytes are read from the tensors' storages, next to the prediction of :mod:`dsv2cli.analysis.kv_cache`
for the same shape. Shape legend: L layers, B batch, S new tokens, T cached tokens, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from dsv2cli.analysis.kv_cache import AttentionShape, Precision, Scheme, cache_row
from dsv2cli.analysis.params import count_params
from dsv2cli.checkpoint.fit import MemoryNeed, load_need, native_weights, require, working_bytes
from dsv2cli.checkpoint.hf_keys import native_shapes
from dsv2cli.checkpoint.loader import build_empty, load_checkpoint
from dsv2cli.config import ModelConfig
from dsv2cli.errors import InputError
from dsv2cli.model import DeepseekV2
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.dtypes import DTYPES
from dsv2cli.model.moe import MoE
from dsv2cli.model.rope import apply_rope

Step = Callable[[torch.Tensor], torch.Tensor]

# A random model above this many parameters gets a small vocabulary and dense FFNs (neither touches the cache).
MAX_RANDOM_PARAMS = 400_000_000
_SMALL_VOCAB = 4096
_DEFAULT_LAYERS = 2
_SMALL_FFN = 1024


class ExpandedKVCache:
    """Per-head keys ``[L, B, capacity, H, N + R]`` and values ``[L, B, capacity, H, V]``."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        heads: int | None = None,
    ) -> None:
        # heads: the heads this process holds (all of them, or its share when heads are split across ranks)
        shape = (config.num_hidden_layers, batch_size, capacity, heads or config.num_attention_heads)
        self.keys = torch.zeros(*shape, config.qk_head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, config.v_head_dim, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def nbytes(self) -> int:
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def write(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys [B, S, H, N + R]``, ``values [B, S, H, V]``; return all filled slots of this layer."""
        end = self.length + keys.shape[1]
        if end > self.capacity:
            raise ValueError(f"cache holds {self.capacity} tokens; {end} were asked for")
        self.keys[layer_idx, :, self.length : end] = keys
        self.values[layer_idx, :, self.length : end] = values
        return self.keys[layer_idx, :, :end], self.values[layer_idx, :, :end]


def _expanded_attention(
    attn: MultiHeadLatentAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: ExpandedKVCache
) -> torch.Tensor:
    """MLA as the HF remote code runs it: expand only the new tokens' K and V, cache them, attend per head."""
    batch, seq, _ = x.shape
    if attn.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.unflatten(-1, (attn.num_heads, -1))  # [B, S, H, N + R]
    q_nope, q_pe = q.split([attn.nope_dim, attn.rope_dim], dim=-1)
    query = torch.cat((q_nope, apply_rope(q_pe, cos, sin)), dim=-1)
    latent, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    expanded = attn.kv_b_proj(attn.kv_a_layernorm(latent)).unflatten(-1, (attn.num_heads, -1))  # [B, S, H, N + V]
    k_nope, value = expanded.split([attn.nope_dim, attn.v_dim], dim=-1)
    k_pe = apply_rope(k_pe, cos, sin)[:, :, None, :].expand(-1, -1, attn.num_heads, -1)  # [B, S, H, R]
    keys, values = cache.write(attn.layer_idx, torch.cat((k_nope, k_pe), dim=-1), value)  # [B, T, H, *]
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        is_causal=seq > 1,  # a prefill starts from an empty cache, so S == T
        scale=attn.softmax_scale,
    )  # [B, H, S, V]
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, attn.num_heads * attn.v_dim))


def expanded_forward(model: DeepseekV2, tokens: torch.Tensor, cache: ExpandedKVCache) -> torch.Tensor:
    """tokens ``[B, S]`` -> last-position logits ``[B, 1, V]``, the blocks of :class:`DeepseekV2` with an expanded cache."""
    if tokens.shape[1] > 1 and cache.length > 0:
        raise ValueError("a multi-token step must start from an empty cache")
    positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
    cos, sin = model.rotary.cos_sin(positions)
    x = model.embed_tokens(tokens)
    for layer in model.layers:
        h = x + _expanded_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache)
        normed = layer.post_attention_layernorm(h)
        x = h + (layer.mlp(normed, None) if isinstance(layer.mlp, MoE) else layer.mlp(normed))
    cache.length += tokens.shape[1]
    return model.lm_head(model.norm(x[:, -1:]))


@dataclass(frozen=True)
class MeasuredCache:
    scheme: str
    predicted_bytes: int
    measured_bytes: int
    decode_step_seconds: float

    @property
    def matches(self) -> bool:
        return self.predicted_bytes == self.measured_bytes


@dataclass(frozen=True)
class CacheMeasurement:
    model: str
    weights: str
    """``checkpoint`` or ``random``."""
    config: ModelConfig
    changes: list[str]
    """How the measured model differs from the reported one (empty when it is the same)."""
    dtype: str
    batch_size: int
    context: int
    prompt_tokens: int
    decode_steps: int
    rows: list[MeasuredCache]
    logit_difference: float
    """max |latent - expanded| / max |latent| over the last step's logits: both caches compute the same function."""
    ranks: int = 1
    """Processes the model was split across; the bytes are one process's (rank 0's)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": self.weights,
            "layers": self.config.num_hidden_layers,
            "changes": self.changes,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "context": self.context,
            "prompt_tokens": self.prompt_tokens,
            "decode_steps": self.decode_steps,
            "rows": [
                {
                    "scheme": r.scheme,
                    "predicted_bytes": r.predicted_bytes,
                    "measured_bytes": r.measured_bytes,
                    "matches": r.matches,
                    "decode_step_seconds": r.decode_step_seconds,
                }
                for r in self.rows
            ],
            "logit_difference": self.logit_difference,
            "ranks": self.ranks,
        }


def measurement_config(config: ModelConfig, layers: int | None = None) -> tuple[ModelConfig, list[str]]:
    """The config a random model is built from: ``layers`` of the model's layers (default: all of a small model,
    else 2) with their real attention widths; vocabulary and FFNs shrink when the model would still be too large
    for a quick run on this machine. Returns the config and the changes, in words."""
    changes: list[str] = []
    if layers is None:
        layers = config.num_hidden_layers if count_params(config).total <= MAX_RANDOM_PARAMS else _DEFAULT_LAYERS
    if layers < config.num_hidden_layers:
        changes.append(f"{layers} of {config.num_hidden_layers} layers")
        config = config.replace(num_hidden_layers=layers, first_k_dense_replace=min(config.first_k_dense_replace, layers))
    if count_params(config).total > MAX_RANDOM_PARAMS:
        vocab = min(config.vocab_size, _SMALL_VOCAB)
        ffn = min(config.intermediate_size, _SMALL_FFN)
        changes.append(f"vocabulary {config.vocab_size} -> {vocab}; every FFN a dense MLP of {ffn} (attention widths unchanged)")
        config = config.replace(vocab_size=vocab, intermediate_size=ffn, n_routed_experts=None, n_shared_experts=None)
    return config, changes


def random_model(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> DeepseekV2:
    """Random weights assigned to a meta-built model, the way the loader assigns a checkpoint (router in float32)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in native_shapes(config).items():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            state[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith(".mlp.gate.weight"):
            state[name] = torch.randn(shape, generator=generator)  # spread router logits: top-k without ties
        else:
            state[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = build_empty(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def measure_cache(
    config: ModelConfig,
    name: str,
    batch_size: int,
    context: int,
    decode_steps: int,
    dtype: str,
    layers: int | None = None,
    checkpoint: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
    load: Callable[..., DeepseekV2] = load_checkpoint,
    prepare: Callable[[DeepseekV2], DeepseekV2] | None = None,
) -> CacheMeasurement:
    """Run prefill + decode with both caches and compare their bytes with the prediction for the measured shape.

    ``load(path, dtype, working=bytes)`` reads a checkpoint after checking that it fits with the
    measurement's caches beside it, and ``prepare`` transforms the random model (a multi-process run passes
    its sharded loader and ``parallelize``). When the model holds only a share of the heads, the expanded cache
    holds that share too and its prediction is scaled to it; the latent cache is whole on every process.
    """
    if dtype not in DTYPES:
        raise InputError(
            f"`measure` runs the cache in {', '.join(DTYPES)}, not {dtype}", hint="pass `dtype=bfloat16` (or float32)"
        )
    for field, value in (("measure_batch", batch_size), ("measure_layers", layers or 1), ("decode_steps", decode_steps)):
        if value <= 0:
            raise InputError(f"`{field}` must be positive, not {value}")
    if context <= decode_steps:
        raise InputError(f"`measure_context` ({context}) must be larger than `decode_steps` ({decode_steps})")
    stage = on_stage or (lambda _: None)
    torch_dtype = DTYPES[dtype]
    if checkpoint is not None:
        stage(f"loading {checkpoint}")
        working = _working(config, name, torch_dtype, batch_size, context)  # the loader checks it beside the weights
        model, changes, weights = load(checkpoint, torch_dtype, working=working), [], "checkpoint"
    else:
        measured_config, changes = measurement_config(config, layers)
        random_weights = load_need(native_weights(measured_config, None, torch_dtype), torch_dtype).total
        working = _working(measured_config, name, torch_dtype, batch_size, context)
        require(
            MemoryNeed(random_weights, 0, working),
            f"`measure` on a random {name} ({'; '.join(changes) or 'full size'})",
            "measure fewer layers (`measure_layers`), a shorter `measure_context` or a smaller `measure_batch`",
        )
        stage(f"building a random model ({'; '.join(changes) or 'full size'})")
        model, weights = random_model(measured_config, torch_dtype), "random"
        if prepare is not None:
            model = prepare(model)
    config = model.config
    heads = model.layers[0].self_attn.num_heads  # this process's heads
    prompt_len = context - decode_steps
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch_size, context), generator=generator)
    shape = AttentionShape.from_config(config, name)
    prec = Precision(dtype, torch.finfo(torch_dtype).bits)
    device = model.embed_tokens.weight.device

    def latent_run(capacity: int) -> tuple[Step, Any]:
        cache = model.new_cache(batch_size, capacity, dtype=torch_dtype)
        return (lambda t: model(t, cache=cache, last_only=True)), cache

    def expanded_run(capacity: int) -> tuple[Step, Any]:
        cache = ExpandedKVCache(config, batch_size, capacity, torch_dtype, device, heads)
        return (lambda t: expanded_forward(model, t, cache)), cache

    rows: list[MeasuredCache] = []
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for scheme, run in (("mla", latent_run), ("mla-expanded", expanded_run)):
            stage(f"{scheme}: prefill of {prompt_len} tokens, {decode_steps} decode steps")
            warm_step, _ = run(4)  # first calls pay one-time kernel set-up; keep it out of the timings
            _decode(warm_step, tokens[:, :4], min(2, context - 1))
            step, cache = run(context)
            logits[scheme], seconds = _decode(step, tokens, prompt_len)
            measured = cache.entries.untyped_storage().nbytes() if scheme == "mla" else cache.nbytes()
            predicted = cache_row(Scheme(scheme), shape, prec).bytes_for(batch_size, context)
            if scheme == "mla-expanded":
                predicted = predicted * heads // config.num_attention_heads
            rows.append(MeasuredCache(scheme, int(predicted), measured, seconds))
    reference = logits["mla"].float()
    difference = ((reference - logits["mla-expanded"].float()).abs().max() / reference.abs().max()).item()
    return CacheMeasurement(
        model=name,
        weights=weights,
        config=config,
        changes=changes,
        dtype=dtype,
        batch_size=batch_size,
        context=context,
        prompt_tokens=prompt_len,
        decode_steps=decode_steps,
        rows=rows,
        logit_difference=difference,
    )


def _working(config: ModelConfig, name: str, dtype: torch.dtype, batch_size: int, context: int) -> int:
    """Both caches of a measurement (the expanded one as predicted) and one forward's working memory."""
    prec = Precision(str(dtype).removeprefix("torch."), torch.finfo(dtype).bits)
    expanded = cache_row(Scheme("mla-expanded"), AttentionShape.from_config(config, name), prec).bytes_for(batch_size, context)
    return int(expanded) + working_bytes(config, dtype, batch_size, context, context)


def _decode(step: Step, tokens: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, float]:
    """Prefill ``tokens[:, :prompt_len]``, then feed the rest one at a time; return the last logits and the median step time."""
    step(tokens[:, :prompt_len])
    logits, times = tokens.new_empty(0), []
    for i in range(prompt_len, tokens.shape[1]):
        start = time.perf_counter()
        logits = step(tokens[:, i : i + 1])
        times.append(time.perf_counter() - start)
    return logits, statistics.median(times)
