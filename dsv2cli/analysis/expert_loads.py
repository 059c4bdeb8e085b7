"""Expert loads as a file: the document that ``--save-loads FILE.json`` writes and that ``dsv2 serve``'s
``/dump_expert_distribution_record`` answers, and its reading back (bounded, every field checked).

The document: ``{"model", "layers", "n_routed_experts", "n_shared_experts", "top_k", "n_group",
"topk_group", "topk_method", "tokens", "loads"}`` with ``loads[i][e]`` the routed assignments of MoE
layer ``layers[i]`` to expert ``e`` over ``tokens`` tokens (the ``weight`` input of DeepSeek's EPLB).
:func:`read_loads` also takes a whole expert-stats JSON report (its ``layers[].counts``), and a document
without the router fields (``n_group``, ``topk_group``, ``topk_method``, ``n_shared_experts``, ``model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2cli.errors import InputError
from dsv2cli.untrusted import Fields, is_int, read_json

MAX_LOADS_BYTES = 16 << 20  # DeepSeek-V3's 58 x 256 loads take ~150 KB; a report with top tokens a few MB
MAX_TOKENS = 1 << 40  # with at most MAX_EXPERTS experts, tokens x top_k stays within int64 (and exact in a double)
MAX_EXPERTS = 1 << 20
LOADS_HINT = (
    "pass the JSON that `save_loads` or `format=json` writes, or what a server's POST /dump_expert_distribution_record answers"
)


@dataclass(frozen=True)
class ExpertLoads:
    """Routed assignments per MoE layer and expert, with the router's shape a report needs to read them."""

    model: str
    layers: list[int]
    loads: list[list[int]]  # [moe layers][n_routed_experts]
    tokens: int
    top_k: int
    n_routed_experts: int
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layers": list(self.layers),
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "top_k": self.top_k,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": self.topk_method,
            "tokens": self.tokens,
            "loads": self.loads,
        }


def read_loads(path: Path) -> ExpertLoads:
    """A loads document or an expert-stats JSON report from ``path`` (at most ``MAX_LOADS_BYTES``), checked."""
    try:
        data = read_json(path, max_bytes=MAX_LOADS_BYTES)
    except InputError as exc:
        raise InputError(f"loads file {exc.message}", hint=LOADS_HINT) from None
    where = f"loads file {path.name}"
    fields = Fields(data, where)
    if "loads" in data:
        layers = fields.list("layers")
        rows = fields.list("loads")
        if not all(is_int(layer) for layer in layers):
            raise fields.fail("layers", "must be a list of layer indices (integers)")
    elif isinstance(data.get("layers"), list):  # an expert-stats report: its layers[].layer and layers[].counts
        entries = [Fields(entry, where, prefix=f"layers[{i}].") for i, entry in enumerate(data["layers"])]
        layers = [entry.int("layer", low=0) for entry in entries]
        rows = [entry.list("counts") for entry in entries]
    else:
        raise InputError(f"{where}: no field 'loads' (nor an expert-stats report's 'layers')", hint=LOADS_HINT)
    experts = fields.int("n_routed_experts", low=1, high=MAX_EXPERTS)
    top_k = fields.int("top_k", low=1, high=experts)
    if data.get("tokens") == 0:
        raise InputError(f"{where}: no tokens were recorded", hint="send requests between starting the record and dumping it")
    tokens = fields.int("tokens", low=1, high=MAX_TOKENS)
    n_group = fields.int("n_group", low=1, high=experts, default=1)
    if experts % n_group:
        raise fields.fail("n_group", f"must divide the {experts} routed experts, not {n_group}")
    loads = ExpertLoads(
        model=_name(fields.str("model", default=path.stem, optional=True), path.stem),
        layers=layers,
        loads=rows,
        tokens=tokens,
        top_k=top_k,
        n_routed_experts=experts,
        n_shared_experts=fields.int("n_shared_experts", low=0, default=0, optional=True),
        n_group=n_group,
        topk_group=fields.int("topk_group", low=1, high=n_group, default=1),
        topk_method=fields.str("topk_method", default="greedy"),
    )
    _check_loads(loads, where)
    return loads


def _check_loads(loads: ExpertLoads, where: str) -> None:
    """Layers distinct and increasing, one row of ``n_routed_experts`` counts each, no row above ``tokens × top_k``."""
    layers, rows = loads.layers, loads.loads
    if not layers:
        raise InputError(f"{where}: no MoE layers", hint=LOADS_HINT)
    if layers[0] < 0 or layers != sorted(set(layers)):
        raise InputError(f"{where}: field 'layers' must hold distinct layer indices, 0 or more, in increasing order")
    if len(rows) != len(layers):
        raise InputError(f"{where}: {len(rows)} rows of loads for {len(layers)} layers (one row per layer)")
    budget = loads.tokens * loads.top_k
    for layer, row in zip(layers, rows, strict=True):
        if not isinstance(row, list) or len(row) != loads.n_routed_experts:
            got = f"{len(row)} values" if isinstance(row, list) else "not a list"
            raise InputError(
                f"{where}: the loads of layer {layer} must be {loads.n_routed_experts} counts, one per routed expert ({got})"
            )
        if not all(is_int(count) and count >= 0 for count in row):
            raise InputError(f"{where}: the loads of layer {layer} must be whole numbers, 0 or more")
        if sum(row) > budget:
            raise InputError(
                f"{where}: the loads of layer {layer} sum to {sum(row)}, more than tokens × top_k = {budget}",
                hint="each token is routed to top_k experts per layer",
            )


def _name(model: str, fallback: str) -> str:
    """The model's name as a report shows it: one line of at most 200 printable characters."""
    return model if model and len(model) <= 200 and model.isprintable() else fallback
