"""int4 against int8 weights, side by side: the kernels on V2-Lite's experts, then decode steps and a prefill.

First the products alone: one MoE layer of a decode step of DeepSeek-V2-Lite (6 of 64 experts, ``gate_up
[2816, 2048]`` and ``down [2048, 1408]``, the token quantized to int8), by dsv2's int8 kernel and its int4
kernel, on ``--kernel-layers`` stacks of experts cycled through so that the weights come from memory (553 MB
of int8 and 311 MB of int4 each); printed as time per layer and GB/s of weights read. Then the model:

The model is DeepSeek-V2-Lite's shape cut to ``--layers`` layers (default 2: one dense, one MoE with 64
experts top-6; vocabulary 102400, so the head weighs as much as in the full model), random weights in float32,
quantized once to int8 (``quantize_int8``) and once to int4 (``quantize_int4``, groups of ``--group-size``)
from the same seed. Both run as ``dsv2 generate`` runs them on a CPU: float32 activations, dsv2's kernels
(int8 x int8 / int8 x int4 decode rows, the attention kernel), eager steps and, unless ``--no-compile``,
compiled ones. Rounds are interleaved (int8, int4, int8, ...) and each keeps its best, so a busy machine
slows both alike; the ratios are int8's time over int4's (above 1: int4 is faster).

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared with other
work, where wall times of the same step vary several times over, it still measures what each step costs (memory
stalls included; use it with ``--threads 1``, as idle OpenMP workers spin and count too).

    python benchmarks/bench_int4.py
    python benchmarks/bench_int4.py --layers 4 --rounds 5 --steps 32 --threads 2
    python benchmarks/bench_int4.py --threads 1 --clock cpu          # on a busy machine
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
from dsv2cli.model.int4 import absorb_int4, quantize_groups, quantize_int4  # noqa: E402
from dsv2cli.model.quantized import absorb_int8, quantize_activation, quantize_int8, quantize_rows  # noqa: E402
from dsv2cli.model.transformer import fuse_projections  # noqa: E402
from dsv2cli.presets import preset_config  # noqa: E402

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 64, 6, 2048, 1408
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock


def kernel_seconds(handle: kernels.Kernels, layers: int, group_size: int, rounds: int, steps: int) -> dict[str, float]:
    """Best seconds per MoE layer of one decode token (6 experts' gate_up and down), int8 and int4, interleaved."""
    torch.manual_seed(0)
    stacks = []
    for _ in range(layers):
        gate_up = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN) * 0.02
        down = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE) * 0.02
        int8 = (quantize_rows(gate_up), quantize_rows(down))
        stacks.append({"int8": int8, "int4": (quantize_groups(gate_up, group_size), quantize_groups(down, group_size))})
    token, hidden = torch.randn(1, HIDDEN), torch.randn(TOP_K, INTERMEDIATE)
    choices = [torch.randperm(EXPERTS)[:TOP_K] for _ in range(steps)]
    products = {"int8": handle.int8_matmul, "int4": handle.int4_matmul}
    best = {kind: float("inf") for kind in products}
    for _ in range(rounds):
        for kind, product in products.items():
            start = clock()
            for i in range(steps):
                (gate_up_q, gate_up_s), (down_q, down_s) = stacks[i % layers][kind]
                values, step = quantize_activation(token)
                product(values.expand(TOP_K, -1), step.expand(TOP_K, -1), gate_up_q, gate_up_s, choices[i])
                product(*quantize_activation(hidden), down_q, down_s, choices[i])
            best[kind] = min(best[kind], (clock() - start) / steps)
    return best


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
    start = clock()
    for _ in range(steps):
        logits = model(token, cache=cache, options=options) if decoder is None else decoder.step(token, cache)
        token = logits[:, -1:].argmax(-1)
    return (clock() - start) / steps


@torch.inference_mode()
def prefill_seconds(model: DeepseekV2, options: ForwardOptions, tokens: int) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, round_capacity(tokens))
    start = clock()
    model(prompt, cache=cache, last_only=True, options=options)
    return clock() - start


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
    parser.add_argument("--kernel-layers", type=int, default=3, help="expert stacks for the kernels alone (0: skip them)")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True, help="time the model's steps")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall time, or the process's CPU time (busy machines)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    handle = kernels.load()
    if not handle.available:
        sys.exit(f"dsv2's kernels do not build here: {handle.error}")
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?"
    )
    if args.kernel_layers:
        seconds = kernel_seconds(handle, args.kernel_layers, args.group_size, args.rounds, 4 * args.steps)
        weights = TOP_K * 3 * HIDDEN * INTERMEDIATE
        read = {"int8": weights * (1 + 4 / HIDDEN), "int4": weights * (0.5 + 2 / args.group_size)}
        print(
            f"V2-Lite experts of one MoE layer, one token, {args.threads} threads, {cpu} ({args.clock} time, best of {args.rounds})"
        )
        for kind, value in seconds.items():
            print(f"  {kind} kernel: {value * 1e3:7.3f} ms per layer, {read[kind] / value / 1e9:5.1f} GB/s of weights")
        print(f"  int8/int4 time: {seconds['int8'] / seconds['int4']:.2f}x")
    if not args.model:
        return
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
    print(
        f"V2-Lite shape, {args.layers} layers, int4 groups of {args.group_size}, {args.threads} threads, {cpu}, {args.clock} time"
    )
    print(f"{'':40} {'int8':>9} {'int4':>9} {'int8/int4':>10}")
    for name in measures:
        int8, int4 = best[name, "int8"] * 1e3, best[name, "int4"] * 1e3
        print(f"{name:40} {int8:9.2f} {int4:9.2f} {int8 / int4:9.2f}x")


if __name__ == "__main__":
    main()
