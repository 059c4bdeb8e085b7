"""`dsv2 cache-report`: KV-cache memory of MLA against MHA, GQA and MQA, predicted and measured."""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from dsv2cli.analysis.kv_cache import DEFAULT_CONTEXTS, CacheRow, parse_memory, parse_schemes, parse_tokens, precision
from dsv2cli.analysis.kv_report import CacheReport, build_cache_report, resolve_baseline
from dsv2cli.checkpoint.resolve import ResolvedConfig, resolve_config
from dsv2cli.cli.common import emit_json, err, handle_errors, human_bytes, out, pyplot_for
from dsv2cli.commit import Output
from dsv2cli.errors import InputError
from dsv2cli.parallel import ParallelGroup, distributed_run, load_sharded, parallelize
from dsv2cli.parallel.group import gather_objects
from dsv2cli.presets import BASELINE_PRESETS

EPILOG = (
    "Examples:\n\n"
    "  dsv2 cache-report\n\n"
    "  dsv2 cache-report deepseek-v2-lite --context 32k --batch-size 1 --batch-size 8\n\n"
    "  dsv2 cache-report deepseek-v2 --kv-bits 6 --baseline deepseek-67b --baseline-dtype bfloat16\n\n"
    "  dsv2 cache-report deepseek-v2 --memory 640GiB --minus-weights --weight-dtype fp8 --context 128k\n\n"
    "  dsv2 cache-report ./DeepSeek-V2-Lite --schemes mla,mla-expanded,gqa:2,4,8 --format json\n\n"
    "  dsv2 cache-report tiny --measure --measure-context 512\n\n"
    "MODEL is a preset (deepseek-v2, deepseek-v2-lite, ...), a checkpoint directory, a config.json or a Hugging Face "
    "repo id (only its config.json is fetched). Schemes: mla (what dsv2 caches), mla-expanded (per-head K and V, what "
    "the original HF code caches), mha, gqa:G, mqa."
)


class ReportFormat(str, Enum):
    text = "text"
    json = "json"
    csv = "csv"
    markdown = "markdown"


@handle_errors
def cache_report(
    model: str = typer.Argument("deepseek-v2", help="Preset, checkpoint directory, config.json or Hub repo id."),
    schemes: list[str] = typer.Option(
        None, "--schemes", "-s", help="Comma-separated: mla, mla-expanded, mha, gqa:G (gqa:2,4,8 for several), mqa. Default: all."
    ),
    batch_sizes: list[int] = typer.Option(None, "--batch-size", "-b", help="Sequences in the batch (repeatable; default 1)."),
    contexts: list[str] = typer.Option(
        None, "--context", "-c", help="Tokens per sequence, e.g. 4096 or 128k (repeatable; default 4k, 32k, 128k)."
    ),
    dtype: str = typer.Option(None, "--dtype", help="Cache precision: float32, bfloat16 (default), float16, fp8, int8."),
    kv_bits: float = typer.Option(None, "--kv-bits", help="Average bits per cached element of a quantised cache (e.g. 6)."),
    memory: str = typer.Option(None, "--memory", help="Memory budget, e.g. 80GiB: max tokens and sequences per scheme."),
    minus_weights: bool = typer.Option(False, "--minus-weights", help="Subtract the model's weights from --memory."),
    weight_dtype: str = typer.Option("bfloat16", "--weight-dtype", help="Weight precision for --minus-weights."),
    baseline: str = typer.Option(
        None, "--baseline", help="Compare with another model: deepseek-67b, a dsv2 preset, or a (Llama-style) config.json."
    ),
    baseline_dtype: str = typer.Option(None, "--baseline-dtype", help="Cache precision of the baseline (default bfloat16)."),
    baseline_bits: float = typer.Option(None, "--baseline-bits", help="Bits per cached element of the baseline."),
    format: ReportFormat = typer.Option(ReportFormat.text, "--format", "-f", help="text, json, csv or markdown."),
    plot: Path = typer.Option(None, "--plot", help="Draw cache size against context to this .png/.svg/.pdf (needs matplotlib)."),
    measure: bool = typer.Option(
        False, "--measure", help="Run prefill + decode with the latent and an expanded K/V cache; compare bytes and step time."
    ),
    measure_layers: int = typer.Option(
        None, "--measure-layers", help="Layers of the random model for --measure (default: all of a small model, else 2)."
    ),
    measure_context: str = typer.Option("256", "--measure-context", help="Tokens per sequence for --measure."),
    measure_batch: int = typer.Option(1, "--measure-batch", help="Sequences for --measure."),
    decode_steps: int = typer.Option(8, "--decode-steps", help="Decode steps timed by --measure."),
    backend: str = typer.Option(
        "auto", "--backend", help="Under torchrun (--measure on a split model): gloo, nccl or auto (env DSV2_BACKEND)."
    ),
) -> None:
    """KV-cache size of a DeepSeek-V2-family model under MLA, MLA expanded, MHA, GQA and MQA: per token, per sequence,
    over a batch × context grid, within a memory budget and against a baseline model."""
    if model.lower() in BASELINE_PRESETS:
        raise InputError(f"'{model}' is a baseline, not a DeepSeek-V2-family model", hint=f"use --baseline {model}")
    if minus_weights and memory is None:
        raise InputError("--minus-weights needs --memory")
    if measure and format == ReportFormat.csv:
        raise InputError("--measure results do not fit the CSV table", hint="use --format json or markdown")
    pyplot = None if plot is None else pyplot_for(plot)
    plot_file = None if plot is None else Output.claim(plot, kind="file", replace=True, what="--plot")
    resolved = resolve_config(model)
    config = resolved.config
    report = build_cache_report(
        config,
        resolved.name,
        resolved.source,
        parse_schemes(schemes, config.num_attention_heads),
        precision(dtype, kv_bits),
        list(batch_sizes or [1]),
        [parse_tokens(c) for c in contexts] if contexts else list(DEFAULT_CONTEXTS),
        memory_bytes=None if memory is None else parse_memory(memory),
        weight_precision=precision(weight_dtype) if minus_weights else None,
        baseline=None if baseline is None else resolve_baseline(baseline),
        baseline_precision=precision(baseline_dtype, baseline_bits),
    )
    with distributed_run("auto", backend) as group:  # group is None unless launched by torchrun; rank 0 prints
        measured = (
            _measure(resolved, report, measure_layers, parse_tokens(measure_context), measure_batch, decode_steps, group)
            if measure
            else None
        )
        if pyplot is not None:
            _plot(pyplot, report, plot_file)
            err.print(f"wrote {plot}")
        if format == ReportFormat.json:
            doc = report.to_json()
            doc["measured"] = None if measured is None else measured.to_json()
            emit_json(doc)
        elif format == ReportFormat.csv:
            sys.stdout.write(_csv(report))
        elif format == ReportFormat.markdown:
            sys.stdout.write(_markdown(report, measured))
        else:
            _render(report, measured)


def _measure(
    resolved: ResolvedConfig,
    report: CacheReport,
    layers: int | None,
    context: int,
    batch: int,
    steps: int,
    group: ParallelGroup | None,
) -> Any:
    """Measure on this process, or under torchrun on the model split across the ranks (bytes of rank 0)."""
    from dsv2cli.analysis.kv_measure import measure_cache
    from dsv2cli.checkpoint.loader import load_checkpoint

    directory = resolved.directory if resolved.source in ("directory", "bundled") else None
    checkpoint = directory if directory is not None and any(directory.glob("*.safetensors")) else None
    with err.status("measuring the KV cache") as status:
        measured = measure_cache(
            resolved.config,
            resolved.name,
            batch_size=batch,
            context=context,
            decode_steps=steps,
            dtype=report.precision.name,
            layers=layers,
            checkpoint=checkpoint,
            on_stage=status.update,
            load=load_checkpoint
            if group is None
            else (lambda path, dtype, working: load_sharded(path, group, dtype, working=working)),
            prepare=None if group is None else (lambda model: parallelize(model, group)),
        )
    if group is None:
        return measured
    every = gather_objects(group, [(r.scheme, r.predicted_bytes, r.measured_bytes) for r in measured.rows])
    for rank, rows in enumerate(every):
        err.print(
            f"[dim]rank {rank}: " + ", ".join(f"{scheme} {got:,} B (predicted {want:,})" for scheme, want, got in rows) + "[/]"
        )
    return dataclasses.replace(measured, ranks=group.world_size)


# Rendering ---------------------------------------------------------------------------------------------------------


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


def _measure_rows(measured: Any) -> tuple[list[str], list[list[Any]]]:
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


def _measure_caption(measured: Any) -> str:
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


def _render(report: CacheReport, measured: Any) -> None:
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


def _markdown(report: CacheReport, measured: Any) -> str:
    from tabulate import tabulate

    def table(header: list[str], rows: list[list[Any]]) -> str:
        return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)

    parts = [table(*_size_rows(report, wide=True)), table(*_grid_rows(report))]
    if report.budget is not None:
        parts.append(f"{_budget_caption(report)}\n\n" + table(*_budget_rows(report)))
    if measured is not None:
        parts.append(f"{_measure_caption(measured)}\n\n" + table(*_measure_rows(measured)))
    parts.extend(report.explanation())
    return "\n\n".join(parts) + "\n"


def _csv(report: CacheReport) -> str:
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


def _plot(plt: Any, report: CacheReport, target: Output) -> None:
    """Cache bytes against context (log-log) for every scheme at the first batch size; written atomically."""
    batch = report.batch_sizes[0]
    top = max(report.contexts)
    contexts = sorted({2**k for k in range(9, 32) if 2**k <= top} | set(report.contexts))
    fig, ax = plt.subplots(figsize=(8, 5))
    lines: list[tuple[str, CacheRow, str]] = [(r.scheme, r, "-") for r in report.rows]
    if report.baseline is not None and report.baseline_shape is not None:
        lines.append((f"baseline {report.baseline_shape.name} ({report.baseline.precision.name})", report.baseline, "--"))
    for label, row, style in lines:
        ax.plot(contexts, [row.bytes_for(batch, c) / 2**30 for c in contexts], style, marker="o", markersize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("KV cache (GiB)")
    ax.set_title(f"KV cache of {report.model}, batch {batch}, {report.precision.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    try:
        with target.staged() as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=target.path.suffix[1:].lower())
    except OSError as exc:
        raise InputError(f"could not write {target.path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
