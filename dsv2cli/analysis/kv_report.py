"""The ``cache-report`` document: rows of schemes on one model, a memory budget and a baseline comparison.

The arithmetic is ``kv_cache.py``'s; :func:`resolve_baseline` reads the baseline's config through
``checkpoint/resolve.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv2cli.analysis.kv_cache import (
    AttentionShape,
    CacheRow,
    Precision,
    Scheme,
    cache_row,
    json_number,
    precision,
)
from dsv2cli.analysis.params import count_params
from dsv2cli.checkpoint.resolve import resolve_hf_config
from dsv2cli.config import ModelConfig
from dsv2cli.errors import InputError


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
            "bytes_per_token": json_number(row.bytes_per_token),
            "equivalent_gqa_groups": row.equivalent_gqa_groups,
            "fraction_of_mha": row.fraction_of_mha,
            "bytes_per_sequence": [{"context": c, "bytes": json_number(row.bytes_for(1, c))} for c in self.contexts],
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
            {"batch_size": b, "context": c, "bytes": json_number(row.bytes_for(b, c))}
            for b in self.batch_sizes
            for c in self.contexts
        ]

    def _budget_json(self, budget: Budget) -> dict[str, Any]:
        return {
            "memory_bytes": budget.memory_bytes,
            "weight_bytes": None if budget.weight_bytes is None else json_number(budget.weight_bytes),
            "weight_precision": None if budget.weight_precision is None else budget.weight_precision.to_json(),
            "available_bytes": json_number(budget.available_bytes),
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
            "bytes_per_token": json_number(row.bytes_per_token),
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
    _check_positive("batch_size", batch_sizes)
    _check_positive("context", contexts)
    if not schemes:
        raise InputError("no scheme to report", hint="`schemes=mla,mha,gqa:8,mqa`")
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
                f"more than the {memory_bytes:,} B of `memory`",
                hint="raise `memory`, lower `weight_dtype`, or drop `minus_weights`",
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


def _check_positive(field: str, values: list[int]) -> None:
    if not values:
        raise InputError(f"`{field}` needs at least one value")
    bad = [v for v in values if v <= 0]
    if bad:
        raise InputError(f"`{field}` must be positive, not {bad[0]}")


def resolve_baseline(spec: str) -> AttentionShape:
    """A baseline preset (``deepseek-67b``), a dsv2 preset, or a ``config.json`` (path, directory or Hub repo id)
    of a DeepSeek-V2-family model or of a Llama-style model with (grouped-query) multi-head attention."""
    name, hf = resolve_hf_config(spec)
    return AttentionShape.from_hf(hf, name)


def _fmt(x: float) -> str:
    return f"{json_number(x):,}" if float(x).is_integer() else f"{x:,.2f}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"
