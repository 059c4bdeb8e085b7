"""What `dsv2 info` reports about a model: a config summary with counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dsv2cli.analysis.params import ParamCounts, count_params
from dsv2cli.checkpoint.files import DTYPE_SIZES
from dsv2cli.checkpoint.fit import native_weights
from dsv2cli.config import ModelConfig
from dsv2cli.errors import UnsupportedError

# The native copies whose decode reads `dsv2 info` reports: (name, quantization); int4 in its default groups of 32.
WEIGHT_FORMATS = (("bfloat16", None), ("int8", "int8"), ("int4", "int4"))


def decode_weight_bytes(config: ModelConfig, quantization: str | None) -> int | None:
    """Bytes of weights one decoded token reads from a bfloat16 native copy of ``config`` (int8 / int4 where quantized).

    Every tensor once, except the embedding (one row) and the routed experts (``num_experts_per_tok`` of
    ``n_routed_experts``, as if each token picked different ones). Decode on CPU is bound by these bytes.
    None where the config has no such copy (int4 groups of 32 need input dimensions that are multiples of 32).
    """
    try:
        tensors = native_weights(config, quantization).tensors
    except UnsupportedError:
        return None
    total = 0.0
    for name, (st_dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * DTYPE_SIZES[st_dtype]
        if name.startswith("embed_tokens."):
            nbytes //= config.vocab_size
        elif ".mlp.experts." in name:
            nbytes = nbytes * config.num_experts_per_tok / config.n_routed_experts
        total += nbytes
    return round(total)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    config: ModelConfig
    params: ParamCounts
    decode_bytes: dict[str, int] = field(default_factory=dict)  # weight bytes read per decoded token, per WEIGHT_FORMATS

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
            "weight_bytes_per_token": self.decode_bytes,
            "dense_layers": self.dense_layers,
            "moe_layers": self.moe_layers,
            "config": self.config.to_hf(),
        }


def describe_model(config: ModelConfig, name: str, source: str) -> ModelInfo:
    decode = {label: n for label, q in WEIGHT_FORMATS if (n := decode_weight_bytes(config, q)) is not None}
    return ModelInfo(name=name, source=source, config=config, params=count_params(config), decode_bytes=decode)
