"""Built-in configurations (architecture only, no weights).

Values are the released HF ``config.json`` files (spec §1.1, §1.2). The ``tiny-*``
presets are small shapes for tests and demos; ``bench-300m`` is the benchmark
shape of ``benchmarks/``.
"""

from __future__ import annotations

from typing import Any

from dsv2cli.config import ModelConfig
from dsv2cli.errors import ConfigError

_V2_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

_V2_COMMON: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "rope_theta": 10000,
    "rope_scaling": _V2_YARN,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

_V2_236B: dict[str, Any] = {
    **_V2_COMMON,
    "hidden_size": 5120,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "n_routed_experts": 160,
    "topk_method": "group_limited_greedy",
    "n_group": 8,
    "topk_group": 3,
    "routed_scaling_factor": 16.0,
}

_V2_LITE: dict[str, Any] = {
    **_V2_COMMON,
    "hidden_size": 2048,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 64,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
}

_TINY: dict[str, Any] = {
    **_V2_COMMON,
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.0,
    "rope_scaling": {**_V2_YARN, "factor": 4, "original_max_position_embeddings": 32},
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}

_BENCH_300M: dict[str, Any] = {
    **_V2_COMMON,
    "vocab_size": 32000,
    "hidden_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 384,
    "intermediate_size": 2816,
    "moe_intermediate_size": 352,
    "n_routed_experts": 64,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 16384,
    "rope_scaling": {**_V2_YARN, "factor": 4, "original_max_position_embeddings": 4096},
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v2": _V2_236B,
    "deepseek-v2-chat": _V2_236B,
    "deepseek-v2.5": {**_V2_236B, "rope_scaling": {**_V2_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "deepseek-v2-lite": _V2_LITE,
    "deepseek-v2-lite-chat": _V2_LITE,
    "tiny": _TINY,
    "tiny-lite": {
        **_TINY,
        "q_lora_rank": None,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
    },
    "bench-300m": _BENCH_300M,
}


# Baselines for cache comparisons (``cache-report --baseline``): models with plain (grouped-query) attention,
# as the Llama-style ``config.json`` fields a cache size depends on; not DeepSeek-V2 models, so not in PRESETS.
# DeepSeek 67B: DeepSeek LLM report and its HF config (spec §10).
BASELINE_PRESETS: dict[str, dict[str, int]] = {
    "deepseek-67b": {"num_hidden_layers": 95, "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_hf_config(name: str) -> dict[str, Any]:
    """The HF ``config.json`` contents of a preset (a fresh copy)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'", hint=f"known presets: {', '.join(PRESETS)}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[key].items()}


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf(preset_hf_config(name))
