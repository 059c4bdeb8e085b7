"""The record of an expert-stats run: load metrics per layer, their summary across layers, drops, the JSON document.

:func:`dsv2cli.analysis.expert_stats.collect_expert_stats` fills an :class:`ExpertStatsReport`; the
command renders it and :mod:`dsv2cli.analysis.expert_export` writes it to files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv2cli.analysis.balance import coefficient_of_variation, max_over_mean
from dsv2cli.analysis.expert_drop import DropCounts
from dsv2cli.analysis.expert_loads import ExpertLoads
from dsv2cli.analysis.placement import PlacementPlan, balancedness


@dataclass(frozen=True)
class LoadMetrics:
    """Imbalance of one load vector: 1.0 / 0.0 / 1.0 / 1.0 / 1.0 when perfectly even."""

    max_over_mean: float
    min_over_mean: float
    cv: float
    normalized_entropy: float
    balancedness: float  # mean / max (vLLM, SGLang)


def load_metrics(counts: torch.Tensor) -> LoadMetrics:
    """Metrics of a load vector ``[E]`` (counts or fractions; zeros allowed)."""
    load = counts.double()
    total = float(load.sum())
    p = load / total if total > 0 else torch.full_like(load, 1.0 / load.numel())
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    mean = float(load.mean())
    return LoadMetrics(
        max_over_mean=float(max_over_mean(load)),
        min_over_mean=float(load.min()) / mean if mean > 0 else 1.0,
        cv=float(coefficient_of_variation(load)),
        normalized_entropy=entropy / math.log(load.numel()) if load.numel() > 1 else 1.0,
        balancedness=balancedness(load),
    )


@dataclass(frozen=True)
class TopToken:
    token_id: int
    text: str | None
    count: int


@dataclass
class LayerStats:
    layer: int
    counts: list[int]
    metrics: LoadMetrics
    expert_balance: float | None  # paper's Σ f·P, mean over sequences (None from loads alone: it needs the affinities)
    device_balance: float | None
    communication_balance: float | None
    device_loads: list[float]
    device_balancedness: float
    drop: list[DropCounts]
    top_tokens: list[list[TopToken]] | None = None

    @property
    def load_fraction(self) -> list[float]:
        total = sum(self.counts)
        return [c / total for c in self.counts]

    def metric(self, name: str) -> float | None:
        value = getattr(self.metrics, name) if hasattr(self.metrics, name) else getattr(self, name)
        return None if value is None else float(value)


# Metrics summarised across layers, and whether a higher value is worse.
SUMMARY_METRICS = {
    "max_over_mean": True,
    "min_over_mean": False,
    "cv": True,
    "normalized_entropy": False,
    "balancedness": False,
    "expert_balance": True,
    "device_balance": True,
    "communication_balance": True,
    "device_balancedness": False,
}


@dataclass(frozen=True)
class Summary:
    mean: float
    min: float
    p50: float
    p90: float
    max: float
    worst_layer: int


def summarise(values: list[float], layers: list[int], higher_is_worse: bool) -> Summary:
    """Mean, percentiles (linear interpolation, as numpy's default) and the worst layer of one metric across layers."""
    ordered = sorted(values)

    def percentile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    worst = max(range(len(values)), key=lambda i: values[i] if higher_is_worse else -values[i])
    return Summary(
        mean=sum(values) / len(values),
        min=ordered[0],
        p50=percentile(0.5),
        p90=percentile(0.9),
        max=ordered[-1],
        worst_layer=layers[worst],
    )


def summarise_layers(layers: list[LayerStats]) -> dict[str, Summary]:
    """Every metric of :data:`SUMMARY_METRICS` across ``layers``; those a report lacks (None) are left out."""
    summary = {}
    for metric, worse in SUMMARY_METRICS.items():
        values = [layer.metric(metric) for layer in layers]
        if all(v is not None for v in values):
            summary[metric] = summarise([v for v in values if v is not None], [layer.layer for layer in layers], worse)
    return summary


@dataclass(frozen=True)
class ApplyDropResult:
    """Next-token loss over the same tokens with and without dropping actually applied."""

    policy: str
    capacity_factor: float
    drop_order: str | None
    loss: float
    loss_with_drop: float
    predicted_tokens: int
    assignment_drop_rate: float  # realised over all layers (later layers see hidden states changed by earlier drops)
    layer_drop_rates: dict[int, float]

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def perplexity_with_drop(self) -> float:
        return math.exp(self.loss_with_drop)


@dataclass
class ExpertStatsReport:
    model: str
    sequences: int | None  # None for a report of a loads file
    tokens: int
    truncated: bool
    top_k: int
    n_routed_experts: int
    n_shared_experts: int
    devices: int
    max_devices: int
    placement: str
    batch_tokens: int | None
    drop_batches: int
    capacity_factors: list[float]
    drop_order: str
    layers: list[LayerStats]
    drop_overall: list[DropCounts]
    seconds: float
    apply: ApplyDropResult | None = None
    plan: PlacementPlan | None = None
    summary: dict[str, Summary] = field(default_factory=dict)
    n_group: int = 1  # the router's groups, kept with the loads (they set the default devices)
    topk_group: int = 1
    topk_method: str = "greedy"
    loads_file: str | None = None  # the loads file the report was made from (no model run)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def load_matrix(self) -> list[list[int]]:
        """``[moe_layers, n_routed_experts]`` counts: what DeepSeek's EPLB takes as ``weight``."""
        return [layer.counts for layer in self.layers]

    def expert_loads(self) -> ExpertLoads:
        """The loads with what reading them back needs: the ``--save-loads`` JSON document."""
        return ExpertLoads(
            model=self.model,
            layers=[layer.layer for layer in self.layers],
            loads=self.load_matrix(),
            tokens=self.tokens,
            top_k=self.top_k,
            n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts,
            n_group=self.n_group,
            topk_group=self.topk_group,
            topk_method=self.topk_method,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "top_k": self.top_k,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "shared_expert_tokens": self.tokens,  # shared experts process every token in every MoE layer
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": self.topk_method,
            "loads_file": self.loads_file,
            "devices": self.devices,
            "max_devices_per_token": self.max_devices,
            "placement": self.placement,
            "drop_batches": {"tokens_per_batch": self.batch_tokens or "sequence", "count": self.drop_batches},
            "capacity_factors": self.capacity_factors,
            "drop_order": self.drop_order,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "layers": [_layer_json(layer, self.tokens) for layer in self.layers],
            "summary": {name: vars(s) for name, s in self.summary.items()},
            "drop_overall": [d.to_json() for d in self.drop_overall],
            "apply_drop": None if self.apply is None else _apply_json(self.apply),
            "plan": None if self.plan is None else self.plan.to_json(),
        }


def _layer_json(layer: LayerStats, tokens: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"layer": layer.layer, "counts": layer.counts, "load_fraction": layer.load_fraction}
    doc["shared_expert_tokens"] = tokens  # shared experts are always active
    doc.update(vars(layer.metrics))
    doc.update(
        expert_balance=layer.expert_balance,
        device_balance=layer.device_balance,
        communication_balance=layer.communication_balance,
        device_loads=layer.device_loads,
        device_balancedness=layer.device_balancedness,
        drop=[d.to_json() for d in layer.drop],
    )
    if layer.top_tokens is not None:
        doc["top_tokens"] = [[vars(t) for t in expert] for expert in layer.top_tokens]
    return doc


def _apply_json(a: ApplyDropResult) -> dict[str, Any]:
    return {
        "policy": a.policy,
        "capacity_factor": a.capacity_factor,
        "drop_order": a.drop_order,
        "loss": a.loss,
        "perplexity": a.perplexity,
        "loss_with_drop": a.loss_with_drop,
        "perplexity_with_drop": a.perplexity_with_drop,
        "predicted_tokens": a.predicted_tokens,
        "assignment_drop_rate": a.assignment_drop_rate,
        "layer_drop_rates": {str(k): v for k, v in a.layer_drop_rates.items()},
    }
