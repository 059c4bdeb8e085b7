"""Cold and warm start of `dsv2 generate` on a full-size checkpoint: weights read ahead vs faulted in.

For a checkpoint (by default the int8 copy of the full-size DeepSeek-V2-Lite made with
``benchmarks/full_size.py`` and ``dsv2 convert --quantize int8``), each round measures in fresh processes:

* ``disk``: the page cache emptied, every weight file read front to back in 16 MiB blocks (the disk's
  sequential speed: the bound a cold start can reach);
* ``cold-read-ahead``: the page cache emptied, then what ``dsv2 generate`` does: check, read the weight
  files ahead, load, prefill the prompt, decode;
* ``cold-faults``: the page cache emptied, the same without reading ahead (pages are faulted in by the
  steps that touch them, as before read-ahead existed);
* ``warm``: the files already in the page cache (right after a cold run).

For each: seconds to load (read-ahead included), to the first generated token (from process start
of the load), the first decode steps one by one, and the steady decode rate. Emptying the page cache
needs root (``/proc/sys/vm/drop_caches``); without it the cold rows are skipped.

    python benchmarks/bench_cold_start.py --checkpoint /root/bench/lite-int8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK = 16 << 20
MODES = ("disk", "cold-read-ahead", "cold-faults", "warm")


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def disk_read(checkpoint: Path) -> dict:
    """Read every weight file once in large blocks: bytes and seconds."""
    buffer = bytearray(BLOCK)
    total, start = 0, time.perf_counter()
    for path in _files(checkpoint):
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def generate(checkpoint: Path, read_weights: bool, steps: int, threads: int) -> dict:
    """Load as ``dsv2 generate`` does, then time the prompt and each decode step."""
    import torch

    from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
    from dsv2cli.inference.session import load_for_generation

    class Record:  # what `dsv2 generate` would show, kept
        report = None
        warnings: list[str] = []

        def warn(self, message: str) -> None:
            self.warnings.append(message)

        def reading(self, total_bytes: int):
            return lambda n: None

        def read(self, report) -> None:
            self.report = report

    record = Record()
    start = time.perf_counter()
    loaded = load_for_generation(str(checkpoint), "cpu", "auto", threads, progress=record, read_weights=read_weights)
    load_s = time.perf_counter() - start
    prompt = loaded.tokenizer.encode("def fibonacci(n):") if loaded.tokenizer else [100, 200, 300]
    options = GenerationOptions(max_new_tokens=steps, ignore_eos=True)
    times = []
    last = time.perf_counter()
    with torch.inference_mode():
        for _ in Generation(loaded.model, [GenerationRequest(list(prompt))], options, loaded.tokenizer):
            now = time.perf_counter()
            times.append(now - last)
            last = now
    return {
        "load_s": load_s,
        "first_token_s": load_s + times[0],
        "prefill_s": times[0],
        "first_steps_s": times[1:6],
        "steady_tokens_per_s": (len(times) - 6) / sum(times[6:]) if len(times) > 6 else None,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "read_ahead": record.report.to_json() if record.report else None,
        "warnings": record.warnings,
    }


def run_child(mode: str, checkpoint: Path, steps: int, threads: int) -> dict:
    args = [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint), "--steps", str(steps)]
    done = subprocess.run([*args, "--threads", str(threads)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="tokens generated per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "disk":
        print(json.dumps(disk_read(args.checkpoint)))
        return
    if args.child:
        print(json.dumps(generate(args.checkpoint, args.child != "cold-faults", args.steps, args.threads)))
        return

    can_drop = drop_page_cache()
    if not can_drop:
        print("cannot empty the page cache (needs root): cold rows skipped", file=sys.stderr)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES:
            if mode != "warm" and not can_drop:
                continue
            if mode != "warm":
                drop_page_cache()
            result = run_child(mode, args.checkpoint, args.steps, args.threads)
            results[mode].append(result)
            print(f"round {round_index + 1} {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)

    disk = max((r["gb_per_s"] for r in results["disk"]), default=None)
    gb = sum(p.stat().st_size for p in _files(args.checkpoint)) / 1e9
    print(f"\n{args.checkpoint} ({gb:.1f} GB of weight files), {args.threads} threads, best of {args.rounds} rounds")
    if disk:
        print(f"disk, sequential read of every file: {disk:.2f} GB/s ({gb / disk:.1f} s)")
    print("| start | load s (read-ahead incl.) | weights read at | first token s | decode steps 1-5, s each | steady tokens/s |")
    print("|---|---:|---:|---:|---|---:|")
    for mode in MODES[1:]:
        rows = results[mode]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["first_token_s"])
        ahead = best["read_ahead"]
        speed = f"{ahead['read_bytes'] / ahead['seconds'] / 1e9:.2f} GB/s" if ahead and ahead["read_bytes"] else "—"
        steps = ", ".join(f"{s:.2f}" for s in best["first_steps_s"])
        steady = max((r["steady_tokens_per_s"] or 0) for r in rows)
        print(f"| {mode} | {best['load_s']:.1f} | {speed} | {best['first_token_s']:.1f} | {steps} | {steady:.2f} |")
    ahead = [r["read_ahead"] for r in results["cold-read-ahead"] if r["read_ahead"]]
    if disk and ahead:
        best = max(a["read_bytes"] / a["seconds"] / 1e9 for a in ahead)
        print(f"\nread-ahead speed / the disk's sequential read: {best / disk:.2f}x")
    for warning in {w for rows in results.values() for r in rows for w in r.get("warnings", [])}:
        print(f"warning shown to the user: {warning}")


def _files(checkpoint: Path) -> tuple[Path, ...]:
    from dsv2cli.checkpoint.fit import stored_weights

    return stored_weights(checkpoint).files


if __name__ == "__main__":
    main()
