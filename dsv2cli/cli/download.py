"""`dsv2 download`: fetch the files dsv2 needs from the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dsv2cli.checkpoint.hub import DownloadReport, download_checkpoint
from dsv2cli.cli.common import emit_json, handle_errors, human_bytes, out
from dsv2cli.cli.options import Format, TextOrJson

EPILOG = (
    "Examples:\n\n"
    "  dsv2 download deepseek-ai/DeepSeek-V2-Lite\n\n"
    "  dsv2 download deepseek-ai/DeepSeek-V2-Lite-Chat --local-dir ./lite-chat --format json\n\n"
    "  HF_HUB_OFFLINE=1 dsv2 download deepseek-ai/DeepSeek-V2-Lite   # the cached copy only\n\n"
    "Only safetensors weights, the index, configs and tokenizer files are fetched. The token comes from HF_TOKEN "
    "or `hf auth login`; HF_ENDPOINT selects a mirror. Complete files are never fetched again and a cut-off "
    "transfer resumes where it stopped."
)


@handle_errors
def download(
    repo_id: str = typer.Argument(..., help="Hub repository, owner/name."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
    local_dir: Path | None = typer.Option(None, "--local-dir", help="Put the files here instead of the HF cache."),
    offline: bool = typer.Option(False, "--offline", help="Use the local cache only (as HF_HUB_OFFLINE=1)."),
    format: TextOrJson = Format.text,
) -> None:
    """Download a model's safetensors weights, config and tokenizer files from the Hugging Face Hub."""
    report = download_checkpoint(repo_id, revision=revision, local_dir=local_dir, offline=offline)
    if format == Format.json:
        emit_json(report.to_json())
    else:
        _render(report)


def _render(r: DownloadReport) -> None:
    table = Table(title=f"{r.repo_id}" + (f" @ {r.revision}" if r.revision else ""), title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in r.files.items():
        table.add_row(name, human_bytes(size))
    out.print(table)
    out.print(f"{len(r.files)} files, {human_bytes(r.bytes)} in {r.directory}" + (" (offline)" if r.offline else ""))
