"""`dsv2 convert` against a plain file copy, its peak memory, and native vs HF-layout load time.

Builds a synthetic HF checkpoint with DeepSeek-V2-Lite's layer shapes (bfloat16 random weights,
fewer layers, 1 GB shards) under --dir, then measures in the same run:

* throughput: HF -> native conversion vs a plain copy of the same files (both flush their output
  to disk before they finish; both read a source that is in the page cache). Target: conversion
  >= 0.5 x copy speed.
* peak RSS of the conversion process (a subprocess; ``resource.getrusage``) vs the largest layer's
  bytes. Target: <= 1.5 x largest layer + 300 MB.
* load time: ``load_checkpoint`` of the native result vs ``load_hf_checkpoint`` of the source, both
  in bfloat16, each in a fresh subprocess (after a warm-up build), plus "load and read every weight
  once". Target: native load <= 0.2 x HF load.
* int8: conversion time and the probe's quality cost; the int8 matmul against bfloat16 / float32
  for one Lite expert.

    python benchmarks/bench_convert.py                    # ~2.2 GB of weights, a few minutes
    python benchmarks/bench_convert.py --size-gb 6 --dir /tmp/big
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv2cli.checkpoint.hf_keys import hf_tensor_shapes  # noqa: E402
from dsv2cli.checkpoint.writer import SafetensorsWriter, TensorSpec, hash_file  # noqa: E402
from dsv2cli.presets import preset_config  # noqa: E402

SHARD_BYTES = 10**9
GB = 10**9


def lite_config(size_gb: float):
    """DeepSeek-V2-Lite with as many layers as fit in ``size_gb`` (at least one dense and one MoE layer)."""
    config = preset_config("deepseek-v2-lite")
    for layers in range(2, config.num_hidden_layers + 1):
        candidate = config.replace(num_hidden_layers=layers)
        if checkpoint_bytes(candidate) > size_gb * GB:
            return config.replace(num_hidden_layers=max(2, layers - 1))
    return config


def checkpoint_bytes(config) -> int:
    return sum(2 * _numel(shape) for shape in hf_tensor_shapes(config).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def largest_layer_bytes(config) -> int:
    per_layer: dict[str, int] = {}
    for name, shape in hf_tensor_shapes(config).items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        per_layer[key] = per_layer.get(key, 0) + 2 * _numel(shape)
    return max(per_layer.values())


def write_synthetic(config, directory: Path) -> None:
    """A HF-layout checkpoint in bfloat16, written tensor by tensor (random values, std 0.02)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for name, shape in hf_tensor_shapes(config).items():
        spec = TensorSpec(name, "BF16", shape)
        if shards[-1] and size + spec.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, specs in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(directory / file, specs)
        for spec in specs:
            weight_map[spec.name] = file
            rows = spec.shape[0]
            step = max(1, (16 << 20) // max(1, spec.nbytes // rows))
            for first in range(0, rows, step):
                block = torch.randn((min(step, rows - first), *spec.shape[1:]), generator=generator) * 0.02
                if spec.name.endswith("norm.weight"):
                    block = torch.ones_like(block)
                writer.write(block.bfloat16().view(torch.uint8).reshape(-1).numpy())
        writer.close()
    index = {"metadata": {"total_size": checkpoint_bytes(config)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def plain_copy(source: Path, target: Path) -> float:
    """Seconds to copy every file of ``source`` and flush the copies to disk, as the converter does."""
    target.mkdir()
    start = time.perf_counter()
    for path in sorted(source.iterdir()):
        shutil.copyfile(path, target / path.name)
    for path in sorted(target.iterdir()):
        with path.open("rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - start


def sha256_files(directory: Path) -> float:
    """Seconds to sha256 every file of ``directory`` with the converter's pool (one thread per core)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(hash_file, sorted(directory.iterdir())))
    return time.perf_counter() - start


def sha256_speed() -> float:
    """This machine's single-thread sha256 speed in bytes per second (64 MiB in memory)."""
    data = os.urandom(64 << 20)
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - start)


def run_python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (so its peak RSS is its own) and return the JSON it prints last."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


CONVERT = """
import json, sys
from dsv2cli.checkpoint.convert import convert_checkpoint
quantize = sys.argv[3] if sys.argv[3] != "none" else None
report = convert_checkpoint(sys.argv[1], sys.argv[2], quantize=quantize, probe=quantize is not None)
print(json.dumps(report.to_json()))
"""

LOAD = """
import json, resource, sys, time, torch
from dsv2cli.checkpoint.loader import build_empty, load_checkpoint, load_hf_checkpoint
from dsv2cli.presets import preset_config
build_empty(preset_config("tiny"))  # one-time lazy imports of meta-device init, outside the timing
start = time.perf_counter()
if sys.argv[2] == "native":
    model = load_checkpoint(sys.argv[1])
else:
    model = load_hf_checkpoint(sys.argv[1], dtype=torch.bfloat16)
loaded = time.perf_counter() - start
total = sum(float(p.float().sum()) for p in model.state_dict().values())
touched = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": loaded, "load_and_read_s": touched, "peak_rss_bytes": peak}))
"""


def matmul_table(repeats: int = 20) -> list[tuple[str, float]]:
    """Milliseconds of one Lite expert's gate_up matmul ([2816, 2048]) for 1 and 16 tokens."""
    from dsv2cli.model.quantized import int8_linear, quantize_rows

    w = torch.randn(2816, 2048) * 0.02
    q, scale = quantize_rows(w)
    rows = []
    for tokens in (1, 16):
        for label, dtype, int8 in (
            ("bfloat16", torch.bfloat16, False),
            ("int8, bfloat16 activations (int8 kernel)", torch.bfloat16, True),
            ("float32", torch.float32, False),
            ("int8, float32 activations (dequantize)", torch.float32, True),
        ):
            x = torch.randn(tokens, 2048, dtype=dtype)
            weight = w.to(dtype)

            def call(x=x, weight=weight, int8=int8):
                return int8_linear(x, q, scale) if int8 else torch.nn.functional.linear(x, weight)

            call()
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            rows.append((f"{tokens} token{'s' if tokens > 1 else ''}, {label}", (time.perf_counter() - start) / repeats * 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.5, help="Upper bound on the synthetic checkpoint's size.")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dsv2-bench-convert"), help="Scratch directory (deleted).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch directory.")
    parser.add_argument("--no-int8", action="store_true", help="Skip the int8 conversion and its probe.")
    args = parser.parse_args()

    config = lite_config(args.size_gb)
    total, layer = checkpoint_bytes(config), largest_layer_bytes(config)
    needed = 4 * total if not args.no_int8 else 3 * total
    args.dir.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.dir.parent).free < needed + GB:
        raise SystemExit(f"needs {needed / GB:.1f} GB free under {args.dir.parent}")
    shutil.rmtree(args.dir, ignore_errors=True)
    source = args.dir / "hf"
    try:
        start = time.perf_counter()
        write_synthetic(config, source)
        print(
            f"synthetic DeepSeek-V2-Lite shapes, {config.num_hidden_layers} layers: {total / GB:.2f} GB in "
            f"{len(list(source.glob('*.safetensors')))} shards, written in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
        copy_s = plain_copy(source, args.dir / "copy")
        copy_hash_s = copy_s + sha256_files(args.dir / "copy")
        report = run_python(CONVERT, str(source), str(args.dir / "native"), "none")
        peak = report["peak_rss_bytes"]  # getrusage(RUSAGE_SELF) of the conversion's own process
        convert_speed, copy_speed = report["bytes_read"] / report["seconds"], total / copy_s
        native = run_python(LOAD, str(args.dir / "native"), "native")
        hf = run_python(LOAD, str(source), "hf")
        limit = 1.5 * layer + 300 * 10**6
        rows = [
            (
                "conversion throughput",
                f"{convert_speed / GB:.2f} GB/s",
                f"copy {copy_speed / GB:.2f} GB/s",
                convert_speed / copy_speed,
                ">= 0.5",
            ),
            (
                "conversion time",
                f"{report['seconds']:.1f} s",
                f"copy + sha256 of the copy {copy_hash_s:.1f} s",
                copy_hash_s / report["seconds"],
                "-",
            ),
            (
                "conversion peak RSS",
                f"{peak / 2**20:.0f} MiB",
                f"largest layer {layer / 2**20:.0f} MiB",
                peak / layer,
                f"<= {limit / layer:.2f} (1.5 x + 300 MB)",
            ),
            (
                "load time",
                f"native {native['load_s']:.3f} s",
                f"HF {hf['load_s']:.3f} s",
                native["load_s"] / hf["load_s"],
                "<= 0.2",
            ),
            (
                "load + read every weight",
                f"native {native['load_and_read_s']:.2f} s",
                f"HF {hf['load_and_read_s']:.2f} s",
                native["load_and_read_s"] / hf["load_and_read_s"],
                "-",
            ),
        ]
        print("\n| measure | dsv2 | reference | ratio | target |\n|---|---|---|---|---|")
        for name, ours, ref, ratio, target in rows:
            print(f"| {name} | {ours} | {ref} | {ratio:.2f} | {target} |")
        print(
            f"\nconversion: {report['seconds']:.1f} s for {report['tensors']} tensors in {report['files']} files, of which "
            f"{report['hash_wait_seconds']:.1f} s waiting for sha256 after the last byte was written; this machine hashes "
            f"{sha256_speed() / GB:.2f} GB/s per thread (sha256 in memory). Load peak RSS: native "
            f"{native['peak_rss_bytes'] / 2**20:.0f} MiB, HF {hf['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
        shutil.rmtree(args.dir / "copy")
        if not args.no_int8:
            shutil.rmtree(args.dir / "native")
            q = run_python(CONVERT, str(source), str(args.dir / "int8"), "int8")
            quality = q["quality"]
            print(
                f"\nint8: {q['seconds']:.1f} s ({q['bytes_read'] / q['seconds'] / GB:.2f} GB/s), {q['bytes_written'] / GB:.2f} GB written, "
                f"peak RSS {q['peak_rss_bytes'] / 2**20:.0f} MiB (with the probe {q['probe_peak_rss_bytes'] / 2**20:.0f} MiB); probe over {quality['tokens']} {quality['token_source']}: "
                f"mean log p {quality['source_mean_logprob']:.4f} -> {quality['result_mean_logprob']:.4f} "
                f"(change {quality['delta_mean_logprob']:+.4f}), top-1 agreement {quality['top1_agreement']:.0%}"
            )
        print("\n| one Lite expert gate_up matmul [2816 x 2048] | ms |\n|---|---|")
        for label, ms in matmul_table():
            print(f"| {label} | {ms:.3f} |")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
