"""`dsv2 convert`: HF <-> native layout, dtype changes and int8, streamed and committed atomically.

The conversion is a plan (output files, each an ordered list of output tensors, each made of
source byte ranges) and one loop that executes it. Bytes kept as they are go file to file through
the kernel (``copy_file_range``); bytes that change are read with ``pread`` at most
:data:`CHUNK_BYTES` (a few rows) at a time, cast or quantized, and appended. Peak memory is a few
chunks plus the int8 scales of one tensor, whatever the model's size. Each file is hashed
(sha256, for the manifest) by a thread pool as soon as it is closed. Everything is written into a
staging directory beside OUTPUT and renamed into place only when complete
(``writer.staged_directory``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv2cli.checkpoint.files import INDEX_NAME, TensorInfo
from dsv2cli.checkpoint.native import (
    MANIFEST_NAME,
    QUANTIZATIONS,
    ST_TO_TORCH,
    Manifest,
)
from dsv2cli.checkpoint.plan import OutputFile, OutputTensor, plan_hf, plan_native
from dsv2cli.checkpoint.probe import ProbeReport, probe_quality
from dsv2cli.checkpoint.source import open_source
from dsv2cli.checkpoint.writer import (
    SafetensorsWriter,
    WrittenFile,
    check_output,
    hash_file,
    staged_directory,
    write_error,
    write_text_file,
)
from dsv2cli.errors import CheckpointError, InputError, UnsupportedError
from dsv2cli.model.quantized import quantize_rows

TARGETS = ("native", "hf")
DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")
CHUNK_BYTES = 16 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_SHARD_BYTES = 5 * 10**9

Progress = Callable[[int], None]


@dataclass
class ConvertReport:
    source: str
    output: str
    source_layout: str
    target_layout: str
    dtype: str
    quantization: str | None
    tensors: int
    files: int
    bytes_read: int
    bytes_written: int
    seconds: float
    hash_wait_seconds: float  # part of ``seconds`` spent waiting for sha256 after the last byte was written
    peak_rss_bytes: int
    quality: ProbeReport | None = None
    probe_seconds: float = 0.0
    probe_peak_rss_bytes: int | None = None

    @property
    def throughput_bytes_per_s(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "output": self.output,
            "source_layout": self.source_layout,
            "target_layout": self.target_layout,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "tensors": self.tensors,
            "files": self.files,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "hash_wait_seconds": round(self.hash_wait_seconds, 3),
            "throughput_bytes_per_s": round(self.throughput_bytes_per_s),
            "peak_rss_bytes": self.peak_rss_bytes,
            "quality": self.quality.to_json() if self.quality else None,
            "probe_seconds": round(self.probe_seconds, 3),
            "probe_peak_rss_bytes": self.probe_peak_rss_bytes,
        }


def _return_large_blocks_to_the_os() -> None:
    """Keep allocations of 1 MiB and more memory-mapped, so each is returned to the OS when freed.

    glibc raises its mmap threshold after a large block is freed (up to 32 MiB); the int8 path's
    ~10 MiB temporaries then come from the heap, which fragments and grew by about one temporary
    per chunk (int8 of a two-layer DeepSeek-V2-Lite: 2.4 GiB peak RSS, 0.43 GiB with this).
    Nothing to do where the C library has no ``mallopt``.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def resolve_source(spec: str) -> Path:
    """SOURCE as typed: a directory, ``demo`` (the bundled model), or a Hub repo id fetched through the HF cache."""
    from dsv2cli.resolve import DEMO_NAME, bundled_model_dir, looks_like_repo_id

    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    demo = bundled_model_dir()
    if spec == DEMO_NAME and demo is not None:
        return demo
    if looks_like_repo_id(spec):
        from dsv2cli.checkpoint.hub import fetch_checkpoint

        return fetch_checkpoint(spec, download=os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""))
    raise InputError(
        f"SOURCE '{spec}' is not a checkpoint directory, 'demo' or a Hugging Face repo id (owner/name)",
        hint="pass a directory with config.json and *.safetensors, or owner/name",
    )


def convert_checkpoint(
    source: str,
    output: str | Path,
    to: str = "native",
    dtype: str = "keep",
    quantize: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    probe: bool | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Progress | None = None,
) -> ConvertReport:
    """Convert ``source`` into ``output``; see the module docstring. ``probe=None`` probes when values change."""
    output = Path(output).expanduser()
    if to not in TARGETS:
        raise InputError(f"unknown target layout '{to}'", hint=f"choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype '{dtype}'", hint=f"choose one of {', '.join(DTYPE_CHOICES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"unknown quantization '{quantize}'", hint=f"choose one of {', '.join(QUANTIZATIONS)}")
    if quantize and to == "hf":
        raise UnsupportedError("int8 weights have no HF layout", hint="use --to native with --quantize int8")
    source_dir = resolve_source(source)
    check_output(output, overwrite, protect=source_dir)
    src = open_source(source_dir)
    if src.quantization:
        raise UnsupportedError(
            f"{source_dir} is already quantized ({src.quantization}); dsv2 does not convert quantized checkpoints",
            hint="convert from the floating-point checkpoint it was made from",
        )
    files, float_dtype = plan_native(src, dtype, quantize) if to == "native" else plan_hf(src, dtype, shard_bytes)
    aux = src.aux_files()
    needed = sum(f.nbytes for f in files) + sum(p.stat().st_size for p in aux)
    free = shutil.disk_usage(output.parent).free
    if needed > free:
        raise InputError(
            f"OUTPUT needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free on its disk",
            hint="free some space or choose an OUTPUT on another disk",
        )
    if on_start is not None:
        on_start(src.nbytes + sum(f.nbytes for f in files))  # bytes converted, then bytes hashed
    if probe is None:
        probe = quantize is not None or dtype != "keep"
    _return_large_blocks_to_the_os()
    start = time.perf_counter()
    quality, probe_seconds = None, 0.0
    with staged_directory(output, overwrite) as staging:
        written, hash_wait = _write_all(files, aux, staging, float_dtype if dtype != "keep" else None, on_progress)
        if to == "native":
            written.append(_write_manifest(staging, files, written, float_dtype, quantize))
        else:
            written.append(_write_index(staging, files))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the conversion's own, before the probe
        if probe:
            probe_start = time.perf_counter()
            quality = probe_quality(source_dir, staging)
            probe_seconds = time.perf_counter() - probe_start
    seconds = time.perf_counter() - start - probe_seconds  # includes flushing to disk and the rename
    return ConvertReport(
        source=str(source_dir),
        output=str(output),
        source_layout=src.layout,
        target_layout=to,
        dtype=float_dtype,
        quantization=quantize,
        tensors=sum(len(f.tensors) for f in files),
        files=len(written),
        bytes_read=src.nbytes + sum(p.stat().st_size for p in aux),
        bytes_written=sum(w.bytes for w in written),
        seconds=seconds,
        hash_wait_seconds=hash_wait,
        peak_rss_bytes=peak,
        probe_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if probe else None,
        quality=quality,
        probe_seconds=probe_seconds,
    )


class _Reader:
    """Reads byte ranges of source files into one reused buffer (each chunk is written before the next read)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._buffer = bytearray(CHUNK_BYTES)

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, info: TensorInfo, offset: int, length: int) -> memoryview:
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        done = 0
        while done < length:
            n = os.preadv(self.fd(info.file), [view[done:]], info.begin + offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"unexpected end of file at byte {info.begin + offset + done}")
            done += n
        return view

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


def _write_all(
    files: list[OutputFile], aux: list[Path], staging: Path, dtype: str | None, on_progress: Progress | None
) -> tuple[list[WrittenFile], float]:
    """Write every planned file and copy the aux files; each is hashed by a pool as soon as it is closed.

    Hashing (sha256 is far slower than copying without SHA CPU instructions) thus overlaps the
    writing of the next files and uses every core; it reads the files back from the page cache.
    Returns the files and the seconds spent waiting for hashes after the last byte was written.
    """
    reader = _Reader()
    futures = []
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="sha256") as pool:
        try:
            for file in files:
                _write_file(file, staging / file.name, reader, on_progress)
                futures.append(pool.submit(hash_file, staging / file.name, on_progress))
            for path in aux:
                _copy(path, staging, dtype)
                futures.append(pool.submit(hash_file, staging / path.name))
        finally:
            reader.close()
        written_at = time.perf_counter()
        hashes = [f.result() for f in futures]
        return hashes, time.perf_counter() - written_at


def _write_file(file: OutputFile, path: Path, reader: _Reader, on_progress: Progress | None) -> None:
    writer: SafetensorsWriter | None = None
    tensor = file.tensors[0]
    scales: dict[str, list[torch.Tensor]] = {}  # int8 weight -> its row scales, chunk by chunk
    try:
        writer = SafetensorsWriter(path, [t.spec for t in file.tensors])
        for tensor in file.tensors:
            if tensor.scale_of is not None:
                if tensor.scale_of not in scales:  # the weight comes later in this file: one extra pass for its scales
                    scales[tensor.scale_of] = [scale for piece in tensor.pieces for _, scale in _chunks(tensor, piece, reader)]
                writer.write(_as_bytes(torch.cat(scales[tensor.scale_of])))
                continue
            collected: list[torch.Tensor] = []
            for piece in tensor.pieces:
                if not tensor.quantize and tensor.spec.dtype == piece.dtype:
                    writer.copy_range(reader.fd(piece.file), piece.begin, piece.nbytes)  # unchanged bytes: kernel copy
                for chunk in _chunks(tensor, piece, reader):
                    if tensor.quantize:
                        q, scale = chunk
                        collected.append(scale)
                        writer.write(_as_bytes(q))
                    else:
                        writer.write(chunk)
                if on_progress is not None:
                    on_progress(piece.nbytes)
            if tensor.quantize:
                scales.setdefault(tensor.spec.name, collected)
        writer.close()
    except OSError as exc:
        if writer is not None:
            writer.abort()
        if isinstance(exc, _ReadError):
            raise CheckpointError(
                f"could not read tensor '{exc.tensor}' from {exc.file.name}: {exc.reason}",
                hint="the source file may be damaged; run `dsv2 verify` on SOURCE",
            ) from exc
        raise write_error(path, tensor.spec.name, exc) from exc


class _ReadError(OSError):
    def __init__(self, file: Path, tensor: str, reason: str) -> None:
        super().__init__(reason)
        self.file, self.tensor, self.reason = file, tensor, reason


def _chunks(tensor: OutputTensor, piece: TensorInfo, reader: _Reader) -> Iterator:
    """One source range that needs converting, read a few rows at a time and converted for ``tensor``.

    Yields bytes to write for a cast, and ``(q, scale)`` (int8 rows, their float32 scales) for an
    int8 weight or its scale tensor. Yields nothing for a range whose bytes are kept as they are.
    """
    quantize = tensor.quantize or tensor.scale_of is not None
    if not quantize and tensor.spec.dtype == piece.dtype:
        return
    rows = piece.shape[0] if piece.shape else 1
    row_bytes = piece.nbytes // max(rows, 1)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    source_dtype, target = ST_TO_TORCH[piece.dtype], ST_TO_TORCH.get(tensor.spec.dtype)
    for first in range(0, rows, step):
        count = min(step, rows - first)
        try:
            view = reader.read(piece, first * row_bytes, count * row_bytes)
        except OSError as exc:
            raise _ReadError(piece.file, tensor.spec.name, str(exc)) from exc
        values = torch.frombuffer(view, dtype=source_dtype)
        if quantize:
            yield quantize_rows(values.view(count, -1))  # [rows, I]
        else:
            yield _as_bytes(values.to(target))


def _copy(path: Path, staging: Path, dtype: str | None) -> None:
    """Copy a config / tokenizer file byte for byte (following the HF cache's symlinks).

    When the dtype changes, ``config.json`` gets the new one (``torch_dtype`` / ``dtype``) so that
    transformers loads the weights as they are stored.
    """
    try:
        if path.name == "config.json" and dtype is not None:
            config = json.loads(path.read_text(encoding="utf-8"))
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = dtype
            write_text_file(staging / path.name, json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, staging / path.name)
    except OSError as exc:
        raise write_error(staging / path.name, None, exc) from exc


def _write_manifest(
    staging: Path, files: list[OutputFile], written: list[WrittenFile], dtype: str, quantize: str | None
) -> WrittenFile:
    tensors = {
        t.spec.name: {"file": f.name, "dtype": t.spec.dtype, "shape": list(t.spec.shape)} for f in files for t in f.tensors
    }
    records = {w.name: {"bytes": w.bytes, "sha256": w.sha256} for w in sorted(written, key=lambda w: w.name)}
    manifest = Manifest(dtype, quantize, tensors, records)
    try:
        return write_text_file(staging / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=1) + "\n")
    except OSError as exc:
        raise write_error(staging / MANIFEST_NAME, None, exc) from exc


def _write_index(staging: Path, files: list[OutputFile]) -> WrittenFile:
    weight_map = {t.spec.name: f.name for f in files for t in f.tensors}
    index = {"metadata": {"total_size": sum(f.nbytes for f in files)}, "weight_map": dict(sorted(weight_map.items()))}
    try:
        return write_text_file(staging / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    except OSError as exc:
        raise write_error(staging / INDEX_NAME, None, exc) from exc
