"""Writing safetensors files as a stream.

A file's header (names, dtypes, shapes, offsets) is known before any data, so tensors are written
piece by piece in header order and never need to be whole in memory. Each file's sha256 is computed
on the bytes as they are written, so no file is read back; :class:`FileWriterThread` does the
writing and hashing on a thread of its own while the caller reads and converts the next bytes.
Files are deterministic: the header lists tensors in the order given, carries only
``{"format": "pt"}`` as metadata, and is padded with spaces so that the data starts 64-byte aligned
(safetensors allows no gaps between tensors, so alignment inside a file comes from the order, see
:func:`alignment_group`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv2cli.checkpoint.files import DTYPE_SIZES
from dsv2cli.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype (``"BF16"``, ``"I8"``, ...) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class WrittenFile:
    name: str
    bytes: int
    sha256: str


# Tensor data starts at a multiple of this in every file written (the int8 kernel needs 16-byte aligned weights).
DATA_ALIGNMENT = 64


def alignment_group(spec: TensorSpec) -> int:
    """Sort key that keeps every tensor aligned when a file's data starts at :data:`DATA_ALIGNMENT`.

    int8 tensors whose size is a multiple of 16 first (so each starts 16-byte aligned), then 8-,
    4- and 2-byte elements (each naturally aligned after the groups before it), then the rest.
    """
    if spec.dtype in ("I8", "U8"):
        return 0 if spec.nbytes % 16 == 0 else 4
    return {8: 1, 4: 2, 2: 3}.get(DTYPE_SIZES[spec.dtype], 4)


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length plus the JSON header for ``specs`` laid out back to back in this order.

    Padded with spaces so that the data starts at a multiple of :data:`DATA_ALIGNMENT`.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % DATA_ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Writes one safetensors file: the header at once, then each tensor's bytes in order, hashing them as they go."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        self.path = path
        self.specs = specs
        self._index = 0
        self._written_in_tensor = 0
        self._bytes = 0
        self._digest = hashlib.sha256()
        self._file = path.open("wb", buffering=0)
        self._write_bytes(safetensors_header(specs))

    @property
    def current(self) -> str:
        """Name of the tensor whose bytes come next (for error messages)."""
        return self.specs[self._index].name if self._index < len(self.specs) else "(end of file)"

    @property
    def size(self) -> int:
        """Bytes written so far, the header included."""
        return self._bytes

    def write(self, data: memoryview | bytes | bytearray) -> None:
        """Append bytes of the current tensor (any split of a tensor's bytes into calls is fine)."""
        self._advance(memoryview(data).nbytes)
        self._write_bytes(data)

    def _advance(self, n: int) -> None:
        while n:
            if self._index >= len(self.specs):
                raise AssertionError(f"{self.path.name}: more bytes than the header declares")
            step = min(self.specs[self._index].nbytes - self._written_in_tensor, n)
            self._written_in_tensor += step
            n -= step
            if self._written_in_tensor == self.specs[self._index].nbytes:
                self._index += 1
                self._written_in_tensor = 0

    def _write_bytes(self, data: memoryview | bytes | bytearray) -> None:
        view = memoryview(data).cast("B")
        self._digest.update(view)  # releases the GIL for large buffers
        self._bytes += len(view)
        while view:
            view = view[self._file.write(view) :]

    def close(self) -> WrittenFile:
        """Close the file (the commit flushes it to disk); returns its size and sha256."""
        while self._index < len(self.specs) and self.specs[self._index].nbytes == 0:
            self._index += 1
        if self._index != len(self.specs):
            raise AssertionError(f"{self.path.name}: tensor '{self.current}' was not written completely")
        self._file.close()
        return WrittenFile(self.path.name, self._bytes, self._digest.hexdigest())

    def abort(self) -> None:
        self._file.close()


class FileWriterThread:
    """Writes and hashes safetensors files on a thread of its own, in the order they are given.

    The caller queues ``begin(path, specs)``, the files' bytes with ``write(data, release)`` and
    ``end()``, and collects the :class:`WrittenFile` records with :meth:`finish`. ``release`` is
    called once ``data`` is written (the caller reuses its buffer); the caller bounds memory by the
    buffers it owns. A failed write becomes :attr:`error` (an :class:`InputError` naming the file
    and tensor); the thread then discards what is queued, and :meth:`check` raises the error.
    """

    def __init__(self, on_bytes: Callable[[int], None] | None = None) -> None:
        self.error: BaseException | None = None
        self._written: list[WrittenFile] = []
        self._on_bytes = on_bytes
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dsv2-writer", daemon=True)
        self._thread.start()

    def begin(self, path: Path, specs: list[TensorSpec]) -> None:
        self._queue.put(("begin", path, specs))

    def write(self, data: memoryview | bytes, release: Callable[[], None] | None = None) -> None:
        self._queue.put(("write", data, release))

    def end(self) -> None:
        self._queue.put(("end",))

    def check(self) -> None:
        """Raise the error of a write that failed, if one did."""
        if self.error is not None:
            raise self.error

    def finish(self) -> list[WrittenFile]:
        """Wait until everything queued is written; the files' records, or the error of a failed write."""
        self._queue.put(None)
        self._thread.join()
        self.check()
        return self._written

    def abort(self) -> None:
        """Stop: what is queued is discarded, an open file is closed as it is (the caller removes it)."""
        self.error = self.error or _Aborted()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        writer: SafetensorsWriter | None = None
        path: Path | None = None
        while (item := self._queue.get()) is not None:
            try:
                if self.error is None:
                    if item[0] == "begin":
                        path = item[1]
                        writer = SafetensorsWriter(item[1], item[2])
                        self._report(writer.size)
                    elif item[0] == "write":
                        writer.write(item[1])
                        self._report(memoryview(item[1]).nbytes)
                    else:
                        self._written.append(writer.close())
                        writer = None
            except OSError as exc:
                self.error = write_error(path, writer.current if writer else None, exc)
            except BaseException as exc:  # handed to the caller's thread by check()
                self.error = exc
            finally:
                if item[0] == "write" and item[2] is not None:
                    item[2]()
        if writer is not None:
            writer.abort()

    def _report(self, n: int) -> None:
        if self._on_bytes is not None:
            self._on_bytes(n)


class _Aborted(Exception):
    """The writer was stopped by its caller."""


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 16 << 20) -> WrittenFile:
    """Size and sha256 of a file, read in chunks (hashlib releases the GIL, so threads hash in parallel).

    What :class:`SafetensorsWriter` computes while writing, for files read back (``verify``, copies).
    """
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(max(1, min(chunk, path.stat().st_size)))
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return WrittenFile(path.name, size, digest.hexdigest())


def write_text_file(path: Path, text: str) -> WrittenFile:
    """Write ``text`` (UTF-8, ``\\n`` line ends) and return its size and hash."""
    data = text.encode("utf-8")
    path.write_bytes(data)
    return WrittenFile(path.name, len(data), hashlib.sha256(data).hexdigest())


def write_error(path: Path, tensor: str | None, exc: OSError) -> InputError:
    """A clear error for a failed write (disk full above all)."""
    what = f"{path.name}" + (f" (tensor '{tensor}')" if tensor else "")
    if exc.errno == errno.ENOSPC:
        return InputError(
            f"no space left on the device while writing {what}; nothing was left at OUTPUT",
            hint="free some space or choose an OUTPUT on another disk",
        )
    return InputError(f"could not write {what}: {exc.strerror or exc}", hint="check that OUTPUT's directory is writable")
