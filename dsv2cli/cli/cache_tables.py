"""How `dsv2 cache-report` shows a report: rich tables, markdown (the same cells) and CSV (every number raw)."""

from __future__ import annotations

import csv
import io
from typing import Any

from rich.table import Table
from tabulate import tabulate

from dsv2cli.analysis.kv_cache import CacheRow
from dsv2cli.analysis.kv_measure import CacheMeasurement
from dsv2cli.analysis.kv_report import CacheReport
from dsv2cli.cli.common import err, human_bytes, out


def _tokens(context: int) -> str:
    """131072 -> '128K' (contexts are usually powers of two), 5000 -> '5,000'."""
    return f"{context // 1024}K" if context % 1024 == 0 else f"{context:,}"


def _grid_label(batch: int, context: int) -> str:
    return f"B={batch} T={_tokens(context)}"


def _percent(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f} %"


def _versus(reduction: float | None) -> str:
    """0.933 -> '93.3 %' (a reduction); -3.737 -> '4.74× larger'."""
    if reduction is None or reduction >= 0:
        return _percent(reduction)
    return f"{1 - reduction:.2f}× larger"


def _size_rows(report: CacheReport, wide: bool) -> tuple[list[str], list[list[Any]]]:
    """Per-token sizes, one row per scheme (the baseline last); ``wide`` adds the share of MHA and the formula."""
    header = ["scheme", "elements / token / layer", "elements / token", "bytes / token", "GQA groups"]
    header += ["of MHA"] if wide else []
    header += ["vs baseline"] if report.baseline is not None else []
    header += ["per layer ="] if wide else []
    rows = []
    for scheme, row in _rows_with_baseline(report):
        own = row is not report.baseline
        cells = [
            scheme,
            f"{row.elements_per_token_per_layer:,}",
            f"{row.elements_per_token:,}",
            human_bytes(row.bytes_per_token),
            f"{row.equivalent_gqa_groups:g}",
        ]
        cells += [_percent(row.fraction_of_mha) if own else ""] if wide else []
        cells += [_versus(report.reduction_of(row)) if own else ""] if report.baseline is not None else []
        cells += [row.formula] if wide else []
        rows.append(cells)
    return header, rows


def _grid_rows(report: CacheReport) -> tuple[list[str], list[list[Any]]]:
    """Cache bytes at every batch size × context, one row per scheme (the baseline last)."""
    grid = [(b, c) for b in report.batch_sizes for c in report.contexts]
    header = ["scheme"] + [_grid_label(b, c) for b, c in grid]
    rows = [[scheme] + [human_bytes(row.bytes_for(b, c)) for b, c in grid] for scheme, row in _rows_with_baseline(report)]
    return header, rows


def _rows_with_baseline(report: CacheReport) -> list[tuple[str, CacheRow]]:
    rows = [(r.scheme, r) for r in report.rows]
    if report.baseline is not None and report.baseline_shape is not None:
        b = report.baseline
        rows.append((f"baseline ({b.scheme}, {b.precision.name})", b))
    return rows


def _budget_rows(report: CacheReport) -> tuple[list[str], list[list[Any]]]:
    assert report.budget is not None
    header = ["scheme", "max tokens"] + [f"max sequences at {_tokens(c)}" for c in report.contexts]
    rows = []
    for row in report.rows:
        tokens = row.max_tokens(report.budget.available_bytes)
        rows.append([row.scheme, f"{tokens:,}"] + [f"{tokens // c:,}" for c in report.contexts])
    return header, rows


def _budget_caption(report: CacheReport) -> str:
    budget = report.budget
    assert budget is not None
    text = f"Budget {human_bytes(budget.memory_bytes)}"
    if budget.weight_bytes is not None and budget.weight_precision is not None:
        text += f" minus weights {human_bytes(budget.weight_bytes)} ({budget.weight_precision.name})"
    return text + f" = {human_bytes(budget.available_bytes)} for the cache"


def _measure_rows(measured: CacheMeasurement) -> tuple[list[str], list[list[Any]]]:
    header = ["cache", "predicted", "measured", "equal", "decode step"]
    rows = [
        [
            r.scheme,
            f"{r.predicted_bytes:,} B",
            f"{r.measured_bytes:,} B",
            "yes" if r.matches else "NO",
            f"{r.decode_step_seconds * 1e3:.2f} ms",
        ]
        for r in measured.rows
    ]
    return header, rows


def _measure_caption(measured: CacheMeasurement) -> str:
    what = "checkpoint weights" if measured.weights == "checkpoint" else "random weights"
    changes = f"; {'; '.join(measured.changes)}" if measured.changes else ""
    return (
        f"Measured on this machine: {measured.model}, {what}{changes}; {measured.config.num_hidden_layers} layers, "
        f"batch {measured.batch_size}, {measured.context} tokens ({measured.prompt_tokens} prefill + {measured.decode_steps} "
        f"decode), {measured.dtype}; logits of the two caches differ by {measured.logit_difference:.1e} (relative)"
        + (
            f"; bytes of rank 0 of {measured.ranks} (the latent cache is whole on every rank, the expanded one "
            f"holds the rank's share of the heads)"
            if measured.ranks > 1
            else ""
        )
    )


def _table(title: str, header: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        words = [w for cell in ([name] + ([r[0] for r in rows] if i == 0 else [])) for w in str(cell).split()]
        table.add_column(name, justify="right" if i else "left", min_width=max(map(len, words)))
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def render(report: CacheReport, measured: CacheMeasurement | None) -> None:
    s = report.shape
    title = (
        f"KV cache of {report.model} ({report.source}): {s.num_layers} layers, {s.num_heads} heads, "
        f"d_h {s.head_dim}, cache in {report.precision.name}"
        + ("" if report.baseline_shape is None else f"; baseline {report.baseline_shape.name}")
    )
    out.print(_table(title, *_size_rows(report, wide=False)))
    out.print(_table("Cache size (B = batch size, T = tokens per sequence)", *_grid_rows(report)))
    if report.budget is not None:
        out.print(_table(_budget_caption(report), *_budget_rows(report)))
    if measured is not None:
        out.print(_table(_measure_caption(measured), *_measure_rows(measured)))
    for line in report.explanation():
        out.print(line, soft_wrap=True)
    for note in report.notes:
        err.print(f"[dim]Note:[/] {note}")


def markdown(report: CacheReport, measured: CacheMeasurement | None) -> str:
    def table(header: list[str], rows: list[list[Any]]) -> str:
        return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)

    parts = [table(*_size_rows(report, wide=True)), table(*_grid_rows(report))]
    if report.budget is not None:
        parts.append(f"{_budget_caption(report)}\n\n" + table(*_budget_rows(report)))
    if measured is not None:
        parts.append(f"{_measure_caption(measured)}\n\n" + table(*_measure_rows(measured)))
    parts.extend(report.explanation())
    return "\n\n".join(parts) + "\n"


def csv_lines(report: CacheReport) -> str:
    """One line per scheme and grid point, with every number unformatted (the baseline as scheme ``baseline:NAME``)."""
    columns = [
        "scheme",
        "elements_per_token_per_layer",
        "elements_per_token",
        "bits_per_element",
        "bytes_per_token",
        "equivalent_gqa_groups",
        "batch_size",
        "context",
        "bytes",
    ]
    if report.budget is not None:
        columns += ["max_tokens", "max_sequences"]
    if report.baseline is not None:
        columns.append("reduction")
    rows: list[tuple[str, CacheRow]] = [(r.scheme, r) for r in report.rows]
    if report.baseline is not None and report.baseline_shape is not None:
        rows.append((f"baseline:{report.baseline_shape.name}", report.baseline))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for scheme, row in rows:
        for b in report.batch_sizes:
            for c in report.contexts:
                line: list[Any] = [
                    scheme,
                    row.elements_per_token_per_layer,
                    row.elements_per_token,
                    f"{row.precision.bits:g}",
                    f"{row.bytes_per_token:g}",
                    f"{row.equivalent_gqa_groups:g}",
                    b,
                    c,
                    f"{row.bytes_for(b, c):.0f}",
                ]
                if report.budget is not None:
                    tokens = row.max_tokens(report.budget.available_bytes)
                    line += [tokens, tokens // c]
                if report.baseline is not None:
                    line.append(f"{report.reduction_of(row):.6f}")
                writer.writerow(line)
    return buffer.getvalue()
