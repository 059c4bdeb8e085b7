"""Reading weight files ahead (dsv2cli/checkpoint/readahead.py): cold pages are read, warm ones skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsv2cli.checkpoint.readahead import missing_bytes, read_ahead

MB = 1 << 20


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def cold_files(tmp_path) -> list[Path]:
    paths = []
    for index, size in enumerate((5 * MB + 123, 16 * MB, 1)):
        path = tmp_path / f"part-{index}.safetensors"
        path.write_bytes(os.urandom(size))
        _drop_from_page_cache(path)
        paths.append(path)
    if missing_bytes(paths[1]) < 8 * MB:
        pytest.skip("this filesystem keeps files in memory (tmpfs?): pages cannot be dropped")
    return paths


def test_cold_files_are_read_and_then_resident(cold_files):
    total = sum(p.stat().st_size for p in cold_files)
    seen = []
    report = read_ahead(cold_files, seen.append, block=4 * MB)
    assert report.total_bytes == total and sum(seen) == total
    assert report.read_bytes >= 16 * MB  # every cold block was read
    assert all(missing_bytes(p) == 0 for p in cold_files)


def test_warm_files_are_not_read_again(cold_files):
    read_ahead(cold_files)
    again = read_ahead(cold_files)
    assert again.read_bytes == 0 and again.total_bytes == sum(p.stat().st_size for p in cold_files)


def test_only_the_cold_part_of_a_file_is_read(cold_files):
    big = cold_files[1]
    read_ahead([big])
    fd = os.open(big, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 8 * MB, 8 * MB, os.POSIX_FADV_DONTNEED)  # the second half leaves the page cache
    finally:
        os.close(fd)
    report = read_ahead([big], block=4 * MB)
    assert report.read_bytes == 8 * MB  # the two cold blocks, not the two warm ones
