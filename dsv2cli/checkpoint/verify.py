"""`dsv2 verify`: is a checkpoint directory complete and intact?

Native layout: every file's size and sha256 against ``manifest.json``, every header against the
manifest, every tensor the config needs present with the right shape and dtype, nothing extra.
HF layout: the index against the shards (both ways), every tensor against the config, and the
sha256 of each shard where the Hub's is known locally (the blob name in the HF cache, or the
ETag ``hf download --local-dir`` records), since the Hub's ETag of a LFS file is its sha256.
Problems are collected, never raised one at a time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dsv2cli.checkpoint.files import find_problems
from dsv2cli.checkpoint.native import MANIFEST_NAME, header_problems, is_native, read_manifest
from dsv2cli.checkpoint.writer import hash_file
from dsv2cli.config import load_config
from dsv2cli.errors import DSV2Error

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class VerifyReport:
    directory: str
    layout: str  # "native", "hf" or "unknown"
    files_hashed: int = 0
    bytes_hashed: int = 0
    tensors: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "directory": self.directory,
            "layout": self.layout,
            "ok": self.ok,
            "files_hashed": self.files_hashed,
            "bytes_hashed": self.bytes_hashed,
            "tensors": self.tensors,
            "seconds": round(self.seconds, 3),
            "problems": self.problems,
        }


def verify_checkpoint(directory: str | Path, on_bytes: Callable[[int], None] | None = None) -> VerifyReport:
    """Check ``directory`` and return every problem found (an empty list means it is sound)."""
    directory = Path(directory).expanduser()
    start = time.perf_counter()
    report = VerifyReport(str(directory), "unknown")
    if not directory.is_dir():
        report.problems.append(f"{directory} is not a directory")
        return report
    try:
        config = load_config(directory)
    except DSV2Error as exc:
        report.problems.append(exc.message)
        return report
    if is_native(directory):
        report.layout = "native"
        _verify_native(directory, config, report, on_bytes)
    else:
        report.layout = "hf"
        found, problems = find_problems(directory, config, strict_index=True)
        report.problems += problems
        report.tensors = len(found.tensors)
        known = [(shard, _hub_sha256(directory, shard), None) for shard in found.files]
        _hash_all([k for k in known if k[1] is not None], report, on_bytes)
    report.seconds = time.perf_counter() - start
    return report


def _verify_native(directory: Path, config, report: VerifyReport, on_bytes: Callable[[int], None] | None) -> None:
    try:
        manifest = read_manifest(directory)
    except DSV2Error as exc:
        report.problems.append(exc.message)
        return
    report.tensors = len(manifest.tensors)
    to_hash = []
    for name, record in sorted(manifest.files.items()):
        path = directory / name
        if "/" in name or "\\" in name or name == MANIFEST_NAME:
            report.problems.append(f"{MANIFEST_NAME}: names '{name}', which is not a file of the checkpoint directory")
        elif not path.is_file():
            report.problems.append(f"missing file '{name}' (named by {MANIFEST_NAME})")
        else:
            to_hash.append((path, str(record.get("sha256")), record.get("bytes")))
    _hash_all(to_hash, report, on_bytes)
    for path in sorted(directory.glob("*.safetensors")):
        if path.name not in manifest.files:
            report.problems.append(f"{path.name}: not named by {MANIFEST_NAME}")
    report.problems += [p for p in header_problems(directory, manifest, config) if p not in report.problems]


def _hash_all(files: list[tuple[Path, str, int | None]], report: VerifyReport, on_bytes: Callable[[int], None] | None) -> None:
    """Compare each ``(path, sha256, size)``; files are hashed in parallel (hashlib releases the GIL)."""
    sized = []
    for path, sha256, size in files:
        actual = path.stat().st_size
        if size is not None and actual != size:
            report.problems.append(f"{path.name}: {actual} bytes, {MANIFEST_NAME} says {size} (truncated or replaced)")
        else:
            sized.append((path, sha256))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        hashed = list(pool.map(lambda p: hash_file(p, on_bytes), [path for path, _ in sized]))
    for (path, sha256), written in zip(sized, hashed, strict=True):
        report.files_hashed += 1
        report.bytes_hashed += written.bytes
        if written.sha256 != sha256:
            report.problems.append(f"{path.name}: sha256 {written.sha256[:16]}… does not match the expected {sha256[:16]}…")


def _hub_sha256(directory: Path, shard: Path) -> str | None:
    """The Hub's sha256 of a shard when it is known locally (HF cache blob name or local-dir metadata)."""
    link = directory / shard.name
    if link.is_symlink():
        blob = link.resolve().name
        if _SHA256.match(blob):
            return blob
    metadata = directory / ".cache" / "huggingface" / "download" / f"{shard.name}.metadata"
    if metadata.is_file():
        lines = metadata.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) >= 2 and _SHA256.match(lines[1].strip()):
            return lines[1].strip()
    return None


def hashable_bytes(directory: str | Path) -> int:
    """How many bytes :func:`verify_checkpoint` will hash (for a progress bar)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return 0
    if is_native(directory):
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors") if _hub_sha256(directory, p) is not None)
