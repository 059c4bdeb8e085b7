"""The one table between HF checkpoint names and dsv2 module names.

dsv2 names are the HF names without the ``model.`` prefix, except routed experts:
HF stores ``model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`` per expert;
dsv2 stacks them per layer as ``layers.{i}.mlp.experts.gate_up_proj [E, 2I, D]`` (gate rows
first, then up) and ``layers.{i}.mlp.experts.down_proj [E, D, I]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dsv2cli.config import ModelConfig

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# Router weights stay float32 whatever the model dtype (the reference keeps gate.weight in float32).
ROUTER_SUFFIX = ".mlp.gate.weight"

# Tensors some writers add that carry no weights (recomputed rotary tables).
IGNORABLE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ExpertSlice:
    """Where one HF expert tensor goes in the stacked dsv2 parameter."""

    native_name: str
    expert: int
    part: str  # "gate", "up" or "down"


def attention_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    d, h = config.hidden_size, config.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {}
    if config.q_lora_rank is None:
        shapes[f"{prefix}q_proj.weight"] = (h * config.qk_head_dim, d)
    else:
        shapes[f"{prefix}q_a_proj.weight"] = (config.q_lora_rank, d)
        shapes[f"{prefix}q_a_layernorm.weight"] = (config.q_lora_rank,)
        shapes[f"{prefix}q_b_proj.weight"] = (h * config.qk_head_dim, config.q_lora_rank)
    shapes[f"{prefix}kv_a_proj_with_mqa.weight"] = (config.kv_lora_rank + config.qk_rope_head_dim, d)
    shapes[f"{prefix}kv_a_layernorm.weight"] = (config.kv_lora_rank,)
    shapes[f"{prefix}kv_b_proj.weight"] = (h * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
    shapes[f"{prefix}o_proj.weight"] = (d, h * config.v_head_dim)
    return shapes


def mlp_shapes(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (intermediate, hidden),
        f"{prefix}up_proj.weight": (intermediate, hidden),
        f"{prefix}down_proj.weight": (hidden, intermediate),
    }


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint with its shape, in checkpoint order (spec §2.1)."""
    d = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[f"{p}input_layernorm.weight"] = (d,)
        shapes.update(attention_shapes(config, f"{p}self_attn."))
        shapes[f"{p}post_attention_layernorm.weight"] = (d,)
        if config.is_moe_layer(i):
            shapes[f"{p}mlp.gate.weight"] = (config.n_routed_experts or 0, d)
            for j in range(config.n_routed_experts or 0):
                shapes.update(mlp_shapes(f"{p}mlp.experts.{j}.", d, config.moe_intermediate_size))
            if config.shared_intermediate_size:
                shapes.update(mlp_shapes(f"{p}mlp.shared_experts.", d, config.shared_intermediate_size))
        else:
            shapes.update(mlp_shapes(f"{p}mlp.", d, config.intermediate_size))
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def native_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every dsv2 parameter with its shape (experts stacked)."""
    shapes: dict[str, tuple[int, ...]] = {}
    e, i, d = config.n_routed_experts or 0, config.moe_intermediate_size, config.hidden_size
    for name, shape in hf_tensor_shapes(config).items():
        expert = expert_slice(name)
        if expert is None:
            shapes[native_name(name)] = shape
        elif expert.part == "gate":
            layer = expert.native_name.rsplit(".", 1)[0]
            shapes[f"{layer}.gate_up_proj"] = (e, 2 * i, d)
            shapes[f"{layer}.down_proj"] = (e, d, i)
    return shapes


def runtime_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a loaded tensor gets: ``dtype``, except float32 for the router."""
    return torch.float32 if name.endswith(ROUTER_SUFFIX) else dtype


def native_name(hf_name: str) -> str:
    """Non-expert HF name -> dsv2 name."""
    return hf_name[len("model.") :] if hf_name.startswith("model.") else hf_name


def hf_name(native: str) -> str:
    """Non-expert dsv2 name -> HF name."""
    return native if native.startswith("lm_head.") else f"model.{native}"


def expert_slice(hf_tensor: str) -> ExpertSlice | None:
    """Where a per-expert HF tensor goes, or None for every other tensor."""
    m = _EXPERT.match(hf_tensor)
    if m is None:
        return None
    layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
    part = proj.removesuffix("_proj")
    stacked = "down_proj" if part == "down" else "gate_up_proj"
    return ExpertSlice(f"layers.{layer}.mlp.experts.{stacked}", expert, part)
