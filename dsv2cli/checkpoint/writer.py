"""Writing safetensors files as a stream, and committing a whole output directory atomically.

A file's header (names, dtypes, shapes, offsets) is known before any data, so tensors are written
piece by piece in header order and never need to be whole in memory. Files are deterministic: the
header lists tensors in the order given, carries only ``{"format": "pt"}`` as metadata, and is
padded with spaces to a multiple of 8 bytes, as safetensors' own writer does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dsv2cli.checkpoint.files import DTYPE_SIZES
from dsv2cli.errors import InputError

PARTIAL_MARK = ".partial-"


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


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length plus the JSON header for ``specs`` laid out back to back in this order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Writes one safetensors file: the header at once, then each tensor's bytes in order, hashed on the way."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        self.path = path
        self.specs = specs
        self._index = 0
        self._written_in_tensor = 0
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._file = path.open("wb")
        self._emit(safetensors_header(specs))

    @property
    def current(self) -> str:
        """Name of the tensor whose bytes come next (for error messages)."""
        return self.specs[self._index].name if self._index < len(self.specs) else "(end of file)"

    def write(self, data: memoryview | bytes) -> None:
        """Append bytes of the current tensor (any split of a tensor's bytes into calls is fine)."""
        remaining = memoryview(data).nbytes
        while remaining:
            if self._index >= len(self.specs):
                raise AssertionError(f"{self.path.name}: more bytes than the header declares")
            room = self.specs[self._index].nbytes - self._written_in_tensor
            step = min(room, remaining)
            self._written_in_tensor += step
            remaining -= step
            if self._written_in_tensor == self.specs[self._index].nbytes:
                self._index += 1
                self._written_in_tensor = 0
        self._emit(data)

    def _emit(self, data: memoryview | bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self._bytes += memoryview(data).nbytes

    def close(self) -> WrittenFile:
        """Flush to disk and return the file's size and sha256."""
        while self._index < len(self.specs) and self.specs[self._index].nbytes == 0:
            self._index += 1
        if self._index != len(self.specs):
            raise AssertionError(f"{self.path.name}: tensor '{self.current}' was not written completely")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return WrittenFile(self.path.name, self._bytes, self._hash.hexdigest())

    def abort(self) -> None:
        self._file.close()


def hash_file(path: Path, chunk: int = 16 << 20) -> WrittenFile:
    """Size and sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(max(1, min(chunk, path.stat().st_size)))
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return WrittenFile(path.name, size, digest.hexdigest())


def write_text_file(path: Path, text: str) -> WrittenFile:
    """Write ``text`` (UTF-8, ``\\n`` line ends) and return its size and hash."""
    data = text.encode("utf-8")
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return WrittenFile(path.name, len(data), hashlib.sha256(data).hexdigest())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(output: Path) -> list[Path]:
    """Delete what interrupted runs left beside ``output`` (their process is gone); returns what was removed."""
    removed = []
    for candidate in output.parent.glob(f".{output.name}{PARTIAL_MARK}*"):
        pid = candidate.name.rsplit(PARTIAL_MARK, 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)) and candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def check_output(output: Path, overwrite: bool, protect: Path | None = None) -> None:
    """Refuse an OUTPUT that exists (unless ``overwrite``) or that would touch the directory ``protect``."""
    if protect is not None:
        out, src = output.resolve(), protect.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise InputError(f"OUTPUT {output} overlaps SOURCE {protect}", hint="choose an OUTPUT outside the source checkpoint")
    if output.exists() and not overwrite:
        raise InputError(f"{output} already exists", hint="choose another OUTPUT, or pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output} exists and is not a directory", hint="choose another OUTPUT")
    if not output.parent.is_dir():
        raise InputError(f"the parent directory of {output} does not exist", hint="create it first")


@contextmanager
def staged_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh directory beside ``output`` that replaces it only when the ``with`` body succeeds.

    On any failure the staging directory is removed and ``output`` is left as it was. With
    ``overwrite``, an existing ``output`` is moved aside, the new one renamed in, then the old removed,
    so at every moment one complete version exists under some name.
    """
    check_output(output, overwrite)
    _remove_stale_partials(output)
    staging = output.parent / f".{output.name}{PARTIAL_MARK}{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        os.replace(output, old)
    os.replace(staging, output)
    _fsync_directory(output.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, tensor: str | None, exc: OSError) -> InputError:
    """A clear error for a failed write (disk full above all)."""
    what = f"{path.name}" + (f" (tensor '{tensor}')" if tensor else "")
    if exc.errno == errno.ENOSPC:
        return InputError(
            f"no space left on the device while writing {what}; nothing was left at OUTPUT",
            hint="free some space or choose an OUTPUT on another disk",
        )
    return InputError(f"could not write {what}: {exc.strerror or exc}", hint="check that OUTPUT's directory is writable")
