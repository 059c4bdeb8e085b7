"""Routed experts on devices: contiguous groups, placement files, device loads, and a balanced plan.

Shape legend: E routed experts, D devices. A *layout* lists, for each device, the experts it holds;
an expert on several devices (a replica, as in DeepSeek's EPLB) shares its load evenly between them.

The paper's device-level quantities and the device drop policy need every expert on exactly one
device and the same number of experts per device (``E / D``, as in expert parallelism); a
:class:`Placement` guarantees that. Plans with replicas are only evaluated by their device loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv2cli.errors import InputError

Layout = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Placement:
    """An equal-size partition of the experts onto devices, the same for every MoE layer unless ``per_layer`` says otherwise."""

    num_experts: int
    devices: Layout
    source: str  # "contiguous" or the file it was read from
    per_layer: dict[int, Layout] = field(default_factory=dict)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def layout(self, layer: int) -> Layout:
        return self.per_layer.get(layer, self.devices)

    def expert_order(self, layer: int) -> torch.Tensor | None:
        """Experts listed device by device (``[E]``), or None when the layout is already contiguous.

        Relabelling expert ``order[j]`` as ``j`` makes each device a contiguous group, which is
        what :mod:`dsv2cli.analysis.balance` and :mod:`dsv2cli.analysis.token_drop` expect.
        """
        order = [e for group in self.layout(layer) for e in group]
        return None if order == list(range(self.num_experts)) else torch.tensor(order)


def contiguous_placement(num_experts: int, num_devices: int) -> Placement:
    """Devices holding experts ``[0, E/D)``, ``[E/D, 2E/D)``, … (the paper's expert-parallel layout)."""
    if num_devices < 1 or num_experts % num_devices:
        raise InputError(
            f"{num_devices} devices do not divide the {num_experts} routed experts",
            hint=f"choose a divisor of {num_experts}",
        )
    size = num_experts // num_devices
    return Placement(num_experts, tuple(tuple(range(d * size, (d + 1) * size)) for d in range(num_devices)), "contiguous")


def read_placement(path: Path, num_experts: int, moe_layers: list[int]) -> Placement:
    """A placement file: ``{"devices": [[experts of device 0], …]}`` for every layer, a bare list of lists,
    or per layer ``{"layers": [{"layer": 1, "devices": [[…], …]}, …]}``: the ``plan`` of a ``--plan-devices``
    JSON report, which may also be passed whole."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read placement file {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"placement file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if isinstance(data, dict) and "layers" in data:
        entries = data["layers"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "layer" in e and "devices" in e for e in entries):
            raise InputError(f"{path}: 'layers' must be a list of {{'layer': L, 'devices': [[...], ...]}} objects")
        per_layer = {int(e["layer"]): _check_layout(e["devices"], num_experts, f"{path} layer {e['layer']}") for e in entries}
        missing = [layer for layer in moe_layers if layer not in per_layer]
        if missing:
            raise InputError(f"{path} has no placement for MoE layer(s) {', '.join(map(str, missing))}")
        sizes = {len(layout) for layout in per_layer.values()}
        if len(sizes) != 1:
            raise InputError(f"{path}: every layer must use the same number of devices")
        return Placement(num_experts, per_layer[moe_layers[0]], str(path), per_layer)
    devices = data.get("devices") if isinstance(data, dict) else data
    return Placement(num_experts, _check_layout(devices, num_experts, str(path)), str(path))


def _check_layout(devices: Any, num_experts: int, where: str) -> Layout:
    if not isinstance(devices, list) or not devices or not all(isinstance(g, list) for g in devices):
        raise InputError(f"{where}: 'devices' must be a non-empty list of lists of expert ids")
    flat = [e for g in devices for e in g]
    if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < num_experts for e in flat):
        raise InputError(f"{where}: expert ids must be integers in 0..{num_experts - 1}")
    if sorted(flat) != list(range(num_experts)):
        raise InputError(
            f"{where}: every expert must be on exactly one device ({len(flat)} entries for {num_experts} experts)",
            hint="replicated experts can be planned with `plan_devices` and `redundant` but not used as `placement_file`",
        )
    if len({len(g) for g in devices}) != 1:
        raise InputError(f"{where}: every device must hold the same number of experts ({num_experts} / {len(devices)})")
    return tuple(tuple(g) for g in devices)


def device_loads(counts: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Assignments per device ``[D]`` from expert counts ``[E]``; an expert's load is split evenly over its replicas."""
    experts = torch.tensor([e for group in layout for e in group], dtype=torch.long)
    devices = torch.tensor([d for d, group in enumerate(layout) for _ in group], dtype=torch.long)
    replicas = torch.bincount(experts, minlength=counts.numel()).clamp_min(1)
    share = counts.double() / replicas
    return torch.zeros(len(layout), dtype=torch.float64).index_add_(0, devices, share[experts])


def balancedness(loads: torch.Tensor) -> float:
    """``mean / max`` of a load vector (1.0 = perfectly balanced), as vLLM and SGLang report it."""
    peak = float(loads.max())
    return float(loads.double().mean()) / peak if peak > 0 else 1.0


def even_layout(num_experts: int, num_devices: int) -> Layout:
    """Contiguous groups as even as possible (sizes differ by at most one), for any E and D."""
    bounds = [d * num_experts // num_devices for d in range(num_devices + 1)]
    return tuple(tuple(range(bounds[d], bounds[d + 1])) for d in range(num_devices))


def plan_layout(counts: torch.Tensor, num_devices: int, redundant: int = 0) -> Layout:
    """Balanced greedy packing of one layer's experts onto ``num_devices``, after ``redundant`` replicas.

    In the spirit of DeepSeek's EPLB: each extra replica goes to the expert with the highest load per
    replica; then the physical experts, heaviest first, go to the least-loaded device that still has
    a free slot (``(E + R) / D`` slots each) and does not already hold that expert.
    """
    num_experts = counts.numel()
    physical = num_experts + redundant
    if num_devices < 1 or redundant < 0 or physical % num_devices:
        raise InputError(
            f"{num_experts} experts + {redundant} replicas cannot fill {num_devices} devices equally",
            hint="choose `plan_devices` and `redundant` so that experts + replicas is a multiple of the devices",
        )
    load = counts.double()
    replicas = torch.ones(num_experts, dtype=torch.float64)
    for _ in range(redundant):
        replicas[int(torch.argmax(load / replicas))] += 1
    items = sorted(
        ((float(load[e] / replicas[e]), e) for e in range(num_experts) for _ in range(int(replicas[e]))),
        key=lambda item: (-item[0], item[1]),
    )
    slots = physical // num_devices
    groups: list[list[int]] = [[] for _ in range(num_devices)]
    totals = [0.0] * num_devices
    for weight, expert in items:
        open_devices = [d for d in range(num_devices) if len(groups[d]) < slots]
        fresh = [d for d in open_devices if expert not in groups[d]] or open_devices
        target = min(fresh, key=lambda d: (totals[d], d))
        groups[target].append(expert)
        totals[target] += weight
    return tuple(tuple(sorted(g)) for g in groups)


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    devices: Layout
    loads_before: list[float]
    loads_after: list[float]
    balancedness_before: float
    balancedness_after: float


@dataclass(frozen=True)
class PlacementPlan:
    """A proposed placement for every MoE layer and device balancedness before (contiguous) and after."""

    num_devices: int
    redundant: int
    layers: list[LayerPlan]

    @property
    def mean_before(self) -> float:
        return sum(p.balancedness_before for p in self.layers) / len(self.layers)

    @property
    def mean_after(self) -> float:
        return sum(p.balancedness_after for p in self.layers) / len(self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.num_devices,
            "redundant": self.redundant,
            "mean_balancedness_before": self.mean_before,
            "mean_balancedness_after": self.mean_after,
            "layers": [
                {
                    "layer": p.layer,
                    "devices": [list(g) for g in p.devices],
                    "loads_before": p.loads_before,
                    "loads_after": p.loads_after,
                    "balancedness_before": p.balancedness_before,
                    "balancedness_after": p.balancedness_after,
                }
                for p in self.layers
            ],
        }


def plan_placement(counts: dict[int, torch.Tensor], num_devices: int, redundant: int = 0) -> PlacementPlan:
    """Plan every layer from its expert counts; "before" is the contiguous (as even as possible) layout."""
    layers = []
    for layer, layer_counts in counts.items():
        before = device_loads(layer_counts, even_layout(layer_counts.numel(), num_devices))
        layout = plan_layout(layer_counts, num_devices, redundant)
        after = device_loads(layer_counts, layout)
        layers.append(LayerPlan(layer, layout, before.tolist(), after.tolist(), balancedness(before), balancedness(after)))
    return PlacementPlan(num_devices, redundant, layers)
