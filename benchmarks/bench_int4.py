"""int4 against int8 weights, side by side: decode steps and a prefill of the same random model.

The model is DeepSeek-V2-Lite's shape cut to ``--layers`` layers (default 2: one dense, one MoE with 64
experts top-6; vocabulary 102400, so the head weighs as much as in the full model), random weights in float32,
quantized once to int8 (``quantize_int8``) and once to int4 (``quantize_int4``, groups of ``--group-size``)
from the same seed. Both run as ``dsv2 generate`` runs them on a CPU: float32 activations, dsv2's kernels
(int8 x int8 / int8 x int4 decode rows, the attention kernel), eager steps and, unless ``--no-compile``,
compiled ones. Rounds are interleaved (int8, int4, int8, ...) and each keeps its best, so a busy machine
slows both alike; the ratios are int8's time over int4's (above 1: int4 is faster).

    python benchmarks/bench_int4.py
    python benchmarks/bench_int4.py --layers 4 --rounds 5 --steps 32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2cli import kernels  # noqa: E402
from dsv2cli.analysis.kv_measure import random_model  # noqa: E402
from dsv2cli.config import ModelConfig  # noqa: E402
from dsv2cli.inference.compiled import CompiledDecoder, round_capacity  # noqa: E402
from dsv2cli.model import DeepseekV2, ForwardOptions  # noqa: E402
from dsv2cli.model.int4 import absorb_int4, quantize_int4  # noqa: E402
from dsv2cli.model.quantized import absorb_int8, quantize_int8  # noqa: E402
from dsv2cli.model.transformer import fuse_projections  # noqa: E402
from dsv2cli.presets import preset_config  # noqa: E402


def build(config: ModelConfig, kind: str, group_size: int, options: ForwardOptions) -> DeepseekV2:
    model = random_model(config, torch.float32, seed=0)
    if kind == "int8":
        return absorb_int8(fuse_projections(quantize_int8(model)), options.kernels)
    return absorb_int4(fuse_projections(quantize_int4(model, group_size)), options.kernels)


def weight_bytes(model: DeepseekV2) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.inference_mode()
def decode_seconds(
    model: DeepseekV2, options: ForwardOptions, context: int, steps: int, decoder: CompiledDecoder | None
) -> float:
    """Seconds per decode step after a prefill of ``context`` tokens (one row)."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    cache = model.new_cache(1, round_capacity(context + steps + 1))
    model(prompt, cache=cache, last_only=True, options=options)
    token = prompt[:, -1:]
    if decoder is not None:
        decoder.prepare(cache)
        decoder.step(token, cache)  # the first call of a shape may still compile
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, cache=cache, options=options) if decoder is None else decoder.step(token, cache)
        token = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def prefill_seconds(model: DeepseekV2, options: ForwardOptions, tokens: int) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, round_capacity(tokens))
    start = time.perf_counter()
    model(prompt, cache=cache, last_only=True, options=options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    parser.add_argument("--context", type=int, default=128, help="tokens before the decode steps")
    parser.add_argument("--prefill", type=int, default=256, help="tokens of the timed prefill (0: none)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time compiled steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    handle = kernels.load()
    if not handle.available:
        sys.exit(f"dsv2's kernels do not build here: {handle.error}")
    options = ForwardOptions(handle)
    config = preset_config("deepseek-v2-lite").replace(num_hidden_layers=args.layers)
    models = {kind: build(config, kind, args.group_size, options) for kind in ("int8", "int4")}
    for kind, model in models.items():
        print(f"{kind}: {weight_bytes(model) / 1e9:.2f} GB of weights and buffers", file=sys.stderr)
    measures: dict[str, Callable[[DeepseekV2, CompiledDecoder | None], float]] = {
        f"decode @{args.context}, eager (ms/token)": lambda m, d: decode_seconds(m, options, args.context, args.steps, None)
    }
    decoders: dict[str, CompiledDecoder | None] = {kind: None for kind in models}
    if args.compile:
        decoders = {kind: CompiledDecoder(model, options) for kind, model in models.items()}
        measures[f"decode @{args.context}, compiled (ms/token)"] = lambda m, d: decode_seconds(
            m, options, args.context, args.steps, d
        )
    if args.prefill:
        measures[f"prefill {args.prefill} (ms)"] = lambda m, d: prefill_seconds(m, options, args.prefill)
    best = {(name, kind): float("inf") for name in measures for kind in models}
    for round_index in range(args.rounds):
        for name, measure in measures.items():
            for kind, model in models.items():
                best[name, kind] = min(best[name, kind], measure(model, decoders[kind]))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?"
    )
    print(f"V2-Lite shape, {args.layers} layers, int4 groups of {args.group_size}, {args.threads} threads, {cpu}")
    print(f"{'':40} {'int8':>9} {'int4':>9} {'int8/int4':>10}")
    for name in measures:
        int8, int4 = best[name, "int8"] * 1e3, best[name, "int4"] * 1e3
        print(f"{name:40} {int8:9.2f} {int4:9.2f} {int8 / int4:9.2f}x")


if __name__ == "__main__":
    main()
