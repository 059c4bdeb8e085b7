"""`dsv2 convert`: HF <-> native layout, dtype changes and int8, streamed and committed atomically.

The conversion is a plan (output files, each an ordered list of output tensors, each made of
source byte ranges) and one loop that executes it on three threads (:func:`_write_all`): a reader
``pread``s the source at most :data:`READ_BYTES` (a few rows) at a time, this thread casts or
quantizes those rows, and a writer appends them to the output file and computes its sha256 (for the
manifest) on the way. Torch's kernels, ``pread``, ``write`` and hashlib all release the GIL, so
reading, converting and writing-and-hashing run at once on different cores. Peak memory is a
fixed number of such buffers plus the int8 scales of one file, whatever the model's size.
Everything is written into a staging directory beside OUTPUT and renamed into place only when
complete (:class:`dsv2cli.commit.Output`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import queue
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dsv2cli.checkpoint.files import DTYPE_SIZES, INDEX_NAME, ST_TO_TORCH
from dsv2cli.checkpoint.native import MANIFEST_NAME, QUANTIZATIONS, Manifest
from dsv2cli.checkpoint.plan import Begin, End, OutputFile, Read, Step, WriteScales, plan_hf, plan_native, steps
from dsv2cli.checkpoint.probe import ProbeReport, probe_quality, require_probe_memory
from dsv2cli.checkpoint.resolve import resolve_checkpoint
from dsv2cli.checkpoint.source import open_source
from dsv2cli.checkpoint.writer import (
    FileWriterThread,
    WrittenFile,
    hash_file,
    write_error,
    write_text_file,
)
from dsv2cli.commit import Output
from dsv2cli.errors import CheckpointError, InputError, UnsupportedError
from dsv2cli.model.quantized import quantize_rows

TARGETS = ("native", "hf")
DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")
READ_BYTES = 16 << 20  # one pread, and the size of every buffer in flight
READS_AHEAD = 4  # source chunks read before they are converted
WRITES_AHEAD = 4  # converted chunks waiting to be written and hashed
CONVERT_BYTES = 256 << 10  # source rows quantized at once: their float32 temporaries stay in the CPU's cache
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
    write_wait_seconds: float  # part of ``seconds`` spent waiting for the writer (writes, sha256) after the last conversion
    peak_rss_bytes: int
    probe: bool = False  # whether the quality probe ran (only with --probe)
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
            "write_wait_seconds": round(self.write_wait_seconds, 3),
            "throughput_bytes_per_s": round(self.throughput_bytes_per_s),
            "peak_rss_bytes": self.peak_rss_bytes,
            "probe": self.probe,
            "quality": self.quality.to_json() if self.quality else None,
            "probe_seconds": round(self.probe_seconds, 3),
            "probe_peak_rss_bytes": self.probe_peak_rss_bytes,
        }


def _return_large_blocks_to_the_os() -> None:
    """Keep allocations of 1 MiB and more memory-mapped, so each is returned to the OS when freed.

    glibc raises its mmap threshold after a large block is freed (up to 32 MiB); large temporaries
    then come from the heap, which fragments: when the converter quantized 16 MiB at a time, int8 of
    a two-layer DeepSeek-V2-Lite grew to 2.4 GiB peak RSS, 0.43 GiB with this. Its temporaries are
    now below 1 MiB (:data:`CONVERT_BYTES`) and its peak is the same either way; the probe's, one
    layer at a time, still come and go. Nothing to do where the C library has no ``mallopt``.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def _check_overlap(output: Path, source: Path) -> None:
    out, src = output.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise InputError(f"OUTPUT {output} overlaps SOURCE {source}", hint="choose an OUTPUT outside the source checkpoint")


def convert_checkpoint(
    source: str,
    output: str | Path,
    to: str = "native",
    dtype: str = "keep",
    quantize: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    probe: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Progress | None = None,
) -> ConvertReport:
    """Convert ``source`` into ``output``; see the module docstring. ``probe``: also measure the quality cost."""
    output = Path(output).expanduser()
    if to not in TARGETS:
        raise InputError(f"unknown target layout '{to}'", hint=f"choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype '{dtype}'", hint=f"choose one of {', '.join(DTYPE_CHOICES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"unknown quantization '{quantize}'", hint=f"choose one of {', '.join(QUANTIZATIONS)}")
    if quantize and to == "hf":
        raise UnsupportedError("int8 weights have no HF layout", hint="use --to native with --quantize int8")
    source_dir = resolve_checkpoint(source, what="source")[1]
    _check_overlap(output, source_dir)
    target = Output.claim(output, kind="dir", replace=overwrite, allow_empty=True)
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
    if probe:  # before converting: a probe that cannot fit should not cost a conversion first
        result = ((t.spec.name, t.spec.nbytes) for f in files for t in f.tensors)
        require_probe_memory(src.config, ((n, t.nbytes) for n, t in src.tensors.items()), result)
    if on_start is not None:
        on_start(src.nbytes + sum(f.nbytes for f in files))  # bytes converted, and bytes written and hashed
    _return_large_blocks_to_the_os()
    start = time.perf_counter()
    quality, probe_seconds = None, 0.0
    with target.staged() as staging:
        written, write_wait = _write_all(files, aux, staging, float_dtype if dtype != "keep" else None, on_progress)
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
        write_wait_seconds=write_wait,
        peak_rss_bytes=peak,
        probe=probe,
        probe_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if probe else None,
        quality=quality,
        probe_seconds=probe_seconds,
    )


class _Buffers:
    """A fixed number of reusable byte buffers: taking one waits until one is given back, which bounds memory."""

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def take(self, nbytes: int) -> bytearray:
        """A buffer of at least ``nbytes`` (a larger one replaces it when one row needs more)."""
        buffer = self._free.get()
        if buffer is None:  # closed: wake the next waiter too
            self._free.put(None)
            raise _Stopped
        return buffer if len(buffer) >= nbytes else bytearray(nbytes)

    def give(self, buffer: bytearray) -> None:
        self._free.put(buffer)

    def close(self) -> None:
        self._free.put(None)


class _Stopped(Exception):
    """The conversion stopped: the reader thread ends."""


class _ReadError(OSError):
    def __init__(self, file: Path, tensor: str, reason: str) -> None:
        super().__init__(reason)
        self.file, self.tensor, self.reason = file, tensor, reason


def _read_ahead(todo: Iterator[Step], buffers: _Buffers, out: queue.SimpleQueue) -> None:
    """Reader thread: every step, in order, with the source bytes it reads (``(step, buffer, view)``).

    Runs ahead of the conversion by as many reads as there are buffers; a read that fails is put in
    the queue as a :class:`_ReadError` and ends the thread, as does :meth:`_Buffers.close`.
    """
    fds: dict[Path, int] = {}
    try:
        for step in todo:
            if not isinstance(step, Read):
                out.put((step, None, None))
                continue
            buffer = buffers.take(step.length)
            view = memoryview(buffer)[: step.length]
            begin = step.piece.begin + step.offset
            try:
                if step.piece.file not in fds:
                    fds[step.piece.file] = os.open(step.piece.file, os.O_RDONLY)
                done = 0
                while done < step.length:
                    n = os.preadv(fds[step.piece.file], [view[done:]], begin + done)
                    if n == 0:
                        raise OSError(errno.EIO, f"unexpected end of file at byte {begin + done}")
                    done += n
            except OSError as exc:
                out.put(_ReadError(step.piece.file, step.tensor.spec.name, str(exc)))
                return
            out.put((step, buffer, view))
    except _Stopped:
        pass
    finally:
        for fd in fds.values():
            os.close(fd)
        out.put(None)


def _write_all(
    files: list[OutputFile], aux: list[Path], staging: Path, dtype: str | None, on_progress: Progress | None
) -> tuple[list[WrittenFile], float]:
    """Write every planned file (:func:`_write_weights`), then copy and hash the aux files.

    Returns the written files and the seconds spent waiting for the writer after the last conversion.
    """
    with _one_torch_thread():
        written, wait = _write_weights(files, staging, on_progress)
    for path in aux:
        _copy(path, staging, dtype)
        written.append(hash_file(staging / path.name))
    return written, wait


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch runs this thread's kernels on one core: the reader and the writer keep the others busy.

    With a worker per core, every kernel waits for a worker that the reader or the writer holds
    off its core: the int8 conversion of two DeepSeek-V2-Lite layers took 65 s instead of 12 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_weights(files: list[OutputFile], staging: Path, on_progress: Progress | None) -> tuple[list[WrittenFile], float]:
    """Execute the plan on three threads: read, convert (this one), write and hash.

    The reader thread runs ahead by :data:`READS_AHEAD` buffers; this thread casts or quantizes
    each chunk into one of :data:`WRITES_AHEAD` output buffers, which the writer thread writes and
    hashes while the next chunks are read and converted. Bytes kept as they are go from the
    reader's buffer to the writer unchanged.
    """
    reads, outputs = _Buffers(READS_AHEAD, READ_BYTES), _Buffers(WRITES_AHEAD, READ_BYTES)
    ready: queue.SimpleQueue = queue.SimpleQueue()  # steps with their source bytes, in order
    reader = threading.Thread(target=_read_ahead, args=(steps(files, READ_BYTES), reads, ready), name="dsv2-reader", daemon=True)
    sink = FileWriterThread(on_progress)
    reader.start()
    scales: dict[str, list[torch.Tensor]] = {}  # int8 weight of the current file -> its row scales, chunk by chunk
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, _ReadError):
                raise CheckpointError(
                    f"could not read tensor '{item.tensor}' from {item.file.name}: {item.reason}",
                    hint="the source file may be damaged; run `dsv2 verify` on SOURCE",
                ) from item
            sink.check()
            step, buffer, view = item
            if isinstance(step, Begin):
                sink.begin(staging / step.file.name, [t.spec for t in step.file.tensors])
                scales.clear()
            elif isinstance(step, End):
                sink.end()
            elif isinstance(step, WriteScales):
                sink.write(_as_bytes(torch.cat(scales[step.tensor.scale_of])))
            elif step.mode == "copy":
                sink.write(view, partial(reads.give, buffer))
            else:
                result = _convert(step, view, outputs, scales)
                reads.give(buffer)
                if result is not None:
                    sink.write(*result)
            if on_progress is not None and isinstance(step, Read) and step.mode != "scales":
                on_progress(step.length)
        written_at = time.perf_counter()
        written = sink.finish()
        wait = time.perf_counter() - written_at
    except BaseException:
        sink.abort()
        raise
    finally:
        reads.close()
        outputs.close()
        reader.join()
    return written, wait


def _convert(
    step: Read, view: memoryview, outputs: _Buffers, scales: dict[str, list[torch.Tensor]]
) -> tuple[memoryview, Callable[[], None]] | None:
    """Cast or quantize one chunk into an output buffer; returns its bytes and how to give the buffer back.

    Rows are quantized :data:`CONVERT_BYTES` at a time so that the float32 temporaries of
    ``quantize_rows`` stay in the CPU's cache (7x faster than 16 MiB at once on this machine);
    each row's result does not depend on the others.
    """
    values = torch.frombuffer(view, dtype=ST_TO_TORCH[step.piece.dtype]).view(step.rows, -1)  # [rows, I]
    target = ST_TO_TORCH.get(step.tensor.spec.dtype)
    if step.mode == "cast":
        buffer = outputs.take(values.numel() * DTYPE_SIZES[step.tensor.spec.dtype])
        out = torch.frombuffer(buffer, dtype=target, count=values.numel()).view_as(values)
        out.copy_(values)
        return _as_bytes(out), partial(outputs.give, buffer)
    buffer = outputs.take(values.numel()) if step.mode == "quantize" else None
    out = torch.frombuffer(buffer, dtype=torch.int8, count=values.numel()).view_as(values) if buffer is not None else None
    rows = max(1, CONVERT_BYTES // max(1, values[0].nbytes))
    chunk_scales = []
    for first in range(0, step.rows, rows):
        q, scale = quantize_rows(values[first : first + rows])
        if out is not None:
            out[first : first + rows] = q
        chunk_scales.append(scale)
    if step.collect is not None:
        scales.setdefault(step.collect, []).append(torch.cat(chunk_scales))
    return (_as_bytes(out), partial(outputs.give, buffer)) if out is not None else None


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


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
