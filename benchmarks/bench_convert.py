"""`dsv2 convert --quantize int8` against llama.cpp's `convert_hf_to_gguf.py --outtype q8_0`, side by side.

Both convert the same bfloat16 HF checkpoint on the same machine in the same run, as child processes
timed from start to exit (interpreter start and imports included), with the page cache emptied
before each (``sync; echo 1 > /proc/sys/vm/drop_caches``, when run as root: a checkpoint larger than
memory is read from disk either way, a smaller one would otherwise favour whoever runs second).
Rounds alternate which converter goes first; each output is deleted right after it is measured.
Reported: wall seconds and peak RSS of each (the child's ``rusage``), and dsv2 / llama.cpp.

    python benchmarks/bench_convert.py --checkpoint /data/lite-bf16 --llama-cache /root/llamacpp
    python benchmarks/bench_convert.py                  # a 2.5 GB synthetic V2-Lite-shaped checkpoint
    python benchmarks/bench_convert.py --probe          # also the quality probe's cost (one more dsv2 run)
    python benchmarks/bench_convert.py --layout         # also layout conversion vs a plain copy, and load times

Without ``--checkpoint`` a synthetic HF checkpoint with DeepSeek-V2-Lite's layer shapes (random
bfloat16 weights, fewer layers, ``--size-gb``) is written under ``--dir`` and deleted afterwards.
llama.cpp comes from ``bench_vs_llamacpp.py``'s cache (``--llama-cache``: the llama-cpp-python sdist's
``vendor/llama.cpp`` and a copy of the converter that accepts the demo tokenizer; downloaded once if
missing). ``--layout`` adds the older measurements: HF -> native (dtype kept) against a plain copy of
the files, its peak RSS against the largest layer, native vs HF-layout load time, and one expert's
int8 matmul against bfloat16 / float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_vs_llamacpp import converter, llama_source  # noqa: E402
from full_size import checkpoint_bytes, lite_config, write_checkpoint  # noqa: E402

from dsv2cli.checkpoint.hf_keys import hf_tensor_shapes  # noqa: E402

GB = 10**9
SHARD_BYTES = 10**9
# Bytes each result takes per source byte (bfloat16 in): dsv2 int8 ~1.01 bytes a weight, Q8_0 34 bytes per 32 weights.
OUTPUT_SHARE = {"dsv2": 0.51, "llama.cpp": 0.54}


@dataclass
class Run:
    """One converter run: wall seconds and peak RSS of the child process, and dsv2's own report."""

    name: str
    seconds: float
    peak_rss_bytes: int
    report: dict | None = None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def drop_caches() -> bool:
    """Empty the page cache (root only); returns whether it was."""
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")
    return True


def timed_child(name: str, command: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``command`` to completion: its wall time, its own peak RSS (``wait4``) and the JSON it printed, if any."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"{name} failed ({child.returncode}):\n{stderr.decode(errors='replace')[-3000:]}")
    report = json.loads(stdout) if stdout.strip().startswith(b"{") else None
    return Run(name, seconds, usage.ru_maxrss * 1024, report)


def run_dsv2(checkpoint: Path, output: Path, probe: bool = False) -> Run:
    command = [sys.executable, "-m", "dsv2cli", "convert", str(checkpoint), str(output), "--quantize", "int8"]
    return timed_child("dsv2", [*command, "--probe" if probe else "--no-probe", "--format", "json"])


def run_llamacpp(script: Path, source: Path, checkpoint: Path, output: Path) -> Run:
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    command = [sys.executable, str(script), str(checkpoint), "--outtype", "q8_0", "--outfile", str(output)]
    return timed_child("llama.cpp", command, env)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_disk(directory: Path, need: float) -> None:
    free = shutil.disk_usage(directory).free
    if free < need + GB:
        raise SystemExit(f"needs {need / GB:.1f} GB (+1 GB) free under {directory}, {free / GB:.1f} GB free")


def side_by_side(checkpoint: Path, out_dir: Path, rounds: int, llama: tuple[Path, Path] | None) -> list[Run]:
    """``rounds`` interleaved rounds (the first converter alternates); caches dropped before each run."""
    source_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    runs: list[Run] = []
    for round_ in range(rounds):
        order = ["dsv2", "llama.cpp"] if llama is not None else ["dsv2"]
        for name in order if round_ % 2 == 0 else order[::-1]:
            output = out_dir / ("dsv2-int8" if name == "dsv2" else "llamacpp-q8_0.gguf")
            check_disk(out_dir, OUTPUT_SHARE[name] * source_bytes)
            cold = drop_caches()
            try:
                run = run_dsv2(checkpoint, output) if name == "dsv2" else run_llamacpp(llama[0], llama[1], checkpoint, output)
            finally:
                remove(output)
            log(
                f"round {round_ + 1}: {name} {run.seconds:.1f} s, peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB"
                f"{'' if cold else ' (page cache NOT dropped: not root)'}"
            )
            runs.append(run)
    return runs


def print_comparison(runs: list[Run], checkpoint: Path, cold: bool) -> None:
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(
        f"\n{checkpoint}: {size / GB:.1f} GB of bfloat16 weights; page cache {'dropped' if cold else 'NOT dropped'} before each run"
    )
    print("\n| converter | round | wall s | peak RSS MiB |\n|---|---|---|---|")
    count: dict[str, int] = {}
    for run in runs:
        count[run.name] = count.get(run.name, 0) + 1
        print(f"| {run.name} | {count[run.name]} | {run.seconds:.1f} | {run.peak_rss_bytes / 2**20:.0f} |")
    ours = [r for r in runs if r.name == "dsv2"]
    theirs = [r for r in runs if r.name == "llama.cpp"]
    for run in ours:
        report = run.report or {}
        log(
            f"dsv2's own report: {report.get('seconds', 0):.1f} s converting (of it "
            f"{report.get('write_wait_seconds', 0):.1f} s waiting for the writer at the end), "
            f"{report.get('bytes_written', 0) / GB:.2f} GB written"
        )
    if theirs:
        pairs = list(zip(ours, theirs, strict=True))
        ratios = ", ".join(f"{a.seconds / b.seconds:.2f}" for a, b in pairs)
        best = min(r.seconds for r in ours) / min(r.seconds for r in theirs)
        print(f"\ndsv2 / llama.cpp wall time: {ratios} by round; best against best {best:.2f} (target <= 1.0)")
    print(f"dsv2 peak RSS: {max(r.peak_rss_bytes for r in ours) / GB:.2f} GB (target <= 1.5 GB)")


def probe_cost(checkpoint: Path, out_dir: Path) -> None:
    """One more dsv2 run with ``--probe``: what the quality probe adds to the conversion."""
    source_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    check_disk(out_dir, OUTPUT_SHARE["dsv2"] * source_bytes)
    drop_caches()
    output = out_dir / "dsv2-int8-probed"
    try:
        run = run_dsv2(checkpoint, output, probe=True)
    finally:
        remove(output)
    report = run.report
    quality = report["quality"]
    print(
        f"\nwith --probe: {run.seconds:.1f} s wall, of it {report['seconds']:.1f} s converting and "
        f"{report['probe_seconds']:.1f} s probing ({report['probe_seconds'] / report['seconds']:.0%} of the conversion); "
        f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB converting, {report['probe_peak_rss_bytes'] / 2**20:.0f} MiB "
        f"probing; mean log p {quality['reference_mean_logprob']:.4f} -> {quality['candidate_mean_logprob']:.4f}, top-1 "
        f"agreement {quality['top1_agreement']:.0%} over {quality['tokens']} tokens ({quality['token_source']})"
    )


# ---- --layout: layout conversion against a plain copy, load times, one expert's int8 matmul ------------------------


def largest_layer_bytes(config) -> int:
    per_layer: dict[str, int] = {}
    for name, shape in hf_tensor_shapes(config).items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        per_layer[key] = per_layer.get(key, 0) + 2 * torch.Size(shape).numel()
    return max(per_layer.values())


def plain_copy(source: Path, target: Path) -> float:
    """Seconds to copy every file of ``source`` and flush the copies to disk, as the converter does."""
    target.mkdir()
    start = time.perf_counter()
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copyfile(path, target / path.name)
    for path in sorted(target.iterdir()):
        with path.open("rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - start


def sha256_speed() -> float:
    """This machine's single-thread sha256 speed in bytes per second (64 MiB in memory)."""
    data = os.urandom(64 << 20)
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - start)


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


def load_times(directory: Path, layout: str) -> dict:
    return timed_child("load", [sys.executable, "-c", LOAD, str(directory), layout]).report


def matmul_table(repeats: int = 20) -> list[tuple[str, float]]:
    """Milliseconds of one Lite expert's gate_up matmul ([2816, 2048]) for 1 and 16 tokens."""
    from dsv2cli import kernels
    from dsv2cli.model.quantized import int8_linear, quantize_rows

    handle = kernels.load()  # int8 products as generation runs them: dsv2's kernels where they build

    w = torch.randn(2816, 2048) * 0.02
    q, scale = quantize_rows(w)
    rows = []
    for tokens in (1, 16):
        for label, dtype, int8 in (
            ("bfloat16", torch.bfloat16, False),
            ("int8, bfloat16 activations", torch.bfloat16, True),
            ("float32", torch.float32, False),
            ("int8, float32 activations", torch.float32, True),
        ):
            x = torch.randn(tokens, 2048, dtype=dtype)
            weight = w.to(dtype)

            def call(x=x, weight=weight, int8=int8):
                return int8_linear(x, q, scale, handle) if int8 else torch.nn.functional.linear(x, weight)

            call()
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            rows.append((f"{tokens} token{'s' if tokens > 1 else ''}, {label}", (time.perf_counter() - start) / repeats * 1e3))
    return rows


def layout_measurements(checkpoint: Path, out_dir: Path) -> None:
    """HF -> native (dtype kept) against a plain copy (both from the page cache), peak RSS, load times."""
    from dsv2cli.config import load_config

    config = load_config(checkpoint)
    total, layer = checkpoint_bytes(config), largest_layer_bytes(config)
    check_disk(out_dir, 2 * total)
    copy, native = out_dir / "copy", out_dir / "native"
    try:
        copy_s = plain_copy(checkpoint, copy)
        remove(copy)
        run = timed_child("dsv2", [sys.executable, "-m", "dsv2cli", "convert", str(checkpoint), str(native), "--format", "json"])
        report = run.report
        native_load, hf_load = load_times(native, "native"), load_times(checkpoint, "hf")
    finally:
        remove(copy)
        remove(native)
    speed = report["bytes_read"] / report["seconds"]
    print("\n| layout conversion (dtype kept) | dsv2 | reference | ratio |\n|---|---|---|---|")
    print(f"| throughput | {speed / GB:.2f} GB/s | plain copy {total / copy_s / GB:.2f} GB/s | {speed * copy_s / total:.2f} |")
    print(
        f"| peak RSS | {run.peak_rss_bytes / 2**20:.0f} MiB | largest layer {layer / 2**20:.0f} MiB | {run.peak_rss_bytes / layer:.2f} |"
    )
    print(
        f"| load time | native {native_load['load_s']:.3f} s | HF {hf_load['load_s']:.3f} s | "
        f"{native_load['load_s'] / hf_load['load_s']:.2f} |"
    )
    print(
        f"| load + read every weight | native {native_load['load_and_read_s']:.2f} s | HF {hf_load['load_and_read_s']:.2f} s | "
        f"{native_load['load_and_read_s'] / hf_load['load_and_read_s']:.2f} |"
    )
    print(f"\nthis machine hashes {sha256_speed() / GB:.2f} GB/s per thread (sha256 in memory)")
    print("\n| one Lite expert gate_up matmul [2816 x 2048] | ms |\n|---|---|")
    for label, ms in matmul_table():
        print(f"| {label} | {ms:.3f} |")


def synthetic_config(size_gb: float):
    """DeepSeek-V2-Lite with as many layers as fit in ``size_gb`` (at least one dense and one MoE layer)."""
    config = lite_config()
    for layers in range(2, config.num_hidden_layers + 1):
        if checkpoint_bytes(config.replace(num_hidden_layers=layers)) > size_gb * GB:
            return config.replace(num_hidden_layers=max(2, layers - 1))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="bfloat16 HF checkpoint to convert (default: a synthetic one)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of both converters (default 1; 0: none)")
    parser.add_argument(
        "--dir", type=Path, default=Path("/tmp/dsv2-bench-convert"), help="outputs (and the synthetic checkpoint)"
    )
    parser.add_argument("--size-gb", type=float, default=2.5, help="upper bound on the synthetic checkpoint's size")
    parser.add_argument(
        "--llama-cache", type=Path, default=Path.home() / ".cache" / "dsv2cli" / "llamacpp", help="bench_vs_llamacpp's cache"
    )
    parser.add_argument("--skip-llamacpp", action="store_true", help="dsv2 only")
    parser.add_argument("--probe", action="store_true", help="also time one dsv2 run with the quality probe")
    parser.add_argument("--layout", action="store_true", help="also the layout / load / matmul measurements")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    synthetic = args.dir / "synthetic-hf" if args.checkpoint is None else None
    try:
        if synthetic is not None:
            shutil.rmtree(synthetic, ignore_errors=True)
            config = synthetic_config(args.size_gb)
            write_checkpoint(config, synthetic, SHARD_BYTES, progress=False)
            log(f"synthetic DeepSeek-V2-Lite shapes, {config.num_hidden_layers} layers: {checkpoint_bytes(config) / GB:.2f} GB")
        checkpoint = args.checkpoint or synthetic
        llama = None
        if not args.skip_llamacpp:
            source = llama_source(args.llama_cache)
            llama = (converter(source, args.llama_cache), source)
        if args.rounds > 0:
            runs = side_by_side(checkpoint, args.dir, args.rounds, llama)
            print_comparison(runs, checkpoint, cold=os.geteuid() == 0)
        if args.probe:
            probe_cost(checkpoint, args.dir)
        if args.layout:
            layout_measurements(checkpoint, args.dir)
    finally:
        if synthetic is not None:
            shutil.rmtree(synthetic, ignore_errors=True)


if __name__ == "__main__":
    main()
