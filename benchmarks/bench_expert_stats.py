"""Cost of `dsv2 expert-stats` against a plain forward pass over the same tokens, measured side by side.

"plain" runs the model over the sequences in the same forward batches with no routing hook. "stats" is
``collect_expert_stats`` with its defaults: the same forwards with the recording hook (chosen experts,
affinities, the per-sequence Σ f·P), then counts, metrics, the drop simulation for 4 capacity factors x
2 policies and the summary. Runs alternate; the fastest of each is reported (interference from other
processes only ever adds time). Because a busy machine still blurs a side-by-side difference of a few
per cent, the added work is also timed directly: the time spent inside the recording hook, and the
statistics computed after the last forward. Target: stats <= 1.10 x plain.

    python benchmarks/bench_expert_stats.py                                # bench-300m, random weights, CPU
    python benchmarks/bench_expert_stats.py --model dsv2cli/assets/demo    # a checkpoint directory
    python benchmarks/bench_expert_stats.py --device cuda --dtype bfloat16 --sequences 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generate import fill_random_  # noqa: E402

from dsv2cli.analysis import expert_stats as expert_stats_module  # noqa: E402
from dsv2cli.analysis.expert_drop import drop_batches, forward_groups  # noqa: E402
from dsv2cli.analysis.expert_stats import RoutingRecorder, StatsOptions, collect_expert_stats  # noqa: E402
from dsv2cli.analysis.text_inputs import SequenceSet, TokenSequence  # noqa: E402
from dsv2cli.checkpoint.loader import load_checkpoint  # noqa: E402
from dsv2cli.model import DeepseekV2  # noqa: E402
from dsv2cli.model.dtypes import DTYPES  # noqa: E402
from dsv2cli.presets import preset_config  # noqa: E402


def random_model(preset: str, dtype: torch.dtype, device: str) -> DeepseekV2:
    """Random weights with a spread-out router, so routing is neither uniform nor collapsed."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV2(preset_config(preset))
    fill_random_(model)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_pass(model: DeepseekV2, inputs: SequenceSet, groups: list[list[int]], device: str) -> float:
    """The same forwards as the statistics run (right-padded groups, last position only), no hook."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for group in groups:
            rows = [inputs.sequences[i].token_ids for i in group]
            width = max(len(r) for r in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)
            for row, ids in enumerate(rows):
                tokens[row, : len(ids)] = torch.tensor(ids)
            model(tokens.to(device), last_only=True)
    _sync(device)
    return time.perf_counter() - start


class TimedRecorder(RoutingRecorder):
    """The recording hook with a stopwatch around each call."""

    seconds = 0.0
    device = "cpu"

    def __call__(self, decision):  # type: ignore[no-untyped-def]
        _sync(self.device)
        start = time.perf_counter()
        super().__call__(decision)
        _sync(self.device)
        TimedRecorder.seconds += time.perf_counter() - start


def stats_pass(model: DeepseekV2, inputs: SequenceSet, options: StatsOptions, device: str) -> tuple[float, float, float]:
    """``(total, inside the hook, after the forwards)`` seconds of ``collect_expert_stats``."""
    marks: list[float] = []

    def progress(phase: str, tokens: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    TimedRecorder.seconds, TimedRecorder.device = 0.0, device
    _sync(device)
    start = time.perf_counter()
    collect_expert_stats(model, None, "bench", inputs, options, progress)
    _sync(device)
    end = time.perf_counter()
    return end - start, TimedRecorder.seconds, end - marks[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-300m", help="random-weight preset when --model is not given")
    parser.add_argument("--model", type=Path, help="checkpoint directory to load instead")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    model = load_checkpoint(args.model, dtype, args.device) if args.model else random_model(args.preset, dtype, args.device)
    config = model.config
    seq_len = min(args.seq_len, config.max_position_embeddings)
    generator = torch.Generator().manual_seed(1)
    sequences = [
        TokenSequence(torch.randint(0, config.vocab_size, (seq_len,), generator=generator).tolist(), f"random{i}")
        for i in range(args.sequences)
    ]
    inputs = SequenceSet(sequences, files=1, skipped_files=0, truncated=False)
    options = StatsOptions(batch_size=args.batch_size)
    groups = forward_groups(inputs.lengths, drop_batches(inputs.lengths), args.batch_size)

    expert_stats_module.RoutingRecorder = TimedRecorder  # type: ignore[misc]
    warm = SequenceSet(sequences[:1], 1, 0, False)
    plain_pass(model, warm, [[0]], args.device)
    stats_pass(model, warm, options, args.device)
    plain, total, hook, after = [], [], [], []
    for _ in range(args.repeats):
        plain.append(plain_pass(model, inputs, groups, args.device))
        total_s, hook_s, after_s = stats_pass(model, inputs, options, args.device)
        total.append(total_s)
        hook.append(hook_s)
        after.append(after_s)

    p, t, h, a = min(plain), min(total), statistics.median(hook), statistics.median(after)
    name = str(args.model) if args.model else args.preset
    print(
        f"\n{name}: {len(config.moe_layer_indices)} MoE layers, {config.n_routed_experts} experts top-{config.num_experts_per_tok}; "
        f"{inputs.tokens} tokens ({args.sequences} x {seq_len}), batch {args.batch_size}; "
        f"{args.dtype}, {args.device}, {args.threads} threads; fastest of {args.repeats} (hook, statistics: median)\n"
    )
    print(f"{'':38}{'seconds':>10}{'tokens/s':>10}{'vs plain':>10}")
    print(f"{'plain forward':38}{p:10.3f}{inputs.tokens / p:10.0f}{1:9.3f}x")
    print(f"{'expert-stats (side by side)':38}{t:10.3f}{inputs.tokens / t:10.0f}{t / p:9.3f}x")
    print(f"{'  of which inside the recording hook':38}{h:10.3f}{'':10}{h / p:10.2%}")
    print(f"{'  of which statistics after forwards':38}{a:10.3f}{'':10}{a / p:10.2%}")
    print(f"\noverhead: side by side {100 * (t / p - 1):+.1f} %; added work timed directly {100 * (h + a) / p:+.1f} %")


if __name__ == "__main__":
    main()
