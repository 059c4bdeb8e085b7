"""How `dsv2 expert-stats` shows a report in the terminal: load bars or a heat map, then its tables (rich)."""

from __future__ import annotations

import json

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dsv2cli.analysis.expert_report import ExpertStatsReport, LayerStats
from dsv2cli.cli.common import out

BARS = " ▁▂▃▄▅▆▇█"
# Heat map colours from cold (no load) through even (1x the mean) to hot (2x the mean or more).
SHADES = " ░▒▓█"  # the same levels without colour, for terminals and logs that strip it
HEAT = ["#2c3e91", "#3b6fb6", "#4fa3c7", "#7cc6a4", "#b8d86b", "#f2d04a", "#f39c35", "#e0582b", "#b3202a"]


def render(report: ExpertStatsReport, heatmap: bool) -> None:
    """The whole report as rich text on stdout: loads (bars or a heat map), balance, drops, applied drop, tokens, plan."""
    shared = report.n_shared_experts
    source = (
        f"{report.tokens:,} tokens in {report.sequences} sequences"
        if report.loads_file is None
        else f"{report.tokens:,} tokens recorded in {escape(report.loads_file)}"
    )
    out.print(
        f"[bold]{escape(report.model)}[/] · {source}"
        + (" (cut by --max-tokens)" if report.truncated else "")
        + f" · {len(report.layers)} MoE layers · {report.n_routed_experts} routed experts, top-{report.top_k}"
        + f" · {shared} shared expert{'s' if shared != 1 else ''} (every token)"
        + f" · {report.devices} devices ({report.placement}), M = {report.max_devices}",
        soft_wrap=True,
    )
    out.print()
    (_render_heatmap if heatmap else _render_bars)(report)
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
            _number(layer.expert_balance, ".3f"),
            _number(layer.device_balance, ".3f"),
            _number(layer.communication_balance, ".3f"),
            f"{layer.device_balancedness:.3f}",
        )
    out.print(table)
    out.print(
        "[dim]mean/max is the balancedness of vLLM and SGLang; entropy is normalised to 1; Σf·P is the paper's balance "
        "quantity per sequence (1.0 = even), averaged over sequences"
        + (" (– : a loads file has no affinities)" if report.loads_file is not None else "")
        + "; device mean/max uses the device loads.[/]",
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
    if report.loads_file is not None:
        batches = f"all {report.batch_tokens:,} recorded tokens"
    columns = ("policy", "order", "capacity\nfactor", "assignments\ndropped", "tokens\nhit", "tokens all\ndropped", "worst layer")
    table = _table(f"Token dropping simulated on this routing (budget per batch of {batches})", columns, left=2)
    for index, d in enumerate(report.drop_overall):
        worst = max(report.layers, key=lambda layer: layer.drop[index].assignment_drop_rate)
        table.add_row(
            d.policy,
            d.order or "affinity",
            f"{d.capacity_factor:g}",
            f"{d.assignment_drop_rate:.2%}",
            _number(d.token_drop_rate, ".2%"),
            _number(d.full_drop_rate, ".2%"),
            f"L{worst.layer} {worst.drop[index].assignment_drop_rate:.2%}",
        )
    out.print(table)
    out.print(
        "[dim]device: budget ceil(cf·T·K/D) per device, lowest affinity dropped (DeepSeek-V2 §2.2.4); expert: "
        "ceil(cf·T·K/E) per expert (GShard/Switch). tokens hit = at least one routed expert dropped"
        + (" (– : a loads file does not say which tokens)" if report.loads_file is not None else "")
        + ".[/]",
        soft_wrap=True,
    )
    out.print()


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted, or – where the report has none (a loads file lacks per-token routing)."""
    return "–" if value is None else format(value, spec)


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
        "that JSON file can be passed back as --placement. Planned and measured on the same "
        + ("text" if report.loads_file is None else "loads")
        + ".[/]",
        soft_wrap=True,
    )
