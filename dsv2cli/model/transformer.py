"""The DeepSeek-V2 decoder: embedding, blocks of MLA + (dense MLP | DeepSeekMoE), final norm, head.

Shape legend: B batch, S new tokens, T attended slots, D hidden size, V vocabulary.
Module names follow the HF checkpoint without the ``model.`` prefix, except the routed
experts, which are stacked per layer (see ``dsv2cli/checkpoint/hf_keys.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dsv2cli.config import ModelConfig
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.cache import LatentKVCache, LayerKV
from dsv2cli.model.moe import MLP, MoE, RoutingHook
from dsv2cli.model.norm import RMSNorm
from dsv2cli.model.options import TORCH_ONLY, ForwardOptions, project
from dsv2cli.model.rope import RotaryEmbedding


class Block(nn.Module):
    """``h = x + Attn(norm(x)); out = h + FFN(norm(h))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MLP | MoE
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, layer_idx)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: LayerKV | None,
        attention: str,
        routing_hook: RoutingHook | None,
        options: ForwardOptions = TORCH_ONLY,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, attention, options)
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            ffn = self.mlp(normed, routing_hook, options.kernels)
        else:
            ffn = self.mlp(normed, options.kernels)
        return h + ffn


class DeepseekV2(nn.Module):
    """DeepSeek-V2 causal LM working on token ids."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        pad: torch.Tensor | list[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> LatentKVCache:
        """A latent cache for ``batch_size`` rows of ``capacity`` tokens on this model's device and dtype."""
        weight = self.embed_tokens.weight
        return LatentKVCache.for_model(self.config, batch_size, capacity, dtype or weight.dtype, weight.device, pad)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: LatentKVCache | None = None,
        attention: str = "absorbed",
        routing_hook: RoutingHook | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
        static_shapes: bool = False,
        blocks: Sequence[Callable[..., torch.Tensor]] | None = None,
        options: ForwardOptions = TORCH_ONLY,
    ) -> torch.Tensor:
        """tokens ``[B, S]`` -> logits ``[B, S, V]`` (``[B, 1, V]`` with ``last_only``).

        With a cache, the new tokens go after the cached ones and positions come from the
        cache (per row, after its left padding); without one, the tokens form whole causal
        sequences at positions ``0..S-1`` unless ``positions`` says otherwise.
        ``static_shapes``: the cache is read and written at tensor slots over its whole capacity
        (``dsv2cli/model/cache.py``), so that every decode step has the same shapes; the caller checks the
        cache's room and advances it. ``blocks``: callables with :meth:`Block.forward`'s arguments run in
        place of ``self.layers`` (their compiled versions: ``dsv2cli/inference/compiled.py``). ``options``: which of
        dsv2's C++ kernels the modules may use (``dsv2cli/model/options.py``; the default, none).
        """
        seq = tokens.shape[1]
        views: list[LayerKV | None] = [None] * len(self.layers)
        if cache is not None:
            views = list(cache.layer_views(seq, static_shapes))
            positions = cache.positions(seq, static_shapes)
            # None: causal (attention builds it)
            mask = cache.attention_mask(seq, static_shapes) if static_shapes or cache.has_padding else None
        else:
            if positions is None:
                positions = torch.arange(seq, device=tokens.device)[None].expand(tokens.shape[0], -1)
            mask = None
        cos, sin = self.rotary.cos_sin(positions)
        x = self.embed_tokens(tokens)
        for block, kv in zip(self.layers if blocks is None else blocks, views, strict=True):
            x = block(x, cos, sin, mask, kv, attention, routing_hook, options)
        if cache is not None and not static_shapes:
            cache.advance(seq)
        if last_only:
            x = x[:, -1:]
        return project(self.lm_head, self.norm(x), options.kernels)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack MLA's input projections and every MLP's gate/up projections of ``model`` in place (``fusion.py``); returns it."""
    for module in model.modules():
        if isinstance(module, (MultiHeadLatentAttention, MLP)):
            module.fuse_projections()
    return model
