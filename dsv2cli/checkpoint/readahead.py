"""Reading a checkpoint's files into the page cache before the first step, at the disk's speed.

Mapped weights are read by page faults: the first decode steps after a reboot fault each expert's
pages in as the router first picks it, scattered 4 KiB-128 KiB reads that run far below what the
disk can stream (0.24 tokens/s for V2-Lite int8 where a warm run makes 4). :func:`read_ahead` reads
every file front to back in large blocks instead, so the first step finds the weights in memory.

Pages already in the page cache (``mincore``) are skipped, so a warm start costs only the check.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

BLOCK = 16 << 20  # bytes per read; a multiple of every page size
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class ReadAhead:
    """What :func:`read_ahead` did: bytes of the files, bytes read from disk, seconds it took."""

    total_bytes: int
    read_bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.read_bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, float]:
        return {"total_bytes": self.total_bytes, "read_bytes": self.read_bytes, "seconds": round(self.seconds, 3)}


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    return libc


_LIBC = _libc() if hasattr(mmap, "MAP_SHARED") else None


def resident_pages(fd: int, size: int) -> bytes | None:
    """One byte per page of the file, bit 0 set where the page is in the page cache; None where unknown."""
    if _LIBC is None or size == 0:
        return None
    address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vector = (ctypes.c_ubyte * ((size + _PAGE - 1) // _PAGE))()
        if _LIBC.mincore(address, size, vector) != 0:
            return None
        return bytes(vector)
    finally:
        _LIBC.munmap(address, size)


def missing_bytes(path: Path) -> int:
    """Bytes of ``path`` not in the page cache (all of it where that cannot be told)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = resident_pages(fd, size)
    finally:
        os.close(fd)
    if pages is None:
        return size
    return min(size, sum(1 for p in pages if not p & 1) * _PAGE)


def read_ahead(paths: Iterable[Path], on_bytes: Callable[[int], None] | None = None, block: int = BLOCK) -> ReadAhead:
    """Read every block of ``paths`` that is not in the page cache yet, in file order.

    ``on_bytes(n)`` is called after each block with the bytes it covered (read or already there), so a
    progress bar over the files' total size ends full.
    """
    buffer = bytearray(block)
    view = memoryview(buffer)
    total = read = 0
    pages_per_block = block // _PAGE
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            total += size
            resident = resident_pages(fd, size)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for index, offset in enumerate(range(0, size, block)):
                length = min(block, size - offset)
                pages = resident[index * pages_per_block : (index + 1) * pages_per_block] if resident is not None else b""
                if resident is None or not all(p & 1 for p in pages):
                    done = 0
                    while done < length:
                        n = os.preadv(fd, [view[done:length]], offset + done)
                        if n <= 0:
                            break
                        done += n
                    read += length
                if on_bytes is not None:
                    on_bytes(length)
        finally:
            os.close(fd)
    return ReadAhead(total, read, time.perf_counter() - start)
