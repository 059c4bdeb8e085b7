"""KV-cache arithmetic: what MLA, MHA, GQA and MQA caches hold (paper Table 1; spec §3.3, §10, §11).

Elements per token per layer, with n_h heads, d_h the per-head dim (``qk_nope_head_dim`` for MLA,
the paper's d_h), G key/value groups, d_c = ``kv_lora_rank``, d_h^R = ``qk_rope_head_dim``, d_v = ``v_head_dim``:

* ``mla``           d_c + d_h^R                      latent + rotated rope key, what dsv2 caches (576 for V2)
* ``mla-expanded``  n_h · (d_h + d_h^R + d_v)        per-head K and V, what the original HF remote code caches
* ``mha``           2 · n_h · d_h
* ``gqa:G``         2 · G · d_h
* ``mqa``           2 · d_h

Per token = per layer × layers; bytes = elements × bits / 8, so a 6-bit cache takes 0.75 byte per element.
A scheme's equivalent GQA groups are its elements per layer / (2 · d_h): MLA on DeepSeek-V2 is 576 / 256 = 2.25.
Everything here is integer and float arithmetic on configs; :func:`resolve_baseline` is the one function that
reads a file (a baseline model's ``config.json``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv2cli.analysis.params import count_params
from dsv2cli.config import ModelConfig
from dsv2cli.errors import ConfigError, InputError

DTYPE_BITS: dict[str, int] = {"float32": 32, "bfloat16": 16, "float16": 16, "fp8": 8, "int8": 8}
SCHEME_KINDS = ("mla", "mla-expanded", "mha", "gqa", "mqa")
DEFAULT_GQA_GROUPS = (8, 4, 2)
DEFAULT_CONTEXTS = (4096, 32768, 131072)

# Baselines with plain (grouped-query) attention. DeepSeek 67B: DeepSeek LLM report and its HF config (spec §10).
BASELINE_PRESETS: dict[str, dict[str, int]] = {
    "deepseek-67b": {"num_hidden_layers": 95, "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8},
}


@dataclass(frozen=True)
class Precision:
    """Bits per cached element: a dtype, or an average bit width of a quantised cache."""

    name: str
    bits: float

    @property
    def bytes_per_element(self) -> float:
        return self.bits / 8

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bits": _number(self.bits), "bytes_per_element": _number(self.bytes_per_element)}


def precision(dtype: str | None = None, bits: float | None = None, default: str = "bfloat16") -> Precision:
    """``dtype`` (float32, bfloat16, float16, fp8, int8) or ``bits`` (fractional allowed), not both."""
    if dtype is not None and bits is not None:
        raise InputError("give a dtype or a number of bits, not both")
    if bits is not None:
        if not (math.isfinite(bits) and 0 < bits <= 64):
            raise InputError(f"bits per element must be in (0, 64], not {bits:g}")
        return Precision(f"{bits:g}-bit", float(bits))
    name = (dtype or default).lower()
    if name not in DTYPE_BITS:
        raise InputError(f"unknown dtype '{dtype}'", hint=f"choose one of {', '.join(DTYPE_BITS)}, or give bits")
    return Precision(name, float(DTYPE_BITS[name]))


@dataclass(frozen=True)
class AttentionShape:
    """What the size of a model's cache depends on; the MLA fields are None for plain (MHA/GQA/MQA) attention."""

    name: str
    num_layers: int
    num_heads: int
    head_dim: int
    kv_heads: int | None = None
    kv_lora_rank: int | None = None
    rope_dim: int | None = None
    v_head_dim: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def native_scheme(self) -> Scheme:
        """The scheme this model really caches with."""
        if self.is_mla:
            return Scheme("mla")
        groups = self.kv_heads or self.num_heads
        if groups == self.num_heads:
            return Scheme("mha")
        return Scheme("mqa") if groups == 1 else Scheme("gqa", groups)

    @classmethod
    def from_config(cls, config: ModelConfig, name: str) -> AttentionShape:
        return cls(
            name=name,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.qk_nope_head_dim,
            kv_lora_rank=config.kv_lora_rank,
            rope_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
        )

    @classmethod
    def from_llama_hf(cls, hf: dict[str, Any], name: str) -> AttentionShape:
        """A Llama-style ``config.json``: layers, heads, KV heads (default: heads) and ``head_dim`` (default hidden / heads)."""
        for key in ("num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ConfigError(f"baseline config has no positive integer '{key}'", hint="is it a Llama-style config.json?")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if isinstance(hf.get("hidden_size"), int) else None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ConfigError("baseline config has neither 'head_dim' nor 'hidden_size'")
        kv_heads = hf.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or not 1 <= kv_heads <= heads:
            raise ConfigError(f"baseline config value num_key_value_heads={kv_heads!r} must be between 1 and {heads}")
        return cls(name=name, num_layers=hf["num_hidden_layers"], num_heads=heads, head_dim=head_dim, kv_heads=kv_heads)


@dataclass(frozen=True)
class Scheme:
    """One way of caching keys and values; ``groups`` only for ``gqa``."""

    kind: str
    groups: int | None = None

    @property
    def name(self) -> str:
        return f"gqa:{self.groups}" if self.kind == "gqa" else self.kind

    def elements_per_layer(self, s: AttentionShape) -> int:
        """Elements one token adds to one layer's cache (formulas in the module docstring)."""
        if self.kind == "mla":
            return _mla(s)[0] + _mla(s)[1]
        if self.kind == "mla-expanded":
            _, rope, v = _mla(s)
            return s.num_heads * (s.head_dim + rope + v)
        if self.kind == "mha":
            return 2 * s.num_heads * s.head_dim
        if self.kind == "gqa":
            assert self.groups is not None
            return 2 * self.groups * s.head_dim
        return 2 * s.head_dim

    def formula(self, s: AttentionShape) -> str:
        if self.kind == "mla":
            latent, rope, _ = _mla(s)
            return f"d_c + d_R = {latent} + {rope}"
        if self.kind == "mla-expanded":
            _, rope, v = _mla(s)
            return f"n_h·(d_h + d_R + d_v) = {s.num_heads}·({s.head_dim} + {rope} + {v})"
        if self.kind == "mha":
            return f"2·n_h·d_h = 2·{s.num_heads}·{s.head_dim}"
        if self.kind == "gqa":
            return f"2·G·d_h = 2·{self.groups}·{s.head_dim}"
        return f"2·d_h = 2·{s.head_dim}"


def _mla(s: AttentionShape) -> tuple[int, int, int]:
    if s.kv_lora_rank is None or s.rope_dim is None or s.v_head_dim is None:
        raise InputError(f"{s.name} has no MLA attention, so the mla schemes do not apply to it")
    return s.kv_lora_rank, s.rope_dim, s.v_head_dim


def parse_schemes(specs: list[str] | None, num_heads: int) -> list[Scheme]:
    """``["mla,gqa:2,4,8", "mqa"]`` -> schemes. A bare number after ``gqa:G`` is another group count; ``gqa`` alone
    means the default groups. With no specs: every scheme, GQA with the default groups that fit ``num_heads``."""
    default_groups = [g for g in DEFAULT_GQA_GROUPS if g < num_heads] or [1]
    if not specs:
        return [Scheme("mla"), Scheme("mla-expanded"), Scheme("mha"), *(Scheme("gqa", g) for g in default_groups), Scheme("mqa")]
    schemes: list[Scheme] = []
    last_was_gqa = False
    for token in (t.strip().lower() for spec in specs for t in spec.split(",")):
        if not token:
            continue
        if token.isdigit() and last_was_gqa:
            schemes.append(_gqa(token, num_heads))
            continue
        last_was_gqa = token.startswith("gqa")
        if token == "gqa":
            schemes.extend(Scheme("gqa", g) for g in default_groups)
        elif token.startswith("gqa:"):
            schemes.append(_gqa(token[4:], num_heads))
        elif token in SCHEME_KINDS:
            schemes.append(Scheme(token))
        else:
            raise InputError(f"unknown scheme '{token}'", hint="schemes: mla, mla-expanded, mha, gqa:G (e.g. gqa:2,4,8), mqa")
    unique = list(dict.fromkeys(schemes))
    return unique


def _gqa(groups: str, num_heads: int) -> Scheme:
    if not groups.isdigit() or not 1 <= int(groups) <= num_heads:
        raise InputError(f"GQA group count '{groups}' must be an integer between 1 and the {num_heads} attention heads")
    return Scheme("gqa", int(groups))


@dataclass(frozen=True)
class CacheRow:
    """One scheme on one model at one precision."""

    scheme: str
    formula: str
    elements_per_token_per_layer: int
    num_layers: int
    precision: Precision
    equivalent_gqa_groups: float
    fraction_of_mha: float

    @property
    def elements_per_token(self) -> int:
        return self.elements_per_token_per_layer * self.num_layers

    @property
    def bytes_per_token(self) -> float:
        return self.elements_per_token * self.precision.bits / 8

    def bytes_for(self, batch_size: int, context: int) -> float:
        """Bytes of ``batch_size`` sequences of ``context`` tokens each."""
        return self.bytes_per_token * batch_size * context

    def max_tokens(self, available_bytes: float) -> int:
        """Tokens (summed over all sequences) that fit in ``available_bytes``."""
        return max(0, math.floor(available_bytes / self.bytes_per_token))


def cache_row(scheme: Scheme, shape: AttentionShape, prec: Precision) -> CacheRow:
    per_layer = scheme.elements_per_layer(shape)
    return CacheRow(
        scheme=scheme.name,
        formula=scheme.formula(shape),
        elements_per_token_per_layer=per_layer,
        num_layers=shape.num_layers,
        precision=prec,
        equivalent_gqa_groups=per_layer / (2 * shape.head_dim),
        fraction_of_mha=per_layer / Scheme("mha").elements_per_layer(shape),
    )


@dataclass(frozen=True)
class Budget:
    """Memory for the cache: ``memory_bytes`` minus the weights when they are to be subtracted."""

    memory_bytes: int
    weight_bytes: float | None = None
    weight_precision: Precision | None = None

    @property
    def available_bytes(self) -> float:
        return self.memory_bytes - (self.weight_bytes or 0)


@dataclass(frozen=True)
class CacheReport:
    model: str
    source: str
    shape: AttentionShape
    precision: Precision
    batch_sizes: list[int]
    contexts: list[int]
    rows: list[CacheRow]
    native: CacheRow
    """The model's own cache (MLA), whatever ``rows`` shows; the reduction is computed from it."""
    budget: Budget | None = None
    baseline: CacheRow | None = None
    baseline_shape: AttentionShape | None = None
    notes: list[str] = field(default_factory=list)

    def reduction_of(self, row: CacheRow) -> float | None:
        """``1 - bytes / baseline bytes`` per token; None without a baseline."""
        if self.baseline is None:
            return None
        return 1 - row.bytes_per_token / self.baseline.bytes_per_token

    @property
    def reduction(self) -> float | None:
        return self.reduction_of(self.native)

    @property
    def architecture_reduction(self) -> float | None:
        """The reduction with the model's cache at the baseline's precision: what the attention scheme alone saves."""
        if self.baseline is None:
            return None
        same = cache_row(self.shape.native_scheme, self.shape, self.baseline.precision)
        return self.reduction_of(same)

    def explanation(self) -> list[str]:
        """Where the numbers come from, in one or two sentences."""
        n, s = self.native, self.shape
        lines = [
            f"{s.name} caches {n.formula} = {n.elements_per_token_per_layer:,} elements per token per layer "
            f"× {s.num_layers} layers = {n.elements_per_token:,} elements = {_fmt(n.bytes_per_token)} B per token "
            f"at {self.precision.name} (equivalent to GQA with {n.equivalent_gqa_groups:g} groups)."
        ]
        if self.baseline is not None and self.baseline_shape is not None:
            b, bs = self.baseline, self.baseline_shape
            line = (
                f"Baseline {bs.name} ({b.scheme}) caches {b.formula} × {bs.num_layers} layers = {b.elements_per_token:,} "
                f"elements = {_fmt(b.bytes_per_token)} B per token at {b.precision.name}; "
                f"1 − {_fmt(n.bytes_per_token)} / {_fmt(b.bytes_per_token)} = {_percent(self.reduction)} smaller"
            )
            if b.precision.bits != self.precision.bits:
                line += (
                    f" ({_percent(self.architecture_reduction)} from the attention scheme alone at {b.precision.name}, "
                    f"the rest from the {self.precision.name} cache)"
                )
            lines.append(line + ".")
        return lines

    def to_json(self) -> dict[str, Any]:
        s = self.shape
        return {
            "model": self.model,
            "source": self.source,
            "attention": {
                "layers": s.num_layers,
                "heads": s.num_heads,
                "head_dim": s.head_dim,
                "kv_lora_rank": s.kv_lora_rank,
                "rope_head_dim": s.rope_dim,
                "v_head_dim": s.v_head_dim,
            },
            "precision": self.precision.to_json(),
            "batch_sizes": self.batch_sizes,
            "contexts": self.contexts,
            "rows": [self._row_json(row) for row in self.rows],
            "budget": None if self.budget is None else self._budget_json(self.budget),
            "baseline": None if self.baseline is None else self._baseline_json(self.baseline),
            "reduction": self.reduction,
            "architecture_reduction": self.architecture_reduction,
            "explanation": self.explanation(),
            "notes": self.notes,
        }

    def _row_json(self, row: CacheRow) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "scheme": row.scheme,
            "formula": row.formula,
            "elements_per_token_per_layer": row.elements_per_token_per_layer,
            "elements_per_token": row.elements_per_token,
            "bytes_per_token": _number(row.bytes_per_token),
            "equivalent_gqa_groups": row.equivalent_gqa_groups,
            "fraction_of_mha": row.fraction_of_mha,
            "bytes_per_sequence": [{"context": c, "bytes": _number(row.bytes_for(1, c))} for c in self.contexts],
            "grid": self._grid(row),
        }
        if self.budget is not None:
            tokens = row.max_tokens(self.budget.available_bytes)
            doc["max_tokens"] = tokens
            doc["max_sequences"] = [{"context": c, "sequences": tokens // c} for c in self.contexts]
        if self.baseline is not None:
            doc["reduction"] = self.reduction_of(row)
        return doc

    def _grid(self, row: CacheRow) -> list[dict[str, Any]]:
        return [
            {"batch_size": b, "context": c, "bytes": _number(row.bytes_for(b, c))}
            for b in self.batch_sizes
            for c in self.contexts
        ]

    def _budget_json(self, budget: Budget) -> dict[str, Any]:
        return {
            "memory_bytes": budget.memory_bytes,
            "weight_bytes": None if budget.weight_bytes is None else _number(budget.weight_bytes),
            "weight_precision": None if budget.weight_precision is None else budget.weight_precision.to_json(),
            "available_bytes": _number(budget.available_bytes),
        }

    def _baseline_json(self, row: CacheRow) -> dict[str, Any]:
        assert self.baseline_shape is not None
        return {
            "model": self.baseline_shape.name,
            "scheme": row.scheme,
            "formula": row.formula,
            "layers": row.num_layers,
            "precision": row.precision.to_json(),
            "elements_per_token_per_layer": row.elements_per_token_per_layer,
            "elements_per_token": row.elements_per_token,
            "bytes_per_token": _number(row.bytes_per_token),
            "grid": self._grid(row),
        }


def build_cache_report(
    config: ModelConfig,
    name: str,
    source: str,
    schemes: list[Scheme],
    prec: Precision,
    batch_sizes: list[int],
    contexts: list[int],
    memory_bytes: int | None = None,
    weight_precision: Precision | None = None,
    baseline: AttentionShape | None = None,
    baseline_precision: Precision | None = None,
) -> CacheReport:
    """Rows for ``schemes`` on ``config``; a budget when ``memory_bytes`` is given (minus the weights at
    ``weight_precision`` when that is given); a baseline comparison when ``baseline`` is given."""
    _check_positive("--batch-size", batch_sizes)
    _check_positive("--context", contexts)
    if not schemes:
        raise InputError("no scheme to report", hint="--schemes mla,mha,gqa:8,mqa")
    shape = AttentionShape.from_config(config, name)
    notes = [
        f"context {c:,} is longer than the model's max_position_embeddings ({config.max_position_embeddings:,})"
        for c in contexts
        if c > config.max_position_embeddings
    ]
    budget = None
    if memory_bytes is not None:
        weights = None if weight_precision is None else count_params(config).total * weight_precision.bits / 8
        budget = Budget(memory_bytes, weights, weight_precision)
        if budget.available_bytes <= 0:
            raise InputError(
                f"the weights alone take {_fmt(weights or 0)} B at {weight_precision.name if weight_precision else ''}, "
                f"more than the {memory_bytes:,} B of --memory",
                hint="raise --memory, lower --weight-dtype, or drop --minus-weights",
            )
    baseline_row = None
    if baseline is not None:
        baseline_row = cache_row(baseline.native_scheme, baseline, baseline_precision or precision())
    return CacheReport(
        model=name,
        source=source,
        shape=shape,
        precision=prec,
        batch_sizes=list(batch_sizes),
        contexts=list(contexts),
        rows=[cache_row(s, shape, prec) for s in schemes],
        native=cache_row(shape.native_scheme, shape, prec),
        budget=budget,
        baseline=baseline_row,
        baseline_shape=baseline,
        notes=notes,
    )


def _check_positive(option: str, values: list[int]) -> None:
    if not values:
        raise InputError(f"{option} needs at least one value")
    bad = [v for v in values if v <= 0]
    if bad:
        raise InputError(f"{option} must be positive, not {bad[0]}")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_memory(text: str) -> int:
    """``"80GiB"`` -> 85899345920. KB/MB/GB/TB are powers of 1000; K/M/G/T and KiB/MiB/GiB/TiB powers of 1024."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise InputError(f"cannot read '{text}' as an amount of memory", hint="write e.g. 80GiB, 24GB or 1.5TiB")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise InputError(f"--memory must be positive, not '{text}'")
    return value


def parse_tokens(text: str) -> int:
    """``"4096"``, ``"32k"`` or ``"128K"`` (K = 1024 tokens, M = 1024²) -> tokens; sign kept for the positivity check."""
    match = re.match(r"^\s*(-?[0-9]+)\s*([km]?)\s*$", text, re.IGNORECASE)
    if match is None:
        raise InputError(f"cannot read '{text}' as a number of tokens", hint="write e.g. 4096, 32k or 128K")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]


def resolve_baseline(spec: str) -> AttentionShape:
    """A baseline preset (``deepseek-67b``), a dsv2 preset, or a ``config.json`` (path, directory or Hub repo id)
    of a DeepSeek-V2-family model or of a Llama-style model with (grouped-query) multi-head attention."""
    from dsv2cli.presets import PRESETS, preset_config
    from dsv2cli.resolve import looks_like_repo_id

    key = spec.lower()
    if key in BASELINE_PRESETS:
        return AttentionShape.from_llama_hf(BASELINE_PRESETS[key], key)
    if key in PRESETS:
        return AttentionShape.from_config(preset_config(key), key)
    path = Path(spec).expanduser()
    name = path.name
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file() and looks_like_repo_id(spec):
        from dsv2cli.checkpoint.hub import fetch_config

        path, name = fetch_config(spec), spec
    if not path.is_file():
        raise InputError(
            f"baseline '{spec}' is not a preset, a config.json, a directory holding one or a Hub repo id",
            hint=f"baseline presets: {', '.join(BASELINE_PRESETS)}; or any dsv2 preset",
        )
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    if "kv_lora_rank" in hf:
        return AttentionShape.from_config(ModelConfig.from_hf(hf), name or spec)
    return AttentionShape.from_llama_hf(hf, name or spec)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _fmt(x: float) -> str:
    return f"{_number(x):,}" if float(x).is_integer() else f"{x:,.2f}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"
