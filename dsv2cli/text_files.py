"""Text a user names: files, directories and globs filtered by patterns, read as strict UTF-8, and JSON lines.

One reader for every command that takes text: ``dsv2 train`` (its corpus), ``dsv2 expert-stats`` (the
sequences it routes) and ``dsv2 generate --input-file`` (prompts).

* :func:`find_files` expands inputs in order: a file named directly is always taken; a directory is walked
  recursively, skipping hidden paths (``.git``, ``.cache`` …); a glob is expanded like a directory. ``include``
  patterns filter what was found (not what was named); ``exclude`` patterns filter everything. A file found
  twice is taken once.
* :func:`read_text` decodes strictly: a NUL byte or invalid UTF-8 makes a file binary. A binary file found
  under a directory is skipped (``None``); one named directly is an error.
* :func:`json_lines` parses each non-blank line as a bounded, strict JSON object.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2cli.errors import InputError
from dsv2cli.untrusted import parse_json

JSONL_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class FoundFile:
    path: Path
    named: bool  # named directly by the user (faults are errors), not found under a directory or a glob


def find_files(
    inputs: Sequence[str | Path], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[FoundFile]:
    """The files ``inputs`` name, in order: files, directories walked recursively, or glob patterns."""
    found: dict[Path, FoundFile] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            candidates = [FoundFile(path, named=True)]
        elif path.is_dir():
            candidates = [FoundFile(p, named=False) for p in _walk(path)]
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
            if not matches:
                raise InputError(f"input {item} not found (no such file, directory or glob match)")
            candidates = [FoundFile(p, named=False) for m in matches for p in ([m] if m.is_file() else _walk(m))]
        for file in candidates:
            if _wanted(file, include, exclude):
                found.setdefault(file.path, file)
    return list(found.values())


def _walk(directory: Path) -> list[Path]:
    """The non-hidden files under ``directory``, sorted."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _wanted(file: FoundFile, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    posix = file.path.as_posix()
    if not file.named and include and not any(fnmatch.fnmatch(posix, p) or fnmatch.fnmatch(file.path.name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatch(posix, p) for p in exclude))


def read_text(file: FoundFile) -> str | None:
    """The UTF-8 text of ``file``; ``None`` for a binary file found under a directory (named: an error)."""
    try:
        data = file.path.read_bytes()
    except OSError as exc:
        if file.named:
            raise InputError(f"cannot read {file.path}: {exc.strerror}") from None
        return None
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if file.named:
            raise InputError(f"input file {file.path} is not UTF-8 text") from None
        return None


def json_lines(text: str, where: str | Path, expected: str = "a JSON object") -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``text``; anything but an object is an error
    saying that each line must be ``expected``."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"{where}:{number}")
        if not isinstance(record, dict):
            raise InputError(f"{where}:{number}: each line must be {expected}")
        records.append((number, record))
    return records
