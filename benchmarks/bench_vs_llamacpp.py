"""dsv2 against llama.cpp on CPU: same random model, same precision, same threads, one run.

Builds llama.cpp from the PyPI sdist of llama-cpp-python (its ``vendor/llama.cpp``: CMake files,
``llama-bench``, ``convert_hf_to_gguf.py``) once into a cache directory, takes ``--checkpoint`` (the
figures to publish: the full-size DeepSeek-V2-Lite-shaped checkpoint of ``benchmarks/full_size.py``)
or writes a small random one (the ``bench-300m`` preset, whose weights fit this CPU's cache), converts
it to GGUF (Q4_0 through ``llama-quantize`` from a bf16 GGUF, llama.cpp's documented path) and to dsv2 int8
and int4 checkpoints, then measures in the same run:

* decode tokens/s after 128 / 1024 / 4096 tokens of context, and prefill tokens/s of 512 tokens,
  for llama.cpp (``llama-bench -d``) at F32, Q8_0 and Q4_0 and for dsv2 at float32, bfloat16, int8 and int4, with
  the default flags of ``dsv2 generate`` (compiled decode steps), eagerly (``--no-compile``: ``-eager``
  modes) and with a bfloat16 latent cache (``--kv-cache-dtype bfloat16``: ``-bf16cache`` modes);
* ``--batch`` sequences (8) decoding together, against one;
* every engine from the same page-cache state: the page cache emptied (as root), then that engine's
  weight files read, before each of its runs;
* the memory-bandwidth floor of each precision: the bytes of weights one decoded token reads,
  divided by the bandwidth of a large copy, measured after every round; the fastest copy sets the
  floor (neighbours on a shared host slow copies down as they slow decoding down);
* the same floor paired: each dsv2 worker also copies just before and just after the steps it times
  at each context, and divides that moment's step time by the floor of the faster of those two copies,
  so that a slow minute slows both sides of the ratio (this VM's copies range over 35-75 GB/s).

Ratios are dsv2 / llama.cpp in tokens/s (above 1 = dsv2 is faster). Every engine runs ``--rounds``
times, interleaved, and keeps its best: shared machines only ever slow a run down.

    python benchmarks/bench_vs_llamacpp.py                      # ~12 minutes after the first build
    python benchmarks/bench_vs_llamacpp.py --checkpoint /data/lite-bf16 --precisions int8 int8-eager --skip-quality
    python benchmarks/bench_vs_llamacpp.py --checkpoint /data/lite-bf16 --precisions int4 int8 --skip-quality --rounds 1
    python benchmarks/bench_vs_llamacpp.py --contexts 128 --steps 8 --skip-llamacpp
    python benchmarks/bench_vs_llamacpp.py --cache-dir /tmp/llamacpp --threads 4

The first run downloads the sdist with pip and builds ``llama-bench`` (about 15 minutes on 2 cores);
later runs reuse ``--cache-dir`` (``benchmarks/llamacpp.py``, shared with ``bench_serve.py``). The converter
copy the benchmark uses accepts the random tokenizer's unknown pre-tokenizer (it would otherwise refuse
it); nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generate import make_checkpoint, memory_bandwidth_gbs, read_bandwidth_gbs  # noqa: E402
from llamacpp import (  # noqa: E402  (bench_convert.py imports converter and llama_source from here)
    DEFAULT_CACHE,
    converter,
    llama_bench_binary,
    llama_source,
    log,
    same_page_cache_state,
    to_gguf,
)

from dsv2cli.analysis.params import count_params  # noqa: E402
from dsv2cli.config import ModelConfig, load_config  # noqa: E402

PRESET = "bench-300m"
DEMO = ROOT / "dsv2cli" / "assets" / "demo"
# precision[-eager][-bf16cache]: weights; decode steps compiled as `dsv2 generate` runs them by default, or eager
# (--no-compile); a bfloat16 latent cache (--kv-cache-dtype bfloat16; llama.cpp's own default cache is F16)
DSV2_MODES = (
    "float32",
    "bfloat16",
    "int8",
    "int4",
    "float32-eager",
    "bfloat16-eager",
    "int8-eager",
    "float32-bf16cache",
    "int8-bf16cache",
)
LLAMA_PRECISIONS = {"float32": "f32", "int8": "q8_0", "int4": "q4_0"}  # dsv2 precision -> GGUF type compared with it


def parse_mode(mode: str) -> tuple[str, bool, torch.dtype | None]:
    """``precision[-eager][-bf16cache]`` -> (precision, compiled, latent cache dtype or None for the model's)."""
    precision = mode.split("-")[0]
    return precision, "-eager" not in mode, torch.bfloat16 if mode.endswith("-bf16cache") else None


# ---- llama.cpp: bench (built and converted by llamacpp.py) -------------------------------------------------


def run_llama_bench(
    binary: Path, gguf: Path, threads: int, contexts: list[int], steps: int, prefill: int, repetitions: int
) -> dict:
    """Decode tokens/s at each depth and prefill tokens/s, from ``llama-bench -o json``."""

    def bench(args: list[str]) -> list[dict]:
        # --repack 0: the AMX repacking of this build asserts on DeepSeek-V2 Q8_0 files (GGML_ASSERT(*cur_backend_id != -1))
        command = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "--repack", "0", "-o", "json", *args]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads(done.stdout)

    result: dict = {"decode_tokens_per_s": {}}
    for row in bench(["-p", "0", "-n", str(steps), "-d", ",".join(map(str, contexts))]):
        result["decode_tokens_per_s"][str(row["n_depth"])] = row["avg_ts"]
    (row,) = bench(["-p", str(prefill), "-n", "0"])
    result["prefill_tokens_per_s"] = row["avg_ts"]
    return result


# ---- dsv2 ------------------------------------------------------------------------------------------------------


def run_dsv2(checkpoint: Path, mode: str, threads: int, contexts: list[int], steps: int, prefill: int, batch: int = 1) -> dict:
    """Prefill and decode through the same calls ``dsv2 generate`` makes (runs in its own process).

    ``mode`` is a precision: decode steps run through :class:`CompiledDecoder` (the default of ``dsv2
    generate``) on a cache whose capacity is rounded like the engine's, compiled before timing (the compile
    time is reported apart), or eagerly with ``-eager``; ``-bf16cache``: the latent cache holds bfloat16.
    ``batch`` > 1: also ``batch`` sequences decoding together at the first context.
    """
    from dsv2cli.inference.compiled import CompiledDecoder, round_capacity
    from dsv2cli.inference.engine import prefill_attention
    from dsv2cli.inference.session import load_for_generation, with_attention_kernel

    precision, compiled, cache_dtype = parse_mode(mode)
    torch.manual_seed(0)
    if precision in ("int8", "int4"):
        loaded = load_for_generation(str(quantized_directory(checkpoint, precision)), "cpu", "float32", threads)
    else:
        loaded = load_for_generation(str(checkpoint), "cpu", precision, threads)
    model = loaded.model
    forward = with_attention_kernel(loaded.options, loaded.device, enabled=False)  # eager steps: BLAS attention
    vocab = model.config.vocab_size
    decoder = None

    def prefill_into(tokens: torch.Tensor, capacity: int):
        cache = model.new_cache(tokens.shape[0], round_capacity(capacity) if compiled else capacity, dtype=cache_dtype)
        attention = prefill_attention("absorbed", tokens.shape[1])
        logits = model(tokens, cache=cache, attention=attention, last_only=True, options=forward)
        return cache, logits

    result: dict = {"decode_tokens_per_s": {}, "paired_bandwidth_gbs": {}, "compile_s": 0.0}
    with torch.inference_mode():
        cache, logits = prefill_into(torch.randint(0, vocab, (1, 32)), 40)
        model(logits[:, -1:].argmax(-1), cache=cache, options=forward)
        tokens = torch.randint(0, vocab, (1, prefill))
        start = time.perf_counter()
        prefill_into(tokens, prefill + 1)
        result["prefill_tokens_per_s"] = prefill / (time.perf_counter() - start)  # eager in every mode
        decoder = CompiledDecoder(model) if compiled else None
        runs = [(context, 1) for context in contexts] + ([(contexts[0], batch)] if batch > 1 else [])
        for context, rows in runs:
            cache, logits = prefill_into(torch.randint(0, vocab, (rows, context)), context + steps + 3)
            if decoder is not None:
                result["compile_s"] += decoder.prepare(cache)
                step = decoder.step
            else:
                step = lambda token, cache: model(token, cache=cache, options=forward)  # noqa: E731
            token = logits[:, -1:].argmax(-1)
            before = memory_bandwidth_gbs(threads)
            times = []
            for index in range(steps + 2):
                start = time.perf_counter()
                logits = step(token, cache)
                token = logits[:, -1:].argmax(-1)
                if index >= 2:  # the first two steps warm this context's buffers
                    times.append(time.perf_counter() - start)
            if rows > 1:
                result["batch_decode_tokens_per_s"] = {"rows": rows, "context": context, "value": rows / statistics.median(times)}
                continue
            result["decode_tokens_per_s"][str(context)] = 1.0 / statistics.median(times)
            result["paired_bandwidth_gbs"][str(context)] = max(before, memory_bandwidth_gbs(threads))
    return result


def engine_files(job: list[str] | Path, checkpoint: Path) -> list[Path]:
    """The weight files an engine reads: its GGUF file, or the dsv2 checkpoint its mode loads."""
    if isinstance(job, Path):
        return [job]
    precision = parse_mode(job[job.index("--worker") + 1])[0]
    directory = quantized_directory(checkpoint, precision) if precision in ("int8", "int4") else checkpoint
    return sorted(directory.glob("*.safetensors"))


def quantized_directory(checkpoint: Path, precision: str) -> Path:
    return checkpoint.parent / f"{checkpoint.name}-dsv2-{precision}"


def make_dsv2_quantized(checkpoint: Path, precision: str) -> None:
    """``dsv2 convert --quantize int8|int4`` of the checkpoint, beside it."""
    from dsv2cli.checkpoint.convert import convert_checkpoint

    if not (quantized_directory(checkpoint, precision) / "manifest.json").is_file():
        log(f"converting to a dsv2 {precision} checkpoint ...")
        convert_checkpoint(str(checkpoint), quantized_directory(checkpoint, precision), quantize=precision, probe=False)


def write_checkpoint(checkpoint: Path) -> None:
    """Random bench-300m weights (written by transformers) with the demo's tokenizer files."""
    if (checkpoint / "config.json").is_file():
        return
    log(f"writing a random {PRESET} checkpoint to {checkpoint} ...")
    make_checkpoint(checkpoint, PRESET)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(DEMO / name, checkpoint / name)


# ---- report ----------------------------------------------------------------------------------------------------


def active_bytes(config: ModelConfig, precision: str) -> float:
    """Weight bytes one decoded token reads (the embedding row is left out).

    int8: one byte per value of every quantized matrix (their float32 row scales, well under 1 MB,
    are left out); the router stays float32, and ``kv_b_proj``, float32 too, is read in decode through its
    int8 copies, one byte per value (``Int8Absorbed`` in ``dsv2cli/model/quantized.py``; int4 models too).
    """
    params = count_params(config).active_without_embedding
    if precision == "float32":
        return params * 4
    if precision == "bfloat16":
        return params * 2
    layers, moe_layers = config.num_hidden_layers, sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    kv_b = layers * config.kv_lora_rank * config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim)
    router = moe_layers * (config.n_routed_experts or 0) * config.hidden_size
    per_value = 1 if precision == "int8" else 0.5 + 2 / 32  # int4: a nibble, and a float16 scale per 32 values
    return (params - kv_b - router) * per_value + kv_b + router * 4


def bytes_per_token(config: ModelConfig, mode: str, context: int, with_cache: bool) -> float:
    """Bytes one decode step of ``mode`` reads: its weights, plus the latent cache over ``context`` tokens when ``with_cache``."""
    precision, _, cache_dtype = parse_mode(mode)
    entry_bytes = 2 if (cache_dtype or precision == "bfloat16") else 4  # int8 models cache float32 by default
    entry_values = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)  # per cached token
    return active_bytes(config, precision) + with_cache * context * entry_values * entry_bytes


def print_report(
    results: dict,
    contexts: list[int],
    prefill: int,
    threads: int,
    bandwidths: list[float],
    reads: list[float],
    config: ModelConfig,
    name: str,
) -> None:
    bandwidth = max(bandwidths)
    print(f"\n{name}: random DeepSeek-V2-shaped model, {threads} threads, CPU")
    measured = ", ".join(f"{b:.1f}" for b in bandwidths)
    print(f"memory bandwidth (large copy, read + write) {bandwidth:.1f} GB/s, the fastest of {measured} (one per round)")
    read_measured = ", ".join(f"{b:.1f}" for b in reads)
    print(f"read bandwidth (sum over 1 GiB) {max(reads):.1f} GB/s, the fastest of {read_measured} (one per round)\n")
    columns = [
        ("llama.cpp F32", "llama:f32"),
        ("dsv2 float32", "dsv2:float32"),
        ("dsv2 float32 eager", "dsv2:float32-eager"),
        ("dsv2 float32, bf16 cache", "dsv2:float32-bf16cache"),
        ("dsv2 bfloat16", "dsv2:bfloat16"),
        ("dsv2 bfloat16 eager", "dsv2:bfloat16-eager"),
        ("llama.cpp Q8_0", "llama:q8_0"),
        ("dsv2 int8", "dsv2:int8"),
        ("dsv2 int8 eager", "dsv2:int8-eager"),
        ("dsv2 int8, bf16 cache", "dsv2:int8-bf16cache"),
        ("llama.cpp Q4_0", "llama:q4_0"),
        ("dsv2 int4", "dsv2:int4"),
    ]
    columns = [(label, key) for label, key in columns if key in results]
    ratios = [
        ("float32 ratio", "dsv2:float32", "llama:f32"),
        ("float32 eager ratio", "dsv2:float32-eager", "llama:f32"),
        ("float32 bf16 cache ratio", "dsv2:float32-bf16cache", "llama:f32"),
        ("int8 ratio", "dsv2:int8", "llama:q8_0"),
        ("int8 eager ratio", "dsv2:int8-eager", "llama:q8_0"),
        ("int8 bf16 cache ratio", "dsv2:int8-bf16cache", "llama:q8_0"),
        ("int4 ratio", "dsv2:int4", "llama:q4_0"),
        ("dsv2 int4 / int8", "dsv2:int4", "dsv2:int8"),
    ]
    ratios = [r for r in ratios if r[1] in results and r[2] in results]
    lines = [
        "| tokens/s | " + " | ".join(label for label, _ in columns) + "".join(f" | {r[0]}" for r in ratios) + " |",
        "|---" * (len(columns) + len(ratios) + 1) + "|",
    ]

    def value(key: str, context: int | None) -> float | None:
        if key not in results:
            return None
        r = results[key]
        return r["prefill_tokens_per_s"] if context is None else r["decode_tokens_per_s"].get(str(context))

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    rows = [(f"decode @{c}", c) for c in contexts] + [(f"prefill {prefill}", None)]
    for label, context in rows:
        cells = [value(key, context) for _, key in columns]
        text = ["-" if v is None else f"{v:.1f}" for v in cells]
        shown = [ratio(value(ours, context), value(theirs, context)) for _, ours, theirs in ratios]
        lines.append(f"| {label} | " + " | ".join(text + shown) + " |")
    print("\n".join(lines))
    compiled = {key: r["compile_s"] for key, r in results.items() if r.get("compile_s")}
    if compiled:
        print("\ncompile time (first round, all contexts): " + ", ".join(f"{k} {v:.0f} s" for k, v in compiled.items()))
    for key, r in results.items():
        if r.get("batch_decode_tokens_per_s"):
            b = r["batch_decode_tokens_per_s"]
            one = r["decode_tokens_per_s"][str(b["context"])]
            print(
                f"{key}: {b['rows']} sequences decoding together @{b['context']}: {b['value']:.1f} tokens/s ({b['value'] / one:.2f}x one sequence)"
            )
    print(
        "\nratio = dsv2 tokens/s / llama.cpp tokens/s at the same precision, dsv2 with default flags unless the column "
        "says eager (targets: int8 decode >= 1.5, prefill >= 3.5, 8 sequences >= 4x one; int4 decode >= 1.5 x Q4_0 and >= 1.6 x dsv2 int8)\n"
    )
    for title, with_cache in (("weights", False), ("weights + latent cache", True)):
        print(
            f"| dsv2 mode | weight MB/token | floor, {title} (ms/token) @{contexts[0]} | "
            + " | ".join(f"@{c} x floor" for c in contexts)
            + " |"
        )
        print("|---" * (3 + len(contexts)) + "|")
        for mode in DSV2_MODES:
            key = f"dsv2:{mode}"
            if key not in results:
                continue
            floors = [bytes_per_token(config, mode, c, with_cache) / (bandwidth * 1e9) * 1000 for c in contexts]
            multiples = [1000 / results[key]["decode_tokens_per_s"][str(c)] / f for c, f in zip(contexts, floors, strict=True)]
            weights = bytes_per_token(config, mode, 0, False)
            print(f"| {mode} | {weights / 1e6:.0f} | {floors[0]:.1f} | " + " | ".join(f"{m:.2f}" for m in multiples) + " |")
        print()
    print(
        "x floor = decode ms/token / (bytes read per token / the fastest copy bandwidth): weights only (the issue's floor), "
        "or weights plus the latent cache a step reads at that context; target for int8: <= 1.5\n"
    )
    print_paired_floors(results, contexts, config)
    print_read_ceilings(results, contexts, config, max(reads))


# (what, dsv2 engine, the engine it is compared with, the target ratio)
TARGETS = (
    ("int8 >= 1.5 x llama.cpp Q8_0", "dsv2:int8", "llama:q8_0", 1.5),
    ("int4 >= 1.5 x llama.cpp Q4_0", "dsv2:int4", "llama:q4_0", 1.5),
    ("int4 >= 1.6 x dsv2 int8", "dsv2:int4", "dsv2:int8", 1.6),
)


def print_read_ceilings(results: dict, contexts: list[int], config: ModelConfig, read: float) -> None:
    """The fastest decode each dsv2 mode could reach if a step did nothing but read its weights and the latent
    cache at the read bandwidth, and what each decode target asks of it: a target above the ceiling cannot be
    met on this machine by any kernel."""
    print("| dsv2 mode | " + " | ".join(f"@{c} read ceiling tok/s | @{c} measured / ceiling" for c in contexts) + " |")
    print("|---" * (1 + 2 * len(contexts)) + "|")
    ceilings: dict[str, list[float]] = {}
    for mode in DSV2_MODES:
        key = f"dsv2:{mode}"
        if key not in results:
            continue
        ceilings[key] = [read * 1e9 / bytes_per_token(config, mode, c, True) for c in contexts]
        measured = [results[key]["decode_tokens_per_s"][str(c)] for c in contexts]
        cells = [f"{ceiling:.1f} | {m / ceiling:.0%}" for ceiling, m in zip(ceilings[key], measured, strict=True)]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print(
        "\nread ceiling = read bandwidth / (weight + latent-cache bytes a step reads); attention arithmetic and everything else come on top\n"
    )
    for what, ours, theirs, target in TARGETS:
        if ours not in ceilings or theirs not in results:
            continue
        for context, ceiling in zip(contexts, ceilings[ours], strict=True):
            needed = target * results[theirs]["decode_tokens_per_s"][str(context)]
            print(
                f"{what} @{context}: needs {needed:.1f} tokens/s, {needed / ceiling:.0%} of {ours}'s read ceiling ({ceiling:.1f})"
            )
    print()


def print_paired_floors(results: dict, contexts: list[int], config: ModelConfig) -> None:
    """x floor of each round's decode reading against the copies made just before and after it (weights + cache)."""
    print("| dsv2 mode, paired copies | " + " | ".join(f"@{c} copy GB/s | @{c} x floor" for c in contexts) + " |")
    print("|---" * (1 + 2 * len(contexts)) + "|")
    for mode in DSV2_MODES:
        key = f"dsv2:{mode}"
        rounds = [r for r in results.get(key, {}).get("rounds", []) if r.get("paired_bandwidth_gbs")]
        if not rounds:
            continue
        cells = []
        for c in contexts:
            bandwidths = [r["paired_bandwidth_gbs"][str(c)] for r in rounds]
            multiples = [
                1000 / r["decode_tokens_per_s"][str(c)] / (bytes_per_token(config, mode, c, True) / (b * 1e9) * 1000)
                for r, b in zip(rounds, bandwidths, strict=True)
            ]
            cells += [" / ".join(f"{b:.1f}" for b in bandwidths), " / ".join(f"{m:.2f}" for m in multiples)]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print(
        "\npaired: each round's decode ms/token / (bytes of weights + latent cache / the faster of the two copies the "
        "worker made just before and just after timing that context), one value per round"
    )


def best_of(runs: list[dict]) -> dict:
    """Per measure, the fastest of several rounds (tokens/s: higher is better)."""
    best = {
        "decode_tokens_per_s": {},
        "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in runs),
        "compile_s": runs[0].get("compile_s", 0.0),
        "rounds": runs,  # each round's own readings, for the paired floors
    }
    batches = [r["batch_decode_tokens_per_s"] for r in runs if r.get("batch_decode_tokens_per_s")]
    if batches:
        best["batch_decode_tokens_per_s"] = max(batches, key=lambda b: b["value"])
    for context in runs[0]["decode_tokens_per_s"]:
        best["decode_tokens_per_s"][context] = max(r["decode_tokens_per_s"][context] for r in runs)
    return best


def decode_quality(directory: Path, tokens: torch.Tensor, mode: str) -> dict:
    """A mode's decode path against float32 on the same tokens (``teacher_forced_decode_change``).

    An int8 model is quantized in memory like ``dsv2 convert --quantize int8``; models are fused like
    ``dsv2 generate`` loads them. Compiled modes run the steps through :class:`CompiledDecoder`
    (``dsv2 generate --compile``), ``-bf16cache`` modes keep the latent cache in bfloat16.
    """
    from dsv2cli import kernels
    from dsv2cli.checkpoint.loader import load_checkpoint
    from dsv2cli.inference.compiled import CompiledDecoder
    from dsv2cli.inference.quality import teacher_forced_decode_change
    from dsv2cli.model import ForwardOptions
    from dsv2cli.model.int4 import quantize_int4
    from dsv2cli.model.quantized import quantize_int8
    from dsv2cli.model.transformer import fuse_projections

    precision, compiled, cache_dtype = parse_mode(mode)
    reference = load_checkpoint(directory, torch.float32)
    candidate = load_checkpoint(directory, torch.float32)
    quantize = {"int8": quantize_int8, "int4": quantize_int4}.get(precision)
    candidate = fuse_projections(quantize(candidate) if quantize else candidate)
    decoder = CompiledDecoder(candidate) if compiled else None
    options = ForwardOptions(kernels.load(), attention_kernel=False) if precision in ("int8", "int4") else ForwardOptions()
    return teacher_forced_decode_change(reference, candidate, tokens, decoder, cache_dtype, options).to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="dsv2 also decodes this many sequences together (1: not)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed at each context")
    parser.add_argument("--repetitions", type=int, default=2, help="llama-bench repetitions per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure every engine this many times, interleaved, and keep each one's best "
        "(the machines are shared; interference only ever slows a run down)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the sdist, the llama.cpp build and the converter copy are kept",
    )
    parser.add_argument("--checkpoint", type=Path, help="keep the random checkpoint here (its conversions go beside it)")
    parser.add_argument("--precisions", nargs="+", choices=DSV2_MODES, default=list(DSV2_MODES), help="dsv2 modes to measure")
    parser.add_argument("--skip-llamacpp", action="store_true", help="measure dsv2 only")
    parser.add_argument(
        "--llama-precisions",
        nargs="+",
        choices=list(LLAMA_PRECISIONS),
        help="the precisions llama.cpp runs at (default: every one of --precisions it has; each needs its GGUF file)",
    )
    parser.add_argument(
        "--skip-quality", action="store_true", help="no decode-quality check (it loads the model in float32: 63 GB for V2-Lite)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_dsv2(args.checkpoint, args.worker, args.threads, args.contexts, args.steps, args.prefill, args.batch)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or Path(tmp) / PRESET
        write_checkpoint(checkpoint)
        config = load_config(checkpoint)  # the checkpoint's own shapes set the floors (a given one may not be bench-300m)
        jobs: list[tuple[str, list[str] | Path]] = []  # (result key, dsv2 worker command | GGUF file)
        if not args.skip_llamacpp:
            source = llama_source(args.cache_dir)
            binary = llama_bench_binary(source, max(1, os.cpu_count() or 1))
            script = converter(source, args.cache_dir)
            for precision, outtype in LLAMA_PRECISIONS.items():
                wanted = args.llama_precisions is None or precision in args.llama_precisions
                if wanted and any(parse_mode(mode)[0] == precision for mode in args.precisions):
                    jobs.append((f"llama:{outtype}", to_gguf(script, source, checkpoint, outtype)))
        for precision in ("int8", "int4"):
            if any(parse_mode(mode)[0] == precision for mode in args.precisions):
                make_dsv2_quantized(checkpoint, precision)
        for precision in args.precisions:
            command = [
                sys.executable,
                __file__,
                "--worker",
                precision,
                "--checkpoint",
                str(checkpoint),
                "--threads",
                str(args.threads),
                "--contexts",
                *map(str, args.contexts),
                "--steps",
                str(args.steps),
                "--prefill",
                str(args.prefill),
                "--batch",
                str(args.batch),
            ]
            jobs.append((f"dsv2:{precision}", command))
        runs: dict[str, list[dict]] = {key: [] for key, _ in jobs}
        bandwidths: list[float] = []
        reads: list[float] = []
        for round_index in range(args.rounds):
            for key, job in jobs:
                log(f"round {round_index + 1}/{args.rounds}: {key} ...")
                same_page_cache_state(engine_files(job, checkpoint))
                if isinstance(job, Path):
                    runs[key].append(
                        run_llama_bench(binary, job, args.threads, args.contexts, args.steps, args.prefill, args.repetitions)
                    )
                else:
                    done = subprocess.run(job, capture_output=True, text=True, check=True)
                    runs[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
            bandwidths.append(memory_bandwidth_gbs(args.threads))
            reads.append(read_bandwidth_gbs(args.threads))
        results = {key: best_of(value) for key, value in runs.items()}
        quality = {}
        checked = [
            mode
            for mode in args.precisions
            if not args.skip_quality and (parse_mode(mode)[0] in ("int8", "int4") or parse_mode(mode)[2] is not None)
        ]
        if checked:
            log("decode quality against float32 ...")
            torch.set_num_threads(args.threads)
            from dsv2cli.inference.tokenizer import TextTokenizer

            vocab = config.vocab_size
            text = (DEMO / "sample.txt").read_text()
            samples = {
                checkpoint.name: (checkpoint, torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(0))),
                "demo (sample.txt)": (DEMO, torch.tensor([TextTokenizer.from_directory(DEMO).encode(text)[:256]])),
            }
            for mode in checked:
                for name, (directory, tokens) in samples.items():
                    quality[f"{mode}, {name}"] = decode_quality(directory, tokens, mode)
    print_report(results, args.contexts, args.prefill, args.threads, bandwidths, reads, config, checkpoint.name)
    for name, q in quality.items():
        print(
            f"{name} decode path vs float32, {q['tokens']} teacher-forced tokens: "
            f"mean log-likelihood change {q['log_likelihood_change']:+.4f}, top-1 agreement {q['top1_agreement']:.1%}"
        )
    print(f"\nbest of {args.rounds} interleaved rounds per engine")


if __name__ == "__main__":
    main()
