"""dsv2's int8 x int8 decode kernel against torch's int8 products and the machine's read bandwidth, side by side.

One decode step of DeepSeek-V2-Lite reads, per MoE layer, 6 of 64 routed experts (``gate_up [2816, 2048]``
and ``down [2048, 1408]`` int8): this times exactly that, on stacks of experts several times larger than
any CPU cache (``--layers`` stacks of 64 experts, 553 MB each), so every weight comes from memory:

* ``dsv2 int8_matmul``: the token quantized to int8, its 6 experts picked by id inside the kernel
  (``dsv2cli/kernels/int8_matmul.cpp``), and the same for 8 rows (a decode batch) choosing 6 experts each;
* ``torch int8pack``: ``torch._weight_int8pack_mm`` on the bfloat16 token, one call per expert;
* ``torch _int_mm``: int8 x int8 through oneDNN, one call per expert (fast only with VNNI);
* ``read``: ``torch.sum`` over 1 GiB of float32, the bandwidth a pure read reaches with the same threads.

Rounds are interleaved and each keeps its best (shared machines only slow a run down). Prints GB/s of
weights read.

    python benchmarks/bench_int8_kernel.py
    python benchmarks/bench_int8_kernel.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2cli import kernels  # noqa: E402
from dsv2cli.model.quantized import quantize_activation  # noqa: E402

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 64, 6, 2048, 1408


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4, help="stacks of experts cycled through (553 MB each)")
    parser.add_argument("--steps", type=int, default=40, help="layers' worth of products per timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    handle = kernels.load()
    if not handle.available:
        sys.exit(f"dsv2's kernels do not build here: {handle.error}")
    torch.manual_seed(0)
    gate_up = [torch.randint(-127, 128, (EXPERTS, 2 * INTERMEDIATE, HIDDEN), dtype=torch.int8) for _ in range(args.layers)]
    down = [torch.randint(-127, 128, (EXPERTS, HIDDEN, INTERMEDIATE), dtype=torch.int8) for _ in range(args.layers)]
    gate_up_scale = [torch.rand(EXPERTS, 2 * INTERMEDIATE) for _ in range(args.layers)]
    down_scale = [torch.rand(EXPERTS, HIDDEN) for _ in range(args.layers)]
    token, hidden = torch.randn(1, HIDDEN), torch.randn(TOP_K, INTERMEDIATE)
    rows = torch.randn(8, HIDDEN)
    choices = [torch.randperm(EXPERTS)[:TOP_K] for _ in range(args.steps)]
    batch_choices = [torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(8)]).reshape(-1) for _ in range(args.steps)]
    step_bytes = TOP_K * 3 * HIDDEN * INTERMEDIATE

    def dsv2(i: int) -> None:
        layer, ids = i % args.layers, choices[i]
        values, step = quantize_activation(token)
        handle.int8_matmul(values.expand(TOP_K, -1), step.expand(TOP_K, -1), gate_up[layer], gate_up_scale[layer], ids)
        handle.int8_matmul(*quantize_activation(hidden), down[layer], down_scale[layer], ids)

    def dsv2_batch(i: int) -> None:
        layer, ids = i % args.layers, batch_choices[i]
        values, step = quantize_activation(rows)
        handle.int8_matmul(
            values.repeat_interleave(TOP_K, 0), step.repeat_interleave(TOP_K, 0), gate_up[layer], gate_up_scale[layer], ids
        )

    def int8pack(i: int) -> None:
        layer = i % args.layers
        for k, e in enumerate(choices[i].tolist()):
            torch._weight_int8pack_mm(token.bfloat16(), gate_up[layer][e], gate_up_scale[layer][e].bfloat16())
            torch._weight_int8pack_mm(hidden[k : k + 1].bfloat16(), down[layer][e], down_scale[layer][e].bfloat16())

    def int_mm(i: int) -> None:
        layer = i % args.layers
        values, _ = quantize_activation(token)
        hidden_values, _ = quantize_activation(hidden)
        for k, e in enumerate(choices[i].tolist()):
            torch._int_mm(values, gate_up[layer][e].t())
            torch._int_mm(hidden_values[k : k + 1], down[layer][e].t())

    source = torch.randn(1 << 28)  # 1 GiB

    def read(_: int) -> None:
        source.sum()

    def batch_bytes(i: int) -> int:  # distinct experts' gate_up read once for all rows
        return len(set(batch_choices[i].tolist())) * 2 * HIDDEN * INTERMEDIATE

    engines = {
        "dsv2 int8_matmul, 1 row": (dsv2, lambda i: step_bytes),
        "dsv2 int8_matmul, 8 rows (gate_up)": (dsv2_batch, batch_bytes),
        "torch int8pack (bf16 token)": (int8pack, lambda i: step_bytes),
        "torch _int_mm": (int_mm, lambda i: step_bytes),
        "read (torch.sum, 1 GiB)": (read, lambda i: source.numel() * 4),
    }
    best = {name: 0.0 for name in engines}
    for round_index in range(args.rounds):
        for name, (run, size) in engines.items():
            count = 4 if name.startswith("read") or name.startswith("torch _int_mm") else args.steps
            start = time.perf_counter()
            for i in range(count):
                run(i % args.steps)
            elapsed = time.perf_counter() - start
            best[name] = max(best[name], sum(size(i % args.steps) for i in range(count)) / elapsed / 1e9)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    print(f"int8 products of V2-Lite's experts from memory, {args.threads} threads (GB/s of weights, best of {args.rounds})")
    for name, rate in best.items():
        print(f"  {name:<38} {rate:6.1f} GB/s")


if __name__ == "__main__":
    main()
