"""An expert-stats report as files: the JSON or CSV document, and the load matrix that DeepSeek's EPLB reads.

Files are written through :class:`dsv2cli.commit.Output` (a staging file renamed into place), so a
reader never sees half of one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv2cli.analysis.expert_report import ExpertStatsReport
from dsv2cli.commit import Output

DOCUMENT_FORMATS = ("json", "csv")


def report_document(report: ExpertStatsReport, fmt: str) -> str:
    """The whole report as JSON, or as CSV with one line per layer and expert (``layer,expert,count,load_fraction``)."""
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "expert", "count", "load_fraction"])
    for layer in report.layers:
        for expert, (count, share) in enumerate(zip(layer.counts, layer.load_fraction, strict=True)):
            writer.writerow([layer.layer, expert, count, f"{share:.6g}"])
    return buffer.getvalue()


def write_text(target: Output, text: str) -> None:
    with target.staged() as staging:
        staging.write_text(text, encoding="utf-8")


def _loads_json(report: ExpertStatsReport, target: Output) -> None:
    write_text(target, json.dumps(report.expert_loads().to_json()) + "\n")


def _loads_csv(report: ExpertStatsReport, target: Output) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", *(f"expert_{e}" for e in range(report.n_routed_experts))])
    for layer in report.layers:
        writer.writerow([layer.layer, *layer.counts])
    write_text(target, buffer.getvalue())


def _loads_safetensors(report: ExpertStatsReport, target: Output) -> None:
    loads = torch.tensor(report.load_matrix(), dtype=torch.int64)  # [moe_layers, experts]
    metadata = {"layers": json.dumps([layer.layer for layer in report.layers]), "tokens": str(report.tokens)}
    with target.staged() as staging:
        save_file({"loads": loads}, str(staging), metadata=metadata)


LOAD_WRITERS: dict[str, Callable[[ExpertStatsReport, Output], None]] = {
    ".json": _loads_json,
    ".csv": _loads_csv,
    ".safetensors": _loads_safetensors,
}


def write_loads(report: ExpertStatsReport, target: Output) -> None:
    """The ``[moe_layers, n_routed_experts]`` counts as the file's suffix says: .json, .csv or .safetensors."""
    LOAD_WRITERS[Path(target.path).suffix.lower()](report, target)
