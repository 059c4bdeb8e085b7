"""Model configuration: one dataclass, built from a Hugging Face ``config.json`` by an explicit mapping.

Both spellings of the rotary settings are accepted: the original DeepSeek one
(``rope_theta`` plus ``rope_scaling: {"type": "yarn", ...}``) and the transformers-5
one (``rope_parameters: {"rope_type": "yarn", "rope_theta": ..., ...}``).
Every key of ``config.json`` is either mapped to a field, listed in
:data:`IGNORED_HF_KEYS` with the reason it does not matter, or kept verbatim in
``ModelConfig.extra`` (and written back by :meth:`ModelConfig.to_hf`).

One file although it is long: the fields, the mapping from and to ``config.json`` and the checks all
name the same fields, and the mapping is meant to be read beside them (a split would be a cycle, as
``ModelConfig.from_hf`` calls the mapping).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv2cli.errors import ConfigError
from dsv2cli.untrusted import read_json

TOPK_METHODS = ("greedy", "group_limited_greedy")

# Keys that carry no information this toolkit needs, with the reason.
IGNORED_HF_KEYS: dict[str, str] = {
    "architectures": "always DeepseekV2ForCausalLM for this family",
    "auto_map": "points at remote code; dsv2 has its own",
    "model_type": "checked, not stored",
    "transformers_version": "version of the writer",
    "use_cache": "generation always uses dsv2's latent cache",
    "initializer_range": "only used when training from scratch (dsv2 train has its own init option)",
    "pretraining_tp": "always 1 for released checkpoints",
    "attention_dropout": "inference only; always 0.0 in released checkpoints",
    "ep_size": "expert-parallel size of DeepSeek's training setup",
    "output_router_logits": "transformers output switch",
    "head_dim": "transformers-5 alias of qk_rope_head_dim",
    "qk_head_dim": "derived: qk_nope_head_dim + qk_rope_head_dim",
    "_name_or_path": "writer bookkeeping",
    "mlp_bias": "checked: must be false",
    "attention_bias": "checked: must be false",
    "hidden_act": "checked: must be silu",
    "scoring_func": "checked: must be softmax",
}


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (spec §3.4, §3.6)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2-family model (field names follow the HF config)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 4096
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    # Derived quantities -------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return (self.n_routed_experts or 0) // self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``i`` is MoE iff experts exist, ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``."""
        return (
            self.n_routed_experts is not None
            and self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def shared_intermediate_size(self) -> int:
        """Shared experts form one MLP of ``moe_intermediate_size * n_shared_experts`` (spec §4.3)."""
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    @property
    def kv_cache_elements_per_token_per_layer(self) -> int:
        """MLA caches the normalised latent and the rotated rope key: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``m**2`` with ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` under YaRN (§3.4)."""
        scale = self.qk_head_dim**-0.5
        yarn = self.rope_scaling
        if yarn is not None and yarn.mscale_all_dim:
            m = yarn_mscale(yarn.factor, yarn.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, list):
            return list(self.eos_token_id)
        return [self.eos_token_id]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # HF conversion ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json`` (either rope spelling)."""
        return _from_hf(hf)

    def to_hf(self, spelling: str = "deepseek") -> dict[str, Any]:
        """HF ``config.json`` contents in the original DeepSeek spelling or ``"transformers5"``."""
        return _to_hf(self, spelling)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1.0 when ``factor <= 1``)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _require(key: str, hf: dict[str, Any]) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json has no '{key}'", hint="is this a DeepSeek-V2-family config.json?")
    return hf[key]


def _check(ok: bool, field_name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"unsupported config value {field_name}={value!r}: {why}")


def _parse_rope(hf: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """Return ``(rope_theta, yarn)`` from either spelling."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"config.json: field 'rope_parameters' must be an object, not {_short(params)}")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = _field(params, "rope_theta", _float, "rope_parameters.")
        kind = params.get("rope_type", params.get("type", "default"))
        scaling: dict[str, Any] | None = params if kind != "default" else None
        where = "rope_parameters."
    else:
        theta = _field(hf, "rope_theta", _float, default=10000.0)
        scaling = hf.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"config.json: field 'rope_scaling' must be an object or null, not {_short(scaling)}")
        kind = (scaling or {}).get("type", (scaling or {}).get("rope_type", "default")) if scaling else "default"
        if kind == "default":
            scaling = None
        where = "rope_scaling."
    _check(theta > 0, "rope_theta", theta, "must be positive")
    if scaling is None:
        return theta, None
    _check(kind == "yarn", "rope_scaling.type", kind, "only 'yarn' rotary scaling is used by DeepSeek-V2")
    if "factor" not in scaling:
        raise ConfigError("rope_scaling of type 'yarn' has no 'factor'")
    if scaling.get("original_max_position_embeddings") is None:
        raise ConfigError("rope_scaling of type 'yarn' has no 'original_max_position_embeddings'")
    yarn = YarnScaling(
        factor=_field(scaling, "factor", _float, where),
        original_max_position_embeddings=_field(scaling, "original_max_position_embeddings", _int, where),
        beta_fast=_field(scaling, "beta_fast", _float, where, 32.0),
        beta_slow=_field(scaling, "beta_slow", _float, where, 1.0),
        mscale=_field(scaling, "mscale", _float, where, None),
        mscale_all_dim=_field(scaling, "mscale_all_dim", _float, where, None),
        attention_factor=_field(scaling, "attention_factor", _float, where, None),
    )
    return theta, yarn


def _field(data: dict[str, Any], key: str, convert: Any, where: str = "", default: Any = ...) -> Any:
    """``convert(data[key])`` (``default`` when absent, null or 0 for the betas as HF writes them), or a ConfigError naming it."""
    value = data.get(key)
    if value is None or (value == 0 and key.startswith("beta_") and default is not ...):
        if default is ...:
            raise ConfigError(f"config.json has no '{where}{key}'")
        return default
    try:
        return convert(value)
    except TypeError as exc:
        raise ConfigError(f"config.json: field '{where}{key}' must be {exc}, not {_short(value)}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ROPE_KEYS = {"rope_theta", "rope_scaling", "rope_parameters"}


# HF key -> (field name, converter). Rope keys are handled by _parse_rope.
def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError("a finite number")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


_HF_FIELDS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", _int),
    "hidden_size": ("hidden_size", _int),
    "num_hidden_layers": ("num_hidden_layers", _int),
    "num_attention_heads": ("num_attention_heads", _int),
    "num_key_value_heads": ("num_key_value_heads", _int),
    "q_lora_rank": ("q_lora_rank", _int),
    "kv_lora_rank": ("kv_lora_rank", _int),
    "qk_nope_head_dim": ("qk_nope_head_dim", _int),
    "qk_rope_head_dim": ("qk_rope_head_dim", _int),
    "v_head_dim": ("v_head_dim", _int),
    "intermediate_size": ("intermediate_size", _int),
    "moe_intermediate_size": ("moe_intermediate_size", _int),
    "n_routed_experts": ("n_routed_experts", _int),
    "n_shared_experts": ("n_shared_experts", _int),
    "num_experts_per_tok": ("num_experts_per_tok", _int),
    "first_k_dense_replace": ("first_k_dense_replace", _int),
    "moe_layer_freq": ("moe_layer_freq", _int),
    "topk_method": ("topk_method", _str),
    "n_group": ("n_group", _int),
    "topk_group": ("topk_group", _int),
    "routed_scaling_factor": ("routed_scaling_factor", _float),
    "norm_topk_prob": ("norm_topk_prob", _bool),
    "rms_norm_eps": ("rms_norm_eps", _float),
    "max_position_embeddings": ("max_position_embeddings", _int),
    "tie_word_embeddings": ("tie_word_embeddings", _bool),
    "bos_token_id": ("bos_token_id", _int),
    "eos_token_id": ("eos_token_id", lambda v: [_int(x) for x in v] if isinstance(v, list) else _int(v)),
    "pad_token_id": ("pad_token_id", _int),
    "aux_loss_alpha": ("aux_loss_alpha", _float),
    "seq_aux": ("seq_aux", _bool),
    "torch_dtype": ("torch_dtype", _str),
    "dtype": ("torch_dtype", _str),
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
)


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError("config.json does not hold a JSON object")
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in ("deepseek_v2", "deepseek"):
        raise ConfigError(
            f"unsupported config value model_type={model_type!r}: dsv2 runs DeepSeek-V2-family models (deepseek_v2)",
            hint="DeepSeek-V3 (deepseek_v3) and other architectures are not supported",
        )
    for key in _REQUIRED:
        _require(key, hf)
    _check(
        hf.get("scoring_func", "softmax") == "softmax", "scoring_func", hf.get("scoring_func"), "DeepSeek-V2 routes with softmax"
    )
    _check(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "DeepSeek-V2 uses silu")
    _check(not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"), "DeepSeek-V2 has no biases")
    _check(not hf.get("mlp_bias", False), "mlp_bias", hf.get("mlp_bias"), "DeepSeek-V2 has no biases")

    kwargs: dict[str, Any] = {}
    for key, (name, convert) in _HF_FIELDS.items():
        value = hf.get(key)
        if value is None:
            continue
        try:
            kwargs[name] = convert(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config.json: field '{key}' must be {exc}, not {_short(value)}") from None
    if kwargs.get("topk_method") == "gready":  # spelling of the early remote code (spec §1.2)
        kwargs["topk_method"] = "greedy"
    if hf.get("n_group") is None:
        kwargs["n_group"] = 1
    if hf.get("topk_group") is None:
        kwargs["topk_group"] = 1
    kwargs["rope_theta"], kwargs["rope_scaling"] = _parse_rope(hf)
    if "head_dim" in hf and hf["head_dim"] not in (None, kwargs["qk_rope_head_dim"]):
        raise ConfigError(f"config value head_dim={hf['head_dim']!r} differs from qk_rope_head_dim={kwargs['qk_rope_head_dim']}")
    known = set(_HF_FIELDS) | _ROPE_KEYS | set(IGNORED_HF_KEYS)
    kwargs["extra"] = {k: v for k, v in hf.items() if k not in known}
    try:
        return ModelConfig(**kwargs)
    except TypeError as exc:  # pragma: no cover - all kwargs come from _HF_FIELDS
        raise ConfigError(str(exc)) from exc


# Upper bounds far above any released model (DeepSeek-V2: 60 layers, 160 experts, 102,400 tokens, width 5120);
# beyond them a config is a mistake or an attack, and would only grind before failing on memory.
_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "num_hidden_layers": 256,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "kv_lora_rank": 1 << 16,
    "q_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12,
    "qk_rope_head_dim": 1 << 12,
    "v_head_dim": 1 << 12,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 18,
    "n_routed_experts": 1024,
    "n_shared_experts": 256,
    "max_position_embeddings": 1 << 24,
    "first_k_dense_replace": 1 << 20,
    "moe_layer_freq": 1 << 20,
    "n_group": 4096,
    "topk_group": 4096,
    "num_experts_per_tok": 4096,
}


def _validate(c: ModelConfig) -> None:
    for name in _REQUIRED:
        value = getattr(c, name)
        _check(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
    for name, limit in _LIMITS.items():
        value = getattr(c, name)
        _check(value is None or value <= limit, name, value, f"larger than dsv2 supports (at most {limit:,})")
    for name in ("n_routed_experts", "n_shared_experts", "bos_token_id", "pad_token_id", "eos_token_id"):
        values = getattr(c, name)
        for value in values if isinstance(values, list) else [values]:
            _check(value is None or value >= 0, name, value, "must not be negative")
    _check(
        c.num_key_value_heads is None or c.num_key_value_heads > 0,
        "num_key_value_heads",
        c.num_key_value_heads,
        "must be positive",
    )
    _check(c.max_position_embeddings >= 1, "max_position_embeddings", c.max_position_embeddings, "must be positive")
    _check(c.moe_intermediate_size >= 0, "moe_intermediate_size", c.moe_intermediate_size, "must not be negative")
    for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
        value = getattr(c, name)
        _check(math.isfinite(value) and value > 0, name, value, "must be a positive finite number")
    _check(math.isfinite(c.aux_loss_alpha) and c.aux_loss_alpha >= 0, "aux_loss_alpha", c.aux_loss_alpha, "must not be negative")
    _check(c.q_lora_rank is None or c.q_lora_rank > 0, "q_lora_rank", c.q_lora_rank, "must be positive or null")
    _check(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", c.qk_rope_head_dim, "rotary pairs need an even size")
    _check(
        c.topk_method in TOPK_METHODS, "topk_method", c.topk_method, f"expected one of {', '.join(TOPK_METHODS)} (or 'gready')"
    )
    _check(c.moe_layer_freq >= 1, "moe_layer_freq", c.moe_layer_freq, "must be at least 1")
    _check(c.first_k_dense_replace >= 0, "first_k_dense_replace", c.first_k_dense_replace, "must not be negative")
    if c.n_routed_experts:
        e = c.n_routed_experts
        _check(c.moe_intermediate_size > 0, "moe_intermediate_size", c.moe_intermediate_size, "MoE layers need it")
        _check(
            1 <= c.num_experts_per_tok <= e,
            "num_experts_per_tok",
            c.num_experts_per_tok,
            f"must be between 1 and n_routed_experts={e}",
        )
        _check(c.n_group >= 1 and e % c.n_group == 0, "n_group", c.n_group, f"n_routed_experts={e} must be divisible by it")
        _check(1 <= c.topk_group <= c.n_group, "topk_group", c.topk_group, f"must be between 1 and n_group={c.n_group}")
        if c.topk_method == "group_limited_greedy":
            reachable = c.topk_group * (e // c.n_group)
            _check(
                c.num_experts_per_tok <= reachable,
                "num_experts_per_tok",
                c.num_experts_per_tok,
                f"only {reachable} experts are reachable in {c.topk_group} groups",
            )
    if c.rope_scaling is not None:
        y = c.rope_scaling
        _check(math.isfinite(y.factor) and y.factor > 0, "rope_scaling.factor", y.factor, "must be positive")
        _check(
            1 <= y.original_max_position_embeddings <= 1 << 24,
            "rope_scaling.original_max_position_embeddings",
            y.original_max_position_embeddings,
            "must be a positive integer",
        )
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            value = getattr(y, name)
            _check(value is None or math.isfinite(value), f"rope_scaling.{name}", value, "must be finite")


def _to_hf(c: ModelConfig, spelling: str) -> dict[str, Any]:
    if spelling not in ("deepseek", "transformers5"):
        raise ValueError(f"unknown spelling {spelling!r}")
    out: dict[str, Any] = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"}
    for key, (name, _) in _HF_FIELDS.items():
        if key == "dtype":
            continue
        value = getattr(c, name)
        if value is not None:
            out[key] = value
    out["num_key_value_heads"] = c.num_key_value_heads or c.num_attention_heads
    out["q_lora_rank"] = c.q_lora_rank
    out["n_routed_experts"] = c.n_routed_experts
    out["n_shared_experts"] = c.n_shared_experts
    out["hidden_act"] = "silu"
    out["scoring_func"] = "softmax"
    out["attention_bias"] = False
    yarn = c.rope_scaling
    if spelling == "deepseek":
        out["rope_theta"] = c.rope_theta
        out["rope_scaling"] = None if yarn is None else {"type": "yarn", **_yarn_dict(yarn)}
    else:
        params: dict[str, Any] = {"rope_type": "default" if yarn is None else "yarn", "rope_theta": c.rope_theta}
        if yarn is not None:
            params.update(_yarn_dict(yarn))
        out["rope_parameters"] = params
    out.update(c.extra)
    return out


def _yarn_dict(y: YarnScaling) -> dict[str, Any]:
    d: dict[str, Any] = {
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
    }
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        if getattr(y, key) is not None:
            d[key] = getattr(y, key)
    return d


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no config.json at {path}", hint="pass a checkpoint directory or a preset name (see `dsv2 info --help`)"
        )
    return ModelConfig.from_hf(read_json(path, ConfigError, max_bytes=1 << 20))
