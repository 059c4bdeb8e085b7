"""Parameter counts from a config alone (no weights): the checkpoint's tensor table is the single source."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv2cli.checkpoint.hf_keys import attention_shapes
from dsv2cli.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    """Used for one token: embedding matrix, attention, norms, dense MLPs, routers, shared experts,
    the top-k routed experts of every MoE layer and the output head (the spec §2.2 convention)."""
    embedding: int
    routed_experts: int

    @property
    def active_without_embedding(self) -> int:
        return self.active - self.embedding


def count_params(config: ModelConfig) -> ParamCounts:
    """Total and activated parameters: for DeepSeek-V2, 235,741,434,880 and 21,375,800,320.

    Computed per kind of layer (one attention block, one dense MLP, one MoE layer) and multiplied,
    so it answers at once for any config; it agrees with summing :func:`hf_tensor_shapes`.
    """
    d = config.hidden_size
    attention = sum(math.prod(s) for s in attention_shapes(config, "").values()) + 2 * d  # + both RMSNorms
    experts = config.n_routed_experts or 0
    per_expert = 3 * d * config.moe_intermediate_size
    moe_layers = sum(1 for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    dense_layers = config.num_hidden_layers - moe_layers
    moe = experts * d + experts * per_expert + 3 * d * config.shared_intermediate_size  # router, routed, shared
    embedding = config.vocab_size * d
    head = 0 if config.tie_word_embeddings else embedding
    total = embedding + config.num_hidden_layers * attention + dense_layers * 3 * d * config.intermediate_size
    total += moe_layers * moe + d + head
    routed = moe_layers * experts * per_expert
    inactive = moe_layers * (experts - config.num_experts_per_tok) * per_expert
    return ParamCounts(total=total, active=total - inactive, embedding=embedding, routed_experts=routed)
