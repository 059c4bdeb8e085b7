"""`dsv2 expert-stats`: how real text loads the routed experts — histograms, balance metrics, drop rates, placement."""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dsv2cli.analysis.expert_export import DOCUMENT_FORMATS, LOAD_WRITERS, report_document, write_loads, write_text
from dsv2cli.analysis.expert_loads import read_loads
from dsv2cli.analysis.expert_report import ExpertStatsReport
from dsv2cli.analysis.expert_stats import DEFAULT_CAPACITY_FACTORS, StatsOptions, collect_expert_stats, report_from_loads
from dsv2cli.analysis.text_inputs import read_sequences
from dsv2cli.checkpoint.resolve import DEMO_NAME, bundled_model_dir
from dsv2cli.cli.common import err, handle_errors, pyplot_for
from dsv2cli.cli.expert_tables import render
from dsv2cli.cli.options import (
    Backend,
    BackendOption,
    DeviceOption,
    Dtype,
    DtypeOption,
    Format,
    ModelOption,
    ThreadsOption,
    format_option,
)
from dsv2cli.cli.torchrun import load, on_main_rank, torchrun_group
from dsv2cli.commit import Output
from dsv2cli.errors import InputError
from dsv2cli.model import ForwardOptions
from dsv2cli.parallel.expert_loads import gather_expert_loads

EPILOG = (
    "Examples:\n\n"
    "  dsv2 expert-stats\n\n"
    "  dsv2 expert-stats src/ --model ./DeepSeek-V2-Lite --seq-len 1024 --max-tokens 50000\n\n"
    "  dsv2 expert-stats data.jsonl --view heatmap --devices 8 --capacity-factor 1.0 --capacity-factor 1.5\n\n"
    "  dsv2 expert-stats notes.txt --apply-drop 1.0 --top-tokens 5\n\n"
    "  dsv2 expert-stats corpus/ --plan-devices 8 --redundant 8 --save-loads loads.json --plot loads.png\n\n"
    "  dsv2 expert-stats corpus/ --format json --output stats.json\n\n"
    "  curl -X POST localhost:8000/dump_expert_distribution_record -o dump.json\n\n"
    "  dsv2 expert-stats --loads dump.json --plan-devices 8 --save-loads eplb.json\n\n"
    "  torchrun --nproc-per-node 8 -m dsv2cli expert-stats corpus/ --model ./DeepSeek-V2\n\n"
    "INPUT is text files or directories (each file tokenised and cut into --seq-len sequences) or .jsonl files with "
    "'text' or 'prompt_token_ids' per line. With no INPUT the bundled demo model reads its bundled sample text. "
    "--loads reports loads recorded before (a --save-loads .json, a --format json report, or the dump of "
    "dsv2 serve's expert record) without running a model."
)

SAMPLE_NAME = "sample.txt"
StatsFormats = format_option(Format.text, Format.json, Format.csv, help="text, json (one document) or csv (layer,expert,count).")


class View(str, Enum):
    bars = "bars"
    heatmap = "heatmap"


class DropOrder(str, Enum):
    probs = "probs"
    position = "position"


class DropPolicy(str, Enum):
    device = "device"
    expert = "expert"


@handle_errors
def expert_stats(
    inputs: list[Path] = typer.Argument(None, help="Text files, directories or .jsonl files (default: the demo's sample text)."),
    model: ModelOption = None,
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per sequence (default: 512, or the model's context if shorter)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Stop after this many tokens of input."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    view: View = typer.Option(View.bars, "--view", help="bars (a row of bars per layer) or heatmap (layers x experts)."),
    devices: int = typer.Option(
        None, "--devices", help="Contiguous expert groups (devices) for the device metrics and drops (default: n_group, else 8)."
    ),
    placement: Path = typer.Option(
        None, "--placement", help="JSON placement: {'devices': \\[\\[experts of device 0], ...]} (see docs/expert-stats.md)."
    ),
    max_devices: int = typer.Option(
        None, "--max-devices", help="M of the communication balance (default: topk_group for device-limited routing, else top-k)."
    ),
    capacity_factors: list[float] = typer.Option(
        None, "--capacity-factor", help="Capacity factor to simulate (repeatable; default 1.0 1.25 1.5 2.0)."
    ),
    drop_order: DropOrder = typer.Option(
        DropOrder.probs, "--drop-order", help="Expert policy: drop the lowest probability (probs) or latest tokens (position)."
    ),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Tokens per capacity batch (default: one sequence)."),
    apply_drop: float = typer.Option(
        None, "--apply-drop", help="Run the model with dropping at this capacity factor; report loss/perplexity against none."
    ),
    apply_policy: DropPolicy = typer.Option(
        DropPolicy.device, "--apply-policy", help="Policy for --apply-drop: device or expert."
    ),
    top_tokens: int = typer.Option(0, "--top-tokens", help="List the K tokens most often routed to each expert."),
    plan_devices: int = typer.Option(None, "--plan-devices", help="Propose a balanced placement of the experts on N devices."),
    redundant: int = typer.Option(0, "--redundant", help="Replicas of the hottest experts for --plan-devices (EPLB style)."),
    format: StatsFormats = Format.text,
    output: Path = typer.Option(None, "--output", "-o", help="Write the json/csv report to this file instead of stdout."),
    save_loads: Path = typer.Option(
        None, "--save-loads", help="Write the \\[moe_layers, experts] load matrix (EPLB's input) as .json, .csv or .safetensors."
    ),
    plot: Path = typer.Option(None, "--plot", help="Draw the layers x experts heat map to a .png/.svg/.pdf (needs matplotlib)."),
    loads: Path = typer.Option(
        None,
        "--loads",
        help="Report recorded loads instead of running a model: a --save-loads .json, a --format json report, "
        "or a dsv2 serve /dump_expert_distribution_record answer.",
    ),
    device: DeviceOption = "auto",
    dtype: DtypeOption = Dtype.auto,
    threads: ThreadsOption = None,
    backend: BackendOption = Backend.auto,
) -> None:
    """Per-layer expert load of a DeepSeek-V2-family model on your own text: histograms, balance metrics (incl. the
    paper's expert/device/communication balance), token-drop rates per capacity factor, and a device placement."""
    choices = (batch_size, batch_tokens, capacity_factors, drop_order, devices, placement, max_devices, apply_drop)
    choices += (apply_policy, top_tokens, plan_devices, redundant)  # _options' arguments, with or without a model run
    if loads is not None:
        given = [
            name
            for name, value in (("INPUT", inputs), ("--model", model), ("--seq-len", seq_len), ("--max-tokens", max_tokens))
            if value
        ]
        if given:
            raise InputError(f"--loads reports recorded loads without running a model; leave out {', '.join(given)}")
        outputs = _Outputs(format, output, save_loads, plot)
        options = _options(*choices)
        report = report_from_loads(read_loads(loads), options, loads.name)
        outputs.write(report, view)
        return
    with torchrun_group(device, backend.value) as group:
        outputs = _Outputs(format, output, save_loads, plot)
        paths = on_main_rank(group, lambda: list(inputs or []) or [_default_sample(model)])  # rank 0 reads the input
        loaded = load(model, group, device, dtype.value, threads)
        config = loaded.model.config
        length = seq_len if seq_len is not None else min(512, config.max_position_embeddings)
        if length > config.max_position_embeddings:
            raise InputError(f"--seq-len {length} is longer than the model's context ({config.max_position_embeddings})")
        sequences = on_main_rank(group, lambda: read_sequences(paths, loaded.tokenizer, config.vocab_size, length, max_tokens))
        options = _options(*choices, loaded.options)
        passes = 2 if apply_drop is not None else 1
        with _progress(sequences.tokens, passes) as advance:
            report = collect_expert_stats(loaded.model, loaded.tokenizer, loaded.name, sequences, options, advance)
        if group is not None:
            for line in gather_expert_loads(group, config, report.load_matrix()).lines():
                err.print(f"[dim]{line}[/]", soft_wrap=True)
            if not group.is_main:
                return  # rank 0 renders the report and writes the files
        if sequences.truncated:
            err.print(f"[dim]--max-tokens stopped the input at {sequences.tokens} tokens[/]")
        err.print(
            f"[dim]{report.tokens} tokens in {report.sequences} sequences, {report.seconds:.2f} s "
            f"({report.tokens_per_second:.0f} tokens/s)[/]"
        )
        outputs.write(report, view)


def _options(
    batch_size: int,
    batch_tokens: int | None,
    capacity_factors: list[float] | None,
    drop_order: DropOrder,
    devices: int | None,
    placement: Path | None,
    max_devices: int | None,
    apply_drop: float | None,
    apply_policy: DropPolicy,
    top_tokens: int,
    plan_devices: int | None,
    redundant: int,
    forward: ForwardOptions | None = None,
) -> StatsOptions:
    return StatsOptions(
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        capacity_factors=tuple(capacity_factors) if capacity_factors else DEFAULT_CAPACITY_FACTORS,
        drop_order=drop_order.value,
        devices=devices,
        placement_file=placement,
        max_devices=max_devices,
        apply_drop=apply_drop,
        apply_policy=apply_policy.value,
        top_tokens=top_tokens,
        plan_devices=plan_devices,
        redundant=redundant,
        forward=forward if forward is not None else ForwardOptions(),
    )


class _Outputs:
    """The report's destinations, checked before any work: stdout (text, json or csv), --output, --save-loads, --plot."""

    def __init__(self, format: Format, output: Path | None, save_loads: Path | None, plot: Path | None) -> None:
        self.format, self.output, self.save_loads, self.plot = format, output, save_loads, plot
        self.document_format = _document_format(format, output)
        for path in (save_loads, plot):
            if path is not None and not path.parent.is_dir():
                raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
        if save_loads is not None and save_loads.suffix.lower() not in LOAD_WRITERS:
            raise InputError(f"--save-loads writes {', '.join(LOAD_WRITERS)} files, not '{save_loads.name}'")
        self.pyplot = None if plot is None else pyplot_for(plot)  # before any work: a missing matplotlib fails at once
        self.files = {
            flag: Output.claim(path, kind="file", replace=True, what=flag) for flag, path in _files(output, save_loads, plot)
        }

    def write(self, report: ExpertStatsReport, view: View) -> None:
        document = None if self.document_format is None else report_document(report, self.document_format)
        if self.output is not None and document is not None:
            write_text(self.files["--output"], document)
            err.print(f"wrote {self.output}")
        if self.format == Format.text:
            render(report, heatmap=view == View.heatmap)
        elif self.output is None and document is not None:
            sys.stdout.write(document)
            sys.stdout.flush()
        if self.save_loads is not None:
            write_loads(report, self.files["--save-loads"])
            err.print(f"wrote {self.save_loads}")
        if self.pyplot is not None:
            _plot(self.pyplot, report, self.files["--plot"])
            err.print(f"wrote {self.plot}")


def _document_format(format: Format, output: Path | None) -> str | None:
    """json / csv for stdout or --output; a text report with --output takes the format from the file's suffix."""
    if format != Format.text:
        return format.value
    if output is None:
        return None
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in DOCUMENT_FORMATS:
        raise InputError(f"--output {output.name}: choose --format json or csv (or name the file .json / .csv)")
    return suffix


def _default_sample(model: str | None) -> Path:
    directory = bundled_model_dir() if model in (None, DEMO_NAME) else None
    sample = directory / SAMPLE_NAME if directory is not None else None
    if sample is None or not sample.is_file():
        raise InputError("no input given", hint="pass text files, directories or .jsonl files to analyse")
    return sample


class _progress:
    """A rich progress bar on stderr with tokens done and tokens/s, one task per pass over the input."""

    def __init__(self, tokens: int, passes: int) -> None:
        self.tokens = tokens
        self.passes = passes
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Callable[[str, int], None]:
        self.bar.start()
        return self.advance

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def advance(self, phase: str, tokens: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=self.tokens, rate="")
        task = self.tasks[phase]
        self.bar.advance(task, tokens)
        speed = self.bar.tasks[task].speed
        self.bar.update(task, rate=f"{speed:,.0f} tokens/s" if speed else "")


def _files(output: Path | None, save_loads: Path | None, plot: Path | None) -> list[tuple[str, Path]]:
    """The files this run writes, by option; two options naming one file are refused."""
    named = [(flag, path) for flag, path in (("--output", output), ("--save-loads", save_loads), ("--plot", plot)) if path]
    resolved = [path.resolve() for _, path in named]
    if len(set(resolved)) < len(resolved):
        raise InputError("--output, --save-loads and --plot must name different files")
    return named


def _plot(plt: Any, report: ExpertStatsReport, path: Output) -> None:
    """Layers x experts heat map of load / layer mean; written atomically."""
    rows = [[c / (sum(layer.counts) / len(layer.counts)) for c in layer.counts] for layer in report.layers]
    fig, ax = plt.subplots(figsize=(min(4 + report.n_routed_experts * 0.12, 24), 1.5 + len(rows) * 0.3))
    image = ax.imshow(rows, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [str(layer.layer) for layer in report.layers])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert load / layer mean: {report.model}, {report.tokens:,} tokens, top-{report.top_k}")
    fig.colorbar(image, ax=ax, label="load / mean")
    try:
        with path.staged() as staging:
            fig.savefig(staging, dpi=120, bbox_inches="tight", format=path.path.suffix[1:].lower())
    finally:
        plt.close(fig)
