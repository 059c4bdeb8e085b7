"""Shared CLI pieces: consoles, output formats, error mapping."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from dsv2cli.errors import FIELD, DSV2Error, InputError, UnsupportedError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def emit_json(document: Any) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


# Fields whose flag is not ``--`` plus the field's name with dashes.
FIELD_FLAGS = {
    "cache_dtype": "--kv-cache-dtype",
    "capacity_factors": "--capacity-factor",
    "placement_file": "--placement",
}


def flag_for(field: str) -> str:
    """The command-line flag of a core parameter: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))


def flag_text(text: str) -> str:
    """A core error's text as a command-line user reads it: each `field` becomes its flag.

    "`top_p` must be in (0, 1]" -> "--top-p must be in (0, 1]"; "`compile=False`" -> "--no-compile";
    "`device=cpu`" -> "--device cpu" (see :mod:`dsv2cli.errors`).
    """

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        option = flag_for(name)
        if value is None or value == "True":
            return option
        if value == "False":
            return "--no-" + option.removeprefix("--")
        return f"{option} {value}"

    return FIELD.sub(flag, text)


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    """Print ``Error: message`` (and a hint) on stderr; return the Exit to raise."""
    err.print(f"[bold red]Error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]Hint:[/] {escape(hint)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Map expected failures to one ``Error:`` line, exit 1; ``DSV2_DEBUG=1`` keeps the traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DSV2Error as exc:
            if os.environ.get("DSV2_DEBUG") == "1":
                raise
            raise fail(flag_text(exc.message), flag_text(exc.hint) if exc.hint else None) from None
        except UnicodeDecodeError as exc:  # text read from stdin or a file that is not UTF-8
            if os.environ.get("DSV2_DEBUG") == "1":
                raise
            raise fail(f"the input is not UTF-8 text (byte {exc.start}: {exc.reason})", "convert it to UTF-8 first") from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def byte_bar() -> Progress:
    """A transient rich progress bar by bytes on stderr (description, bar, bytes, speed, time left)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


class LoadStatus:
    """Shows a model load on stderr: warnings, and a progress bar while weight files are read ahead."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def warn(self, message: str) -> None:
        err.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)

    def reading(self, total_bytes: int) -> Callable[[int], None]:
        if not err.is_terminal:
            return lambda n: None
        self.progress = byte_bar()
        task = self.progress.add_task("reading weights", total=total_bytes)
        self.progress.start()
        progress = self.progress
        return lambda n: progress.advance(task, n)

    def read(self, report: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if report.seconds >= 1.0:  # a warm start reads nothing; say only what the user waited for
            err.print(
                f"[dim]read {report.read_bytes / 1e9:.1f} GB of weights ahead in {report.seconds:.1f} s"
                f" ({report.bytes_per_s / 1e9:.2f} GB/s)[/]"
            )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} PiB"  # pragma: no cover


def human_count(n: float) -> str:
    """15706484224 -> '15.71B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def pyplot_for(path: Path) -> Any:
    """matplotlib's pyplot (non-interactive backend) for writing ``path``; checked before any work is done."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"--plot writes {', '.join(PLOT_SUFFIXES)} files, not '{path.name}'")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise UnsupportedError(
            "--plot needs matplotlib, which is not installed", hint="pip install 'dsv2cli[plot]' (or pip install matplotlib)"
        ) from None
    return pyplot
