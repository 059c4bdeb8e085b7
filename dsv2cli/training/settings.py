"""What defines a training run: its settings (stored in the checkpoint, so a resume repeats them exactly),
their checks, the model config they build, the learning-rate schedule and the memory check before any work."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv2cli.analysis.params import count_params
from dsv2cli.checkpoint.fit import gb
from dsv2cli.checkpoint.machine import available_memory
from dsv2cli.config import ModelConfig
from dsv2cli.errors import CheckpointError, InputError
from dsv2cli.model.dtypes import parse_dtype
from dsv2cli.presets import preset_hf_config
from dsv2cli.training.routing import BalanceSettings
from dsv2cli.untrusted import is_int, is_number


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a run; stored in the checkpoint so ``--resume`` repeats it exactly."""

    inputs: list[str]
    output: str
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config.json fields on top of the preset
    vocab_size: int = 4096
    tokenizer: str | None = None  # reuse this tokenizer instead of training one
    init_from: str | None = None  # start from this trained model's weights, architecture and tokenizer
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    held_out: float = 0.05
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 1000
    max_time: float | None = None  # seconds of this invocation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"
    save_dtype: str | None = None  # dtype of the exported model.safetensors (default: dtype)
    init_std: float = 0.02
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 32768
    save_every: int = 200
    balance: BalanceSettings = field(default_factory=BalanceSettings)
    protect_fraction: float = 0.1
    drop_at_eval: bool = False
    command: str | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as an interruption would

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "settings") -> TrainSettings:
        """Settings saved by :meth:`to_json`, every field's type checked (a saved state is untrusted input)."""
        values = typed_fields(cls, data, where)
        values["balance"] = BalanceSettings(**typed_fields(BalanceSettings, data.get("balance", {}), f"{where}.balance"))
        return cls(**values)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": is_int,
    "float": is_number,
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}


def typed_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data``'s fields for the dataclass ``cls``, each checked against the field's annotation."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be an object")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise CheckpointError(f"{where}: unknown field '{key}'")
        kind = str(known[key].type)
        if kind == "BalanceSettings":
            continue
        optional = kind.endswith(" | None")
        if not ((optional and value is None) or _CHECKS[kind.removesuffix(" | None")](value)):
            raise CheckpointError(f"{where}: field '{key}' must be of type {kind}, not {json.dumps(value)[:40]}")
        values[key] = value
    missing = [
        f.name
        for f in known.values()
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CheckpointError(f"{where}: missing field '{missing[0]}'")
    return values


def build_config(
    settings: TrainSettings, vocab_size: int, bos_id: int | None, eos_id: int | None, base: dict[str, Any] | None = None
) -> ModelConfig:
    """Preset (or ``base``, the config.json of ``init_from``) + overrides + tokenizer ids + device-limited routing
    (``group_limited_greedy`` with D groups, M kept)."""
    hf = dict(base) if base is not None else preset_hf_config(settings.preset)
    hf.update(settings.overrides)
    hf.update(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id)
    hf["max_position_embeddings"] = max(int(hf.get("max_position_embeddings") or 0), settings.seq_len)
    b = settings.balance
    if b.devices > 1:
        hf.update(topk_method="group_limited_greedy", n_group=b.devices, topk_group=b.max_devices_per_token)
    hf.update(aux_loss_alpha=b.expert_alpha, seq_aux=b.per_sequence)  # what the HF remote code would train with
    hf["torch_dtype"] = settings.save_dtype or settings.dtype
    return ModelConfig.from_hf(hf)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    s = settings
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    floor = s.lr * s.min_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def validate(settings: TrainSettings) -> None:
    s, b = settings, settings.balance
    checks = [
        (s.seq_len >= 2, "`seq_len` must be at least 2"),
        (s.batch_size >= 1, "`batch_size` must be at least 1"),
        (s.max_steps >= 1, "`max_steps` must be at least 1"),
        (s.max_time is None or s.max_time > 0, "`max_time` must be positive"),
        (s.lr > 0, "`lr` must be positive"),
        (0 <= s.min_lr_ratio <= 1, "`min_lr_ratio` must be between 0 and 1"),
        (s.warmup_steps >= 0, "`warmup_steps` must not be negative"),
        (s.grad_clip >= 0, "`grad_clip` must not be negative (0 turns clipping off)"),
        (s.eval_every >= 1 and s.save_every >= 1 and s.log_every >= 1, "`eval_every`, `save_every`, `log_every` must be >= 1"),
        (s.eval_tokens >= s.seq_len, "`eval_tokens` must be at least `seq_len`"),
        (min(b.expert_alpha, b.device_alpha, b.comm_alpha) >= 0, "balance loss weights must not be negative"),
        (b.devices >= 1, "`devices` must be at least 1"),
        (1 <= b.max_devices_per_token <= b.devices, "`max_devices_per_token` must be between 1 and `devices`"),
        (b.capacity_factor is None or b.capacity_factor > 0, "`capacity_factor` must be positive"),
        (0 <= s.protect_fraction <= 1, "`protect_fraction` must be between 0 and 1"),
    ]
    floats = {"`lr`": s.lr, "`min_lr_ratio`": s.min_lr_ratio, "`weight_decay`": s.weight_decay, "`grad_clip`": s.grad_clip}
    floats |= {"`init_std`": s.init_std, "`held_out`": s.held_out, "`protect_fraction`": s.protect_fraction}
    floats |= {"beta1": s.beta1, "beta2": s.beta2, "`expert_alpha`": b.expert_alpha, "`device_alpha`": b.device_alpha}
    floats |= {"`comm_alpha`": b.comm_alpha, "`capacity_factor`": b.capacity_factor or 1.0, "`max_time`": s.max_time or 1.0}
    for flag, value in floats.items():
        if not math.isfinite(value):
            raise InputError(f"{flag} must be a finite number, got {value}")
    checks += [
        (s.weight_decay >= 0, "`weight_decay` must not be negative"),
        (s.init_std > 0, "`init_std` must be positive"),
        (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
        (0 <= s.seed < 1 << 63, "`seed` must be between 0 and 2**63 - 1"),
        (
            s.max_steps < 1 << 40 and s.seq_len <= 1 << 20 and s.batch_size <= 1 << 20,
            "`max_steps`, `seq_len` or `batch_size` is absurdly large",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    parse_dtype(s.dtype)
    if s.save_dtype:
        parse_dtype(s.save_dtype)


def check_memory(config: ModelConfig, settings: TrainSettings) -> None:
    """Refuse a run whose weights, gradients, AdamW moments and activations exceed the memory that can be allocated."""
    itemsize = parse_dtype(settings.dtype).itemsize
    need = count_params(config).total * (2 * itemsize + 8)  # weights + gradients in dtype, two float32 moments
    # A rough floor for what backward keeps per token: block inputs, norms, attention and MLP activations,
    # and the float32 logits with their softmax.
    tokens = settings.batch_size * settings.seq_len
    mlp = max(
        config.intermediate_size, config.moe_intermediate_size * (config.num_experts_per_tok + (config.n_shared_experts or 0))
    )
    heads = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    per_layer = 8 * config.hidden_size + 3 * mlp + 3 * heads
    need += tokens * (config.num_hidden_layers * per_layer * itemsize + 3 * 4 * config.vocab_size)
    available = available_memory()
    if need > available.bytes:
        raise InputError(
            f"training this model needs at least {gb(need)} (weights, gradients, AdamW moments and activations); {available.source} leaves {gb(available.bytes)}",
            hint="choose smaller sizes (`hidden_size`, `layers`, `experts`, `vocab_size`) or a smaller `batch_size` / `seq_len`",
        )
