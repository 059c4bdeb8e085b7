"""`dsv2 info`: architecture, parameter counts and KV-cache size of a model."""

from __future__ import annotations

import typer
from rich.table import Table

from dsv2cli.analysis.model_info import ModelInfo, describe_model
from dsv2cli.checkpoint.resolve import resolve_config
from dsv2cli.cli.common import emit_json, handle_errors, human_bytes, human_count, out
from dsv2cli.cli.options import Format, TextOrJson
from dsv2cli.parallel.memory import USABLE_SHARE, FitRow, fit_table

EPILOG = (
    "Examples:\n\n"
    "  dsv2 info deepseek-v2-lite\n\n"
    "  dsv2 info ./DeepSeek-V2-Lite --format json\n\n"
    "  dsv2 info deepseek-v2 --format json | jq .fits   # memory per precision, machines needed per RAM size\n\n"
    "MODEL is a preset name (deepseek-v2, deepseek-v2-lite, deepseek-v2.5, ...), a checkpoint directory or a config.json."
)


@handle_errors
def info(
    model: str = typer.Argument(..., help="Preset name, checkpoint directory or config.json."),
    format: TextOrJson = Format.text,
) -> None:
    """Show a model's architecture, total and activated parameters, KV-cache bytes per token, and what fits where."""
    resolved = resolve_config(model)
    report = describe_model(resolved.config, name=resolved.name, source=resolved.source)
    fits = fit_table(resolved.config)
    if format == Format.json:
        emit_json({**report.to_json(), "fits": [row.to_json() for row in fits]})
    else:
        _render(report)
        _render_fits(fits)


def _render_fits(rows: list[FitRow]) -> None:
    sizes = list(rows[0].machines)
    table = Table(title="memory: one process needs / machines needed", title_justify="left")
    table.add_column("weights")
    table.add_column("one process needs", justify="right")
    for gib in sizes:
        table.add_column(f"{gib} GiB", justify="right")
    for row in rows:
        cells = []
        for gib in sizes:
            n = row.machines[gib]
            cells.append("fits" if n == 1 else "> 64 machines" if n is None else f"{n} machines")
        table.add_row(row.precision, f"{row.need_bytes / 1e9:.1f} GB", *cells)
    out.print(table)
    out.print(
        f"[dim]native copies (dsv2 convert; int8: --quantize int8) with a 4096-token cache; a machine lends "
        f"{USABLE_SHARE:.0%} of its RAM; several machines: torchrun, each rank holding its share (docs/distributed.md)[/]"
    )


def _render(r: ModelInfo) -> None:
    c = r.config
    table = Table(title=f"{r.name}  ({r.source})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layers", f"{c.num_hidden_layers} ({len(r.dense_layers)} dense, {len(r.moe_layers)} MoE)")
    table.add_row("hidden size", str(c.hidden_size))
    table.add_row("vocabulary", str(c.vocab_size))
    table.add_row(
        "attention", f"MLA, {c.num_attention_heads} heads, q_lora_rank {c.q_lora_rank or 'none'}, kv_lora_rank {c.kv_lora_rank}"
    )
    table.add_row("head dims", f"nope {c.qk_nope_head_dim} + rope {c.qk_rope_head_dim}, value {c.v_head_dim}")
    if c.n_routed_experts:
        routing = c.topk_method + (
            f" ({c.n_group} groups, {c.topk_group} kept)" if c.topk_method == "group_limited_greedy" else ""
        )
        table.add_row(
            "experts",
            f"{c.n_routed_experts} routed (top-{c.num_experts_per_tok}, {routing}, scale {c.routed_scaling_factor:g}) "
            f"+ {c.n_shared_experts or 0} shared, intermediate {c.moe_intermediate_size}",
        )
    table.add_row("dense MLP", f"intermediate {c.intermediate_size}")
    yarn = c.rope_scaling
    rope = f"theta {c.rope_theta:g}" + (
        "" if yarn is None else f", YaRN x{yarn.factor:g} from {yarn.original_max_position_embeddings}"
    )
    table.add_row("rotary", rope)
    table.add_row("context", f"{c.max_position_embeddings} positions")
    table.add_row("parameters", f"{r.params.total:,} ({human_count(r.params.total)})")
    table.add_row(
        "activated / token",
        f"{r.params.active:,} ({human_count(r.params.active)}; {human_count(r.params.active_without_embedding)} without the embedding)",
    )
    per_token = r.kv_cache_elements_per_token
    table.add_row(
        "KV cache / token",
        f"{per_token:,} elements = {c.kv_cache_elements_per_token_per_layer} x {c.num_hidden_layers} layers; "
        f"{human_bytes(per_token * 2)} in bfloat16",
    )
    if r.decode_bytes:
        table.add_row(
            "weights read / token",
            ", ".join(f"{human_bytes(n)} {label}" for label, n in r.decode_bytes.items())
            + (" (a decode step; int4 in groups of 32)" if "int4" in r.decode_bytes else " (a decode step)"),
        )
    out.print(table)
    if c.extra:
        out.print(f"[dim]config keys kept but not used: {', '.join(sorted(c.extra))}[/]")
