"""Executing a conversion plan on three threads: read, convert, write and hash.

A reader thread ``pread``s the source at most :data:`READ_BYTES` (a few rows) at a time, the calling
thread casts or quantizes those rows, and a writer thread appends them to the output file and
computes its sha256 (for the manifest) on the way. Torch's kernels, ``pread``, ``write`` and hashlib
all release the GIL, so reading, converting and writing-and-hashing run at once on different cores.
Peak memory is a fixed number of such buffers plus the int8 scales of one file, whatever the model's
size. ``convert.py`` builds the plan and commits the result.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from dsv2cli.checkpoint.files import DTYPE_SIZES, ST_TO_TORCH
from dsv2cli.checkpoint.plan import Begin, End, OutputFile, Read, Step, WriteScales, steps
from dsv2cli.checkpoint.writer import FileWriterThread, WrittenFile
from dsv2cli.errors import CheckpointError
from dsv2cli.model.int4 import quantize_groups
from dsv2cli.model.quantized import quantize_rows

READ_BYTES = 16 << 20  # one pread, and the size of every buffer in flight
READS_AHEAD = 4  # source chunks read before they are converted
WRITES_AHEAD = 4  # converted chunks waiting to be written and hashed
CONVERT_BYTES = 256 << 10  # source rows quantized at once: their float32 temporaries stay in the CPU's cache

Progress = Callable[[int], None]


def write_weights(files: list[OutputFile], staging: Path, on_progress: Progress | None) -> tuple[list[WrittenFile], float]:
    """Write every planned file into ``staging``; returns them and the seconds spent waiting for the writer at the end."""
    with _one_torch_thread():
        return _write_weights(files, staging, on_progress)


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
    group = step.tensor.group_size  # int4: packed, two values a byte
    buffer = outputs.take(values.numel()) if step.mode == "quantize" else None
    out = None
    if buffer is not None:
        kind, count = (torch.int8, values.numel()) if group is None else (torch.uint8, values.numel() // 2)
        out = torch.frombuffer(buffer, dtype=kind, count=count).view(step.rows, -1)
    rows = max(1, CONVERT_BYTES // max(1, values[0].nbytes))
    chunk_scales = []
    for first in range(0, step.rows, rows):
        chunk = values[first : first + rows]
        q, scale = quantize_rows(chunk) if group is None else quantize_groups(chunk, group)
        if out is not None:
            out[first : first + rows] = q
        chunk_scales.append(scale)
    if step.collect is not None:
        scales.setdefault(step.collect, []).append(torch.cat(chunk_scales))
    return (_as_bytes(out), partial(outputs.give, buffer)) if out is not None else None


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())
