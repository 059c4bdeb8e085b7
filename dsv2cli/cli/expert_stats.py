"""`dsv2 expert-stats`: how real text loads the routed experts — histograms, balance metrics, drop rates, placement."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dsv2cli.analysis.expert_stats import (
    DEFAULT_CAPACITY_FACTORS,
    ExpertStatsReport,
    LayerStats,
    StatsOptions,
    collect_expert_stats,
)
from dsv2cli.analysis.text_inputs import read_sequences
from dsv2cli.checkpoint.resolve import DEMO_NAME, bundled_model_dir
from dsv2cli.cli.common import LoadStatus, err, handle_errors, out, pyplot_for
from dsv2cli.commit import Output
from dsv2cli.errors import InputError
from dsv2cli.parallel import distributed_run, from_main_rank
from dsv2cli.parallel.expert_loads import gather_expert_loads
from dsv2cli.parallel.session import load_model

EPILOG = (
    "Examples:\n\n"
    "  dsv2 expert-stats\n\n"
    "  dsv2 expert-stats src/ --model ./DeepSeek-V2-Lite --seq-len 1024 --max-tokens 50000\n\n"
    "  dsv2 expert-stats data.jsonl --view heatmap --devices 8 --capacity-factor 1.0 --capacity-factor 1.5\n\n"
    "  dsv2 expert-stats notes.txt --apply-drop 1.0 --top-tokens 5\n\n"
    "  dsv2 expert-stats corpus/ --plan-devices 8 --redundant 8 --save-loads loads.json --plot loads.png\n\n"
    "  dsv2 expert-stats corpus/ --format json --output stats.json\n\n"
    "  torchrun --nproc-per-node 8 -m dsv2cli expert-stats corpus/ --model ./DeepSeek-V2\n\n"
    "INPUT is text files or directories (each file tokenised and cut into --seq-len sequences) or .jsonl files with "
    "'text' or 'prompt_token_ids' per line. With no INPUT the bundled demo model reads its bundled sample text."
)

SAMPLE_NAME = "sample.txt"
BARS = " ▁▂▃▄▅▆▇█"
# Heat map colours from cold (no load) through even (1x the mean) to hot (2x the mean or more).
SHADES = " ░▒▓█"  # the same levels without colour, for terminals and logs that strip it
HEAT = ["#2c3e91", "#3b6fb6", "#4fa3c7", "#7cc6a4", "#b8d86b", "#f2d04a", "#f39c35", "#e0582b", "#b3202a"]


class View(str, Enum):
    bars = "bars"
    heatmap = "heatmap"


class StatsFormat(str, Enum):
    text = "text"
    json = "json"
    csv = "csv"


class DropOrder(str, Enum):
    probs = "probs"
    position = "position"


class DropPolicy(str, Enum):
    device = "device"
    expert = "expert"


@handle_errors
def expert_stats(
    inputs: list[Path] = typer.Argument(None, help="Text files, directories or .jsonl files (default: the demo's sample text)."),
    model: str = typer.Option(
        None, "--model", "-m", help="Checkpoint directory, Hub repo id, or 'demo' (default: the bundled model)."
    ),
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
    format: StatsFormat = typer.Option(
        StatsFormat.text, "--format", "-f", help="text, json (one document) or csv (layer,expert,count)."
    ),
    output: Path = typer.Option(None, "--output", "-o", help="Write the json/csv report to this file instead of stdout."),
    save_loads: Path = typer.Option(
        None, "--save-loads", help="Write the \\[moe_layers, experts] load matrix (EPLB's input) as .json, .csv or .safetensors."
    ),
    plot: Path = typer.Option(None, "--plot", help="Draw the layers x experts heat map to a .png/.svg/.pdf (needs matplotlib)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto, float32, bfloat16 or float16 (auto: float32 on CPU when it fits, else the stored dtype)."
    ),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
    backend: str = typer.Option(
        "auto", "--backend", help="Under torchrun: gloo, nccl or auto (nccl on GPUs, gloo on CPU; env DSV2_BACKEND)."
    ),
) -> None:
    """Per-layer expert load of a DeepSeek-V2-family model on your own text: histograms, balance metrics (incl. the
    paper's expert/device/communication balance), token-drop rates per capacity factor, and a device placement."""
    with distributed_run(device, backend) as group:  # group is None unless launched by torchrun
        document_format = _document_format(format, output)
        for path in (save_loads, plot):
            if path is not None and not path.parent.is_dir():
                raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
        if save_loads is not None and save_loads.suffix.lower() not in LOAD_WRITERS:
            raise InputError(f"--save-loads writes {', '.join(LOAD_WRITERS)} files, not '{save_loads.name}'")
        pyplot = None if plot is None else pyplot_for(plot)  # before any work: a missing matplotlib fails at once
        files = {
            flag: Output.claim(path, kind="file", replace=True, what=flag) for flag, path in _files(output, save_loads, plot)
        }
        paths = from_main_rank(group, lambda: list(inputs or []) or [_default_sample(model)])  # rank 0 reads the input
        loaded, shards = load_model(model, group, device, dtype, threads, progress=LoadStatus())
        if shards is not None:
            for line in shards.lines():
                err.print(f"[dim]{line}[/]", soft_wrap=True)
        config = loaded.model.config
        length = seq_len if seq_len is not None else min(512, config.max_position_embeddings)
        if length > config.max_position_embeddings:
            raise InputError(f"--seq-len {length} is longer than the model's context ({config.max_position_embeddings})")
        sequences = from_main_rank(group, lambda: read_sequences(paths, loaded.tokenizer, config.vocab_size, length, max_tokens))
        options = StatsOptions(
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
            forward=loaded.options,
        )
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

        document = None
        if document_format is not None:
            document = json.dumps(report.to_json(), indent=2) + "\n" if document_format == "json" else _csv(report)
        if output is not None and document is not None:
            _write(files["--output"], lambda tmp: Path(tmp).write_text(document, encoding="utf-8"))
            err.print(f"wrote {output}")
        if format == StatsFormat.text:
            _render(report, view)
        elif output is None and document is not None:
            sys.stdout.write(document)
            sys.stdout.flush()
        if save_loads is not None:
            LOAD_WRITERS[save_loads.suffix.lower()](report, files["--save-loads"])
            err.print(f"wrote {save_loads}")
        if pyplot is not None:
            _plot(pyplot, report, files["--plot"])
            err.print(f"wrote {plot}")


def _document_format(format: StatsFormat, output: Path | None) -> str | None:
    """json / csv for stdout or --output; a text report with --output takes the format from the file's suffix."""
    if format != StatsFormat.text:
        return format.value
    if output is None:
        return None
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in ("json", "csv"):
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


def _write(target: Output, write: Callable[[str], None]) -> None:
    """Write through a staging file beside the target (:class:`dsv2cli.commit.Output`): nothing half-written."""
    try:
        with target.staged() as tmp:
            write(str(tmp))
    except OSError as exc:
        raise InputError(f"could not write {target.path}: {exc.strerror or exc}") from None


def _csv(report: ExpertStatsReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "expert", "count", "load_fraction"])
    for layer in report.layers:
        for expert, (count, share) in enumerate(zip(layer.counts, layer.load_fraction, strict=True)):
            writer.writerow([layer.layer, expert, count, f"{share:.6g}"])
    return buffer.getvalue()


def _save_loads_json(report: ExpertStatsReport, path: Output) -> None:
    doc = {
        "layers": [layer.layer for layer in report.layers],
        "n_routed_experts": report.n_routed_experts,
        "tokens": report.tokens,
        "top_k": report.top_k,
        "loads": report.load_matrix(),
    }
    _write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc) + "\n", encoding="utf-8"))


def _save_loads_csv(report: ExpertStatsReport, path: Output) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", *(f"expert_{e}" for e in range(report.n_routed_experts))])
    for layer in report.layers:
        writer.writerow([layer.layer, *layer.counts])
    _write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))


def _save_loads_safetensors(report: ExpertStatsReport, path: Output) -> None:
    import torch
    from safetensors.torch import save_file

    loads = torch.tensor(report.load_matrix(), dtype=torch.int64)  # [moe_layers, experts]
    metadata = {"layers": json.dumps([layer.layer for layer in report.layers]), "tokens": str(report.tokens)}
    _write(path, lambda tmp: save_file({"loads": loads}, tmp, metadata=metadata))


LOAD_WRITERS = {".json": _save_loads_json, ".csv": _save_loads_csv, ".safetensors": _save_loads_safetensors}


def _render(report: ExpertStatsReport, view: View) -> None:
    shared = report.n_shared_experts
    out.print(
        f"[bold]{report.model}[/] · {report.tokens:,} tokens in {report.sequences} sequences"
        + (" (cut by --max-tokens)" if report.truncated else "")
        + f" · {len(report.layers)} MoE layers · {report.n_routed_experts} routed experts, top-{report.top_k}"
        + f" · {shared} shared expert{'s' if shared != 1 else ''} (every token)"
        + f" · {report.devices} devices ({report.placement}), M = {report.max_devices}",
        soft_wrap=True,
    )
    out.print()
    (_render_heatmap if view == View.heatmap else _render_bars)(report)
    _render_metrics(report)
    _render_summary(report)
    _render_drops(report)
    if report.apply is not None:
        a = report.apply
        how = a.policy + (f", {a.drop_order} order" if a.drop_order else "")
        out.print(
            f"[bold]Dropping applied[/] ({how}, capacity factor {a.capacity_factor:g}): loss {a.loss:.4f} → "
            f"{a.loss_with_drop:.4f} ({a.loss_with_drop - a.loss:+.4f}), perplexity {a.perplexity:.3f} → "
            f"{a.perplexity_with_drop:.3f} over {a.predicted_tokens:,} predicted tokens; "
            f"{a.assignment_drop_rate:.2%} of routed assignments dropped",
            soft_wrap=True,
        )
        out.print()
    if report.layers[0].top_tokens is not None:
        _render_top_tokens(report)
    if report.plan is not None:
        _render_plan(report)


def _render_bars(report: ExpertStatsReport) -> None:
    out.print("[bold]Load per routed expert[/] (bar height relative to the layer's busiest expert; ■ = shared experts)")
    for layer in report.layers:
        peak = max(layer.counts) or 1
        bars = "".join(BARS[round(c / peak * (len(BARS) - 1))] for c in layer.counts)
        line = Text(f"L{layer.layer:<3} ")
        line.append(bars, style="cyan")
        line.append(f"  max/mean {layer.metrics.max_over_mean:4.2f}  ")
        line.append("■" * min(report.n_shared_experts, 4), style="magenta")
        out.print(line, soft_wrap=True)
    out.print()


def _render_heatmap(report: ExpertStatsReport) -> None:
    out.print("[bold]Load per routed expert[/] (colour = load / layer mean; ■ = shared experts, always active)")
    for layer in report.layers:
        mean = sum(layer.counts) / len(layer.counts) or 1
        line = Text(f"L{layer.layer:<3} ")
        for count in layer.counts:
            level = min(round(count / mean / 2 * (len(HEAT) - 1)), len(HEAT) - 1)
            line.append(SHADES[level * (len(SHADES) - 1) // (len(HEAT) - 1)], style=HEAT[level])
        line.append("  ")
        line.append("■" * min(report.n_shared_experts, 4), style="magenta")
        out.print(line, soft_wrap=True)
    legend = Text("     ")
    for index, colour in enumerate(HEAT):
        legend.append(SHADES[index * (len(SHADES) - 1) // (len(HEAT) - 1)], style=colour)
        if index in (0, len(HEAT) // 2, len(HEAT) - 1):
            legend.append(f" {index / (len(HEAT) - 1) * 2:g}x ")
    out.print(legend)
    out.print()


def _table(title: str, columns: tuple[str, ...], left: int = 0) -> Table:
    """A compact table (two-line headers keep it within 80 columns)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for index, name in enumerate(columns):
        table.add_column(name, justify="left" if index < left else "right")
    return table


def _render_metrics(report: ExpertStatsReport) -> None:
    columns = (
        "layer",
        "max\n/mean",
        "min\n/mean",
        "CV",
        "entropy",
        "mean\n/max",
        "Σf·P\nexpert",
        "Σf·P\ndevice",
        "Σf·P\ncomm",
        "device\nmean/max",
    )
    table = _table("Balance per MoE layer", columns)
    for layer in report.layers:
        m = layer.metrics
        table.add_row(
            str(layer.layer),
            f"{m.max_over_mean:.2f}",
            f"{m.min_over_mean:.2f}",
            f"{m.cv:.3f}",
            f"{m.normalized_entropy:.3f}",
            f"{m.balancedness:.3f}",
            f"{layer.expert_balance:.3f}",
            f"{layer.device_balance:.3f}",
            f"{layer.communication_balance:.3f}",
            f"{layer.device_balancedness:.3f}",
        )
    out.print(table)
    out.print(
        "[dim]mean/max is the balancedness of vLLM and SGLang; entropy is normalised to 1; Σf·P is the paper's balance "
        "quantity per sequence (1.0 = even), averaged over sequences; device mean/max uses the device loads.[/]",
        soft_wrap=True,
    )
    out.print()


def _render_summary(report: ExpertStatsReport) -> None:
    table = _table("Across layers", ("metric", "mean", "min", "p50", "p90", "max", "worst layer"), left=1)
    for name, s in report.summary.items():
        table.add_row(name, *(f"{v:.3f}" for v in (s.mean, s.min, s.p50, s.p90, s.max)), str(s.worst_layer))
    out.print(table)
    out.print()


def _render_drops(report: ExpertStatsReport) -> None:
    batches = f"{report.batch_tokens} tokens" if report.batch_tokens else "one sequence"
    columns = ("policy", "order", "capacity\nfactor", "assignments\ndropped", "tokens\nhit", "tokens all\ndropped", "worst layer")
    table = _table(f"Token dropping simulated on this routing (budget per batch of {batches})", columns, left=2)
    for index, d in enumerate(report.drop_overall):
        worst = max(report.layers, key=lambda layer: layer.drop[index].assignment_drop_rate)
        table.add_row(
            d.policy,
            d.order or "affinity",
            f"{d.capacity_factor:g}",
            f"{d.assignment_drop_rate:.2%}",
            f"{d.token_drop_rate:.2%}",
            f"{d.full_drop_rate:.2%}",
            f"L{worst.layer} {worst.drop[index].assignment_drop_rate:.2%}",
        )
    out.print(table)
    out.print(
        "[dim]device: budget ceil(cf·T·K/D) per device, lowest affinity dropped (DeepSeek-V2 §2.2.4); expert: "
        "ceil(cf·T·K/E) per expert (GShard/Switch). tokens hit = at least one routed expert dropped.[/]",
        soft_wrap=True,
    )
    out.print()


def _render_top_tokens(report: ExpertStatsReport) -> None:
    for layer in report.layers:
        _top_tokens_table(layer)


def _top_tokens_table(layer: LayerStats) -> None:
    assert layer.top_tokens is not None
    table = _table(f"Layer {layer.layer}: tokens most often routed to each expert", ("expert", "load", "top tokens (count)"))
    table.columns[2].justify = "left"
    for expert, tokens in enumerate(layer.top_tokens):
        shown = ", ".join(f"{json.dumps(t.text) if t.text is not None else t.token_id} ({t.count})" for t in tokens)
        table.add_row(str(expert), f"{layer.load_fraction[expert]:.2%}", Text(shown))
    out.print(table)
    out.print()


def _render_plan(report: ExpertStatsReport) -> None:
    plan = report.plan
    assert plan is not None
    title = f"Placement on {plan.num_devices} devices, {plan.redundant} redundant experts (device mean/max load)"
    table = _table(title, ("layer", "contiguous", "planned", "busiest device before → after"))
    for p in plan.layers:
        table.add_row(
            str(p.layer),
            f"{p.balancedness_before:.3f}",
            f"{p.balancedness_after:.3f}",
            f"{max(p.loads_before):,.0f} → {max(p.loads_after):,.0f}",
        )
    table.add_row("mean", f"{plan.mean_before:.3f}", f"{plan.mean_after:.3f}", "", style="bold")
    out.print(table)
    out.print(
        "[dim]The planned experts per device are in --format json (plan.layers[].devices); with --redundant 0 "
        "that JSON file can be passed back as --placement. Planned and measured on the same text.[/]",
        soft_wrap=True,
    )


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
        _write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.path.suffix[1:].lower()))
    finally:
        plt.close(fig)
