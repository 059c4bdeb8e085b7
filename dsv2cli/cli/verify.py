"""`dsv2 verify`: check a checkpoint directory's files, hashes and tensors; exit 1 on any problem."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dsv2cli.checkpoint.verify import VerifyReport, hashable_bytes, verify_checkpoint
from dsv2cli.cli.common import emit_json, err, handle_errors, human_bytes, out
from dsv2cli.cli.convert import byte_progress
from dsv2cli.cli.options import Format, TextOrJson

EPILOG = (
    "Examples:\n\n"
    "  dsv2 verify ./lite-native\n\n"
    "  dsv2 verify ~/.cache/huggingface/hub/models--deepseek-ai--DeepSeek-V2-Lite/snapshots/<commit> --format json\n\n"
    "Native directories are checked against manifest.json (sha256 of every file); HF directories against "
    "their index and config, and against the Hub's sha256 when the HF cache or --local-dir metadata records it."
)


@handle_errors
def verify(
    directory: Path = typer.Argument(..., help="Checkpoint directory (native or HF layout)."),
    format: TextOrJson = Format.text,
) -> None:
    """Check a checkpoint: sha256s, tensors against the config, index against shards. Exit 1 on any problem."""
    with byte_progress("hashing") as (on_start, on_bytes):
        on_start(hashable_bytes(directory))
        report = verify_checkpoint(directory, on_bytes=on_bytes)
    if format == Format.json:
        emit_json(report.to_json())
    else:
        _render(report)
    if not report.ok:
        raise typer.Exit(1)


def _render(r: VerifyReport) -> None:
    table = Table(title=f"{r.directory}  ({r.layout} layout)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("tensors", str(r.tensors))
    table.add_row("hashed", f"{r.files_hashed} files, {human_bytes(r.bytes_hashed)} in {r.seconds:.2f} s")
    table.add_row("result", "[green]OK[/]" if r.ok else f"[red]{len(r.problems)} problem{'s' if len(r.problems) > 1 else ''}[/]")
    out.print(table)
    for problem in r.problems:
        err.print(f"[red]-[/] {problem}", soft_wrap=True, highlight=False)
