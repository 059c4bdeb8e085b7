"""`dsv2 convert`: HF <-> native layout, dtype changes, int8 and int4, streamed and committed atomically.

The conversion is a plan (``plan.py``: output files, each an ordered list of output tensors, each made
of source byte ranges) and one loop that executes it on three threads (``stream.py``), so that peak
memory is a fixed number of buffers whatever the model's size. This module checks the request,
copies the config and tokenizer files, writes the manifest or index, and runs the optional quality
probe. Everything is written into a staging directory beside OUTPUT and renamed into place only when
complete (:class:`dsv2cli.commit.Output`).
"""

from __future__ import annotations

import ctypes
import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv2cli.checkpoint.files import INDEX_NAME
from dsv2cli.checkpoint.native import MANIFEST_NAME, QUANTIZATIONS, Manifest
from dsv2cli.checkpoint.plan import OutputFile, plan_hf, plan_native
from dsv2cli.checkpoint.probe import ProbeReport, probe_quality, require_probe_memory
from dsv2cli.checkpoint.resolve import resolve_checkpoint
from dsv2cli.checkpoint.source import open_source
from dsv2cli.checkpoint.stream import Progress, write_weights
from dsv2cli.checkpoint.writer import WrittenFile, hash_file, write_error, write_text_file
from dsv2cli.commit import Output
from dsv2cli.errors import InputError, UnsupportedError
from dsv2cli.model.dtypes import DTYPES
from dsv2cli.model.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES

TARGETS = ("native", "hf")
DTYPE_CHOICES = ("keep", *DTYPES)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_SHARD_BYTES = 5 * 10**9


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
    group_size: int | None = None  # int4's inputs per scale

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
            **({} if self.group_size is None else {"group_size": self.group_size}),
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
    now below 1 MiB (:data:`stream.CONVERT_BYTES`) and its peak is the same either way; the probe's, one
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
    group_size: int | None = None,
) -> ConvertReport:
    """Convert ``source`` into ``output``; see the module docstring. ``probe``: also measure the quality cost.

    ``group_size``: inputs per scale of ``quantize="int4"`` (32, 64 or 128; default 32).
    """
    output = Path(output).expanduser()
    if to not in TARGETS:
        raise InputError(f"unknown target layout '{to}'", hint=f"choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype '{dtype}'", hint=f"choose one of {', '.join(DTYPE_CHOICES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"unknown quantization '{quantize}'", hint=f"choose one of {', '.join(QUANTIZATIONS)}")
    if quantize and to == "hf":
        raise UnsupportedError(f"{quantize} weights have no HF layout", hint=f"use `to=native` with `quantize={quantize}`")
    if group_size is not None and quantize != "int4":
        raise InputError("`group_size` applies to `quantize=int4` only", hint="add `quantize=int4` or leave out `group_size`")
    if quantize == "int4":
        group_size = group_size or DEFAULT_GROUP_SIZE
        if group_size not in GROUP_SIZES:
            raise InputError(f"`group_size` must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    source_dir = resolve_checkpoint(source, what="source")[1]
    _check_overlap(output, source_dir)
    target = Output.claim(output, kind="dir", replace=overwrite, allow_empty=True)
    src = open_source(source_dir)
    if src.quantization:
        raise UnsupportedError(
            f"{source_dir} is already quantized ({src.quantization}); dsv2 does not convert quantized checkpoints",
            hint="convert from the floating-point checkpoint it was made from",
        )
    files, float_dtype = plan_native(src, dtype, quantize, group_size) if to == "native" else plan_hf(src, dtype, shard_bytes)
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
            written.append(_write_manifest(staging, files, written, float_dtype, quantize, group_size))
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
        group_size=group_size,
    )


def _write_all(
    files: list[OutputFile], aux: list[Path], staging: Path, dtype: str | None, on_progress: Progress | None
) -> tuple[list[WrittenFile], float]:
    """Write every planned file (:func:`stream.write_weights`), then copy and hash the aux files.

    Returns the written files and the seconds spent waiting for the writer after the last conversion.
    """
    written, wait = write_weights(files, staging, on_progress)
    for path in aux:
        _copy(path, staging, dtype)
        written.append(hash_file(staging / path.name))
    return written, wait


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
    staging: Path, files: list[OutputFile], written: list[WrittenFile], dtype: str, quantize: str | None, group_size: int | None
) -> WrittenFile:
    tensors = {
        t.spec.name: {"file": f.name, "dtype": t.spec.dtype, "shape": list(t.spec.shape)} for f in files for t in f.tensors
    }
    records = {w.name: {"bytes": w.bytes, "sha256": w.sha256} for w in sorted(written, key=lambda w: w.name)}
    manifest = Manifest(dtype, quantize, tensors, records, group_size)
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
