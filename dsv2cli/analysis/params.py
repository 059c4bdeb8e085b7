"""Parameter counts from a config alone (no weights): the checkpoint's tensor table is the single source."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv2cli.checkpoint.hf_keys import hf_tensor_shapes
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
    """Total and activated parameters: for DeepSeek-V2, 235,741,434,880 and 21,375,800,320."""
    shapes = hf_tensor_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = len(config.moe_layer_indices)
    routed = moe_layers * (config.n_routed_experts or 0) * per_expert
    inactive = moe_layers * ((config.n_routed_experts or 0) - config.num_experts_per_tok) * per_expert
    embedding = config.vocab_size * config.hidden_size
    return ParamCounts(total=total, active=total - inactive, embedding=embedding, routed_experts=routed)
