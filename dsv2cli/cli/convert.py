"""`dsv2 convert`: HF <-> native layout, dtype changes, int8 and int4, with a progress bar by bytes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from dsv2cli.checkpoint.convert import DEFAULT_SHARD_BYTES, ConvertReport, convert_checkpoint
from dsv2cli.cli.common import byte_bar, emit_json, err, handle_errors, human_bytes, out
from dsv2cli.cli.options import Format, TextOrJson
from dsv2cli.errors import InputError

EPILOG = (
    "Examples:\n\n"
    "  dsv2 convert deepseek-ai/DeepSeek-V2-Lite ./lite-native\n\n"
    "  dsv2 convert ./DeepSeek-V2-Lite ./lite-int8 --quantize int8 --probe --format json\n\n"
    "  dsv2 convert ./DeepSeek-V2-Lite ./lite-int4 --quantize int4 --group-size 32\n\n"
    "  dsv2 convert ./lite-native ./lite-hf --to hf --dtype float32\n\n"
    "  dsv2 convert demo ./demo-int8 --quantize int8   (the bundled model)\n\n"
    "SOURCE is a Hub repo id (fetched like `dsv2 download`), a HF-layout directory, a native one or `demo`. "
    "OUTPUT appears only when the conversion is complete; an existing OUTPUT is replaced only with --overwrite."
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class Target(str, Enum):
    native = "native"
    hf = "hf"


class DtypeChoice(str, Enum):
    keep = "keep"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantization(str, Enum):
    int8 = "int8"
    int4 = "int4"


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"cannot read the size '{text}'", hint="write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


@contextmanager
def byte_progress(description: str) -> Iterator[tuple]:
    """A rich progress bar by bytes on stderr; yields ``(on_start(total), on_bytes(n))``."""
    progress = byte_bar()
    if not err.is_terminal:  # nothing to animate; keep stderr for the report's errors and hints
        yield (lambda total: None, lambda n: None)
        return
    task = progress.add_task(description, total=None)
    with progress:
        yield (lambda total: progress.update(task, total=total), lambda n: progress.advance(task, n))


@handle_errors
def convert(
    source: str = typer.Argument(..., help="Hub repo id, HF-layout directory or native directory."),
    output: Path = typer.Argument(..., help="Directory to create (must not exist unless --overwrite)."),
    to: Target = typer.Option(Target.native, "--to", help="native (stacked experts, mapped at load) or hf."),
    dtype: DtypeChoice = typer.Option(DtypeChoice.keep, "--dtype", help="Float dtype of the result; the router stays float32."),
    quantize: Quantization | None = typer.Option(
        None,
        "--quantize",
        help="int8: weight-only, symmetric, per output channel; int4: weight-only, symmetric, a float16 scale per "
        "--group-size inputs (native only).",
    ),
    group_size: int | None = typer.Option(
        None, "--group-size", metavar="32|64|128", help="Inputs per scale for --quantize int4 (default 32)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists (only once the new one is complete)."),
    shard_size: str = typer.Option(
        f"{DEFAULT_SHARD_BYTES // 10**9}GB", "--shard-size", help="Largest shard for --to hf (5GB, 500MB, ...)."
    ),
    probe: bool = typer.Option(
        False,
        "--probe/--no-probe",
        help="Also measure the quality cost: a probe text through SOURCE and OUTPUT, layer by layer. Off by default: "
        "it reads both checkpoints again, about as long as the conversion itself.",
    ),
    format: TextOrJson = Format.text,
) -> None:
    """Convert a checkpoint: HF <-> native layout, another dtype, int8 or int4; streamed, memory-bounded and atomic."""
    with byte_progress("converting") as (on_start, on_bytes):
        report = convert_checkpoint(
            source,
            output,
            to=to.value,
            dtype=dtype.value,
            quantize=quantize.value if quantize else None,
            overwrite=overwrite,
            shard_bytes=parse_size(shard_size),
            probe=probe,
            on_start=on_start,
            on_progress=on_bytes,
            group_size=group_size,
        )
    if format == Format.json:
        emit_json(report.to_json())
    else:
        _render(report)


def _render(r: ConvertReport) -> None:
    table = Table(title=f"{r.source} -> {r.output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layout", f"{r.source_layout} -> {r.target_layout}")
    scheme = f" (groups of {r.group_size})" if r.group_size else ""
    table.add_row("dtype", r.dtype + (f", {r.quantization} weights{scheme}" if r.quantization else ""))
    table.add_row("tensors / files", f"{r.tensors} / {r.files}")
    table.add_row("read / written", f"{human_bytes(r.bytes_read)} / {human_bytes(r.bytes_written)}")
    table.add_row(
        "time",
        f"{r.seconds:.2f} s ({human_bytes(r.throughput_bytes_per_s)}/s; {r.write_wait_seconds:.2f} s of it waiting for the writer)",
    )
    table.add_row("peak memory (RSS)", human_bytes(r.peak_rss_bytes))
    if r.quality is None and r.quantization is not None:
        table.add_row("quality (probe)", "not measured (pass --probe)")
    if r.quality is not None:
        q = r.quality.change
        table.add_row(
            "quality (probe)",
            f"mean log p(next token) {q.reference_logprob:.4f} -> {q.candidate_logprob:.4f} "
            f"(change {q.log_likelihood_change:+.4f}) over {q.tokens} tokens ({r.quality.token_source}); "
            f"top-1 agreement {q.top1_agreement:.1%}; "
            f"{r.probe_seconds:.1f} s, peak RSS {human_bytes(r.probe_peak_rss_bytes or 0)}",
        )
    out.print(table)
