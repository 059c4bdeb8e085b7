"""`dsv2 cache-report`: KV-cache memory of MLA against MHA, GQA and MQA, predicted and measured."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import typer

from dsv2cli.analysis.kv_cache import DEFAULT_CONTEXTS, CacheRow, parse_memory, parse_schemes, parse_tokens, precision
from dsv2cli.analysis.kv_measure import CacheMeasurement, measure_cache
from dsv2cli.analysis.kv_report import CacheReport, build_cache_report, resolve_baseline
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.resolve import ResolvedConfig, resolve_config
from dsv2cli.cli.cache_tables import csv_lines, markdown, render
from dsv2cli.cli.common import emit_json, err, handle_errors, pyplot_for
from dsv2cli.cli.options import Backend, BackendOption, Format, format_option
from dsv2cli.cli.torchrun import torchrun_group
from dsv2cli.commit import Output
from dsv2cli.errors import InputError
from dsv2cli.parallel import ParallelGroup, load_sharded, parallelize
from dsv2cli.parallel.group import gather_objects
from dsv2cli.presets import BASELINE_PRESETS

ReportFormats = format_option(Format.text, Format.json, Format.csv, Format.markdown, help="text, json, csv or markdown.")

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
    # The cache's precision, which may be fp8 or int8: not the compute dtype of the shared --dtype option.
    dtype: str = typer.Option(None, "--dtype", help="Cache precision: float32, bfloat16 (default), float16, fp8, int8, int4."),
    kv_bits: float = typer.Option(None, "--kv-bits", help="Average bits per cached element of a quantised cache (e.g. 6)."),
    memory: str = typer.Option(None, "--memory", help="Memory budget, e.g. 80GiB: max tokens and sequences per scheme."),
    minus_weights: bool = typer.Option(False, "--minus-weights", help="Subtract the model's weights from --memory."),
    weight_dtype: str = typer.Option(
        "bfloat16",
        "--weight-dtype",
        help="Weight precision for --minus-weights (int4: 4 bits a parameter; dsv2 info gives an int4 checkpoint's exact size).",
    ),
    baseline: str = typer.Option(
        None, "--baseline", help="Compare with another model: deepseek-67b, a dsv2 preset, or a (Llama-style) config.json."
    ),
    baseline_dtype: str = typer.Option(None, "--baseline-dtype", help="Cache precision of the baseline (default bfloat16)."),
    baseline_bits: float = typer.Option(None, "--baseline-bits", help="Bits per cached element of the baseline."),
    format: ReportFormats = Format.text,
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
    backend: BackendOption = Backend.auto,
) -> None:
    """KV-cache size of a DeepSeek-V2-family model under MLA, MLA expanded, MHA, GQA and MQA: per token, per sequence,
    over a batch × context grid, within a memory budget and against a baseline model."""
    if model.lower() in BASELINE_PRESETS:
        raise InputError(f"'{model}' is a baseline, not a DeepSeek-V2-family model", hint=f"use --baseline {model}")
    if minus_weights and memory is None:
        raise InputError("--minus-weights needs --memory")
    if measure and format == Format.csv:
        raise InputError("--measure results do not fit the CSV table", hint="use --format json or markdown")
    pyplot = None if plot is None else pyplot_for(plot)
    plot_file = None if plot is None else Output.claim(plot, kind="file", replace=True, what="`plot`")
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
    with torchrun_group("auto", backend.value) as group:  # under torchrun --measure splits the model; rank 0 prints
        measured = (
            _measure(resolved, report, measure_layers, parse_tokens(measure_context), measure_batch, decode_steps, group)
            if measure
            else None
        )
        if pyplot is not None:
            _plot(pyplot, report, plot_file)
            err.print(f"wrote {plot}")
        if format == Format.json:
            doc = report.to_json()
            doc["measured"] = None if measured is None else measured.to_json()
            emit_json(doc)
        elif format == Format.csv:
            sys.stdout.write(csv_lines(report))
        elif format == Format.markdown:
            sys.stdout.write(markdown(report, measured))
        else:
            render(report, measured)


def _measure(
    resolved: ResolvedConfig,
    report: CacheReport,
    layers: int | None,
    context: int,
    batch: int,
    steps: int,
    group: ParallelGroup | None,
) -> CacheMeasurement:
    """Measure on this process, or under torchrun on the model split across the ranks (bytes of rank 0)."""
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
        with target.staged() as staging:
            fig.savefig(staging, dpi=120, bbox_inches="tight", format=target.path.suffix[1:].lower())
    finally:
        plt.close(fig)
