"""Options that several commands share, declared once as ``Annotated`` aliases.

A command writes ``device: DeviceOption = "auto"``; the flag, its short name, its help and its
choices live here. ``--format`` is one :class:`Format` enum for every command; each command
accepts the formats it can write (:func:`format_option`).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer


class Format(str, Enum):
    """Output formats: ``text`` is for people (rich, on stdout); the others are one document or lines for programs."""

    text = "text"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    markdown = "markdown"


def format_option(*formats: Format, help: str) -> Any:
    """``--format`` / ``-f`` taking only ``formats`` (a usage error otherwise), e.g. ``format_option(Format.text, Format.json)``."""
    values = [f.value for f in formats]

    def parse(value: str | Format) -> Format:
        if isinstance(value, Format):
            return value
        if value not in values:
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, values))}.")
        return Format(value)

    return Annotated[Format, typer.Option("--format", "-f", parser=parse, metavar=f"<{'|'.join(values)}>", help=help)]


TextOrJson = format_option(Format.text, Format.json, help="text (a table) or json (one document).")


class Dtype(str, Enum):
    """A compute (or cache) dtype; ``auto`` lets the command choose."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Backend(str, Enum):
    """The torch.distributed backend of a torchrun launch."""

    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Checkpoint directory, Hub repo id, or 'demo' (default: the bundled model)."),
]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
DtypeOption = Annotated[
    Dtype,
    typer.Option(
        "--dtype",
        metavar="<dtype>",  # the help lists the choices; the full list would widen every command's option column
        help="auto, float32, bfloat16 or float16 (auto: float32 on CPU when it fits, else the stored dtype).",
    ),
]
ThreadsOption = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")]
BackendOption = Annotated[
    Backend,
    typer.Option("--backend", help="Under torchrun: gloo, nccl or auto (nccl on GPUs, gloo on CPU; env DSV2_BACKEND)."),
]
