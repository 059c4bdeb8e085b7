"""What `dsv2 info` reports about a model: a config summary with counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsv2cli.analysis.params import ParamCounts, count_params
from dsv2cli.config import ModelConfig


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    config: ModelConfig
    params: ParamCounts

    @property
    def moe_layers(self) -> list[int]:
        return self.config.moe_layer_indices

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.config.num_hidden_layers) if not self.config.is_moe_layer(i)]

    @property
    def kv_cache_elements_per_token(self) -> int:
        return self.config.kv_cache_elements_per_token_per_layer * self.config.num_hidden_layers

    def to_json(self) -> dict[str, Any]:
        elements = self.kv_cache_elements_per_token
        return {
            "model": self.name,
            "source": self.source,
            "total_params": self.params.total,
            "active_params": self.params.active,
            "active_params_without_embedding": self.params.active_without_embedding,
            "routed_expert_params": self.params.routed_experts,
            "kv_cache_elements_per_token": elements,
            "kv_cache_elements_per_token_per_layer": self.config.kv_cache_elements_per_token_per_layer,
            "kv_cache_bytes_per_token": {"bfloat16": elements * 2, "float32": elements * 4},
            "dense_layers": self.dense_layers,
            "moe_layers": self.moe_layers,
            "config": self.config.to_hf(),
        }


def describe_model(config: ModelConfig, name: str, source: str) -> ModelInfo:
    return ModelInfo(name=name, source=source, config=config, params=count_params(config))
