"""dsv2 against transformers' DeepseekV2ForCausalLM: decode and prefill speed, peak memory, bandwidth floor.

Both run the same random weights (the ``bench-300m`` preset: hidden 1024, 16 heads, kv_lora_rank 512,
rope 64, nope 128, v 128, 64 routed experts top-6 + 2 shared) in the same run, each in its own
subprocess so that its peak memory is its own. Prints ratios, not just absolute times.

    python benchmarks/bench_generate.py                     # float32, 2 threads, CPU
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16
    python benchmarks/bench_generate.py --contexts 128 1024 --steps 4 --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv2cli.analysis.params import count_params  # noqa: E402
from dsv2cli.model.dtypes import DTYPES  # noqa: E402
from dsv2cli.presets import preset_config, preset_hf_config  # noqa: E402


def make_checkpoint(directory: Path, preset: str) -> None:
    """Random weights written by transformers, so both sides read the same file."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hf = preset_hf_config(preset)
    rope = dict(hf.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = float(hf.pop("rope_theta"))
    for key in ("scoring_func", "aux_loss_alpha", "seq_aux", "moe_layer_freq", "torch_dtype", "model_type"):
        hf.pop(key, None)
    config = DeepseekV2Config(**hf, rope_parameters=rope)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    model = model.to_empty(device="cpu")
    fill_random_(model)
    model.save_pretrained(directory)


@torch.no_grad()
def fill_random_(model: torch.nn.Module) -> None:
    """The benchmarks' random weights: norms 1, a spread-out router (std 0.5), everything else std 0.02."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("gate.weight"):
            p.normal_(0, 0.5)
        else:
            p.normal_(0, 0.02)


def memory_bandwidth_gbs(threads: int) -> float:
    """Copy bandwidth (read + write bytes / s) of a 1 GiB float32 copy, best of 5."""
    torch.set_num_threads(threads)
    src = torch.ones(256 * 1024 * 1024)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def read_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth (bytes read / s) of a sum over 1 GiB of float32, best of 5: what a decode step that only
    streams weights could reach at most (a copy also writes, and reads more slowly beside its writes)."""
    torch.set_num_threads(threads)
    src = torch.ones(256 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return src.numel() * 4 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(engine: str, checkpoint: Path, contexts: list[int], steps: int, prefill_len: int, dtype: str, device: str) -> dict:
    """Time prefill and decode for one implementation (runs in its own process)."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as dsv2 generate does; applies to both engines alike
    vocab = preset_config("bench-300m").vocab_size
    torch_dtype = DTYPES[dtype]
    if engine == "dsv2":
        from dsv2cli.checkpoint.loader import load_checkpoint
        from dsv2cli.inference.compiled import CompiledDecoder, cannot_compile, round_capacity
        from dsv2cli.inference.engine import prefill_attention
        from dsv2cli.inference.session import with_attention_kernel
        from dsv2cli.model import ForwardOptions
        from dsv2cli.model.transformer import fuse_projections

        model = fuse_projections(load_checkpoint(checkpoint, torch_dtype, device))  # as `dsv2 generate` loads it
        forward = with_attention_kernel(ForwardOptions(), model.embed_tokens.weight.device)
        # `dsv2 generate`'s default: compiled decode steps where they can run (their compile time is not timed)
        decoder = CompiledDecoder(model) if cannot_compile(model) is None else None
    else:
        from transformers import DeepseekV2ForCausalLM

        decoder = None

        model = DeepseekV2ForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype).to(device).eval()

    result: dict = {"engine": engine, "decode_ms": {}}

    def prefill(tokens: torch.Tensor, capacity: int):
        if engine == "dsv2":
            cache = model.new_cache(1, round_capacity(capacity) if decoder is not None else capacity)
            attention = prefill_attention("absorbed", tokens.shape[1])
            logits = model(tokens, cache=cache, attention=attention, last_only=True, options=forward)
            if decoder is not None:
                result["compile_s"] = result.get("compile_s", 0.0) + decoder.prepare(cache)
            return cache, logits
        out = model(tokens, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits

    def decode(state, token: torch.Tensor):
        if engine == "dsv2":
            return state, model(token, cache=state, options=forward) if decoder is None else decoder.step(token, state)
        out = model(token, past_key_values=state, use_cache=True)
        return out.past_key_values, out.logits

    with torch.inference_mode():
        warm = torch.randint(0, vocab, (1, 16), device=device)
        state, logits = prefill(warm, 32)
        decode(state, logits[:, -1:].argmax(-1))
        tokens = torch.randint(0, vocab, (1, prefill_len), device=device)
        compiled_before = result.get("compile_s", 0.0)
        _sync(device)
        start = time.perf_counter()
        state, _ = prefill(tokens, prefill_len + 1)
        _sync(device)
        result["prefill_tokens_per_s"] = prefill_len / (
            time.perf_counter() - start - result.get("compile_s", 0.0) + compiled_before
        )
        for context in contexts:
            state, logits = prefill(torch.randint(0, vocab, (1, context), device=device), context + steps + 1)
            times = []
            token = logits[:, -1:].argmax(-1)
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                state, logits = decode(state, token)
                token = logits[:, -1:].argmax(-1)
                _sync(device)
                times.append(time.perf_counter() - start)
            result["decode_ms"][str(context)] = statistics.median(times) * 1000
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _best(a: dict, b: dict) -> dict:
    """Per measure, the better of two runs of one engine (the machines are shared: noise only slows)."""
    best = dict(a)
    best["decode_ms"] = {c: min(a["decode_ms"][c], b["decode_ms"][c]) for c in a["decode_ms"]}
    best["prefill_tokens_per_s"] = max(a["prefill_tokens_per_s"], b["prefill_tokens_per_s"])
    best["peak_rss_mib"] = max(a["peak_rss_mib"], b["peak_rss_mib"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed at each context (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engines", nargs="+", default=["dsv2", "transformers"])
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the engines this many times, interleaved, and keep each one's best"
    )
    parser.add_argument("--checkpoint", type=Path, help="reuse a checkpoint directory (made if missing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        print(
            json.dumps(run_engine(args.worker, args.checkpoint, args.contexts, args.steps, args.prefill, args.dtype, args.device))
        )
        return

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or Path(tmp) / "bench-300m"
        if not (checkpoint / "config.json").is_file():
            print(f"writing random bench-300m checkpoint to {checkpoint} ...", file=sys.stderr)
            make_checkpoint(checkpoint, "bench-300m")
        results: dict = {}
        for round_index in range(args.rounds):
            for engine in args.engines:
                print(f"round {round_index + 1}/{args.rounds}: running {engine} ...", file=sys.stderr)
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    engine,
                    "--checkpoint",
                    str(checkpoint),
                    "--threads",
                    str(args.threads),
                ]
                command += ["--contexts", *map(str, args.contexts), "--steps", str(args.steps), "--prefill", str(args.prefill)]
                command += ["--dtype", args.dtype, "--device", args.device]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                run = json.loads(done.stdout.strip().splitlines()[-1])
                results[engine] = run if engine not in results else _best(results[engine], run)

    config = preset_config("bench-300m")
    counts = count_params(config)
    bytes_per_param = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    active_bytes = counts.active_without_embedding * bytes_per_param
    bandwidth = memory_bandwidth_gbs(args.threads) if args.device == "cpu" else float("nan")
    floor_ms = active_bytes / (bandwidth * 1e9) * 1000

    print(
        f"\nbench-300m ({counts.total / 1e6:.0f}M params, {counts.active_without_embedding / 1e6:.0f}M active without embedding), "
        f"{args.dtype}, {args.threads} threads, {args.device}"
    )
    print(
        f"memory bandwidth (copy) {bandwidth:.1f} GB/s; active weights {active_bytes / 1e6:.0f} MB/token; floor {floor_ms:.1f} ms/token\n"
    )
    header = f"{'':28}" + "".join(f"{e:>16}" for e in args.engines) + ("      ratio" if len(args.engines) == 2 else "")
    print(header)
    rows = [(f"decode @{c} ctx (ms/token)", lambda r, c=c: r["decode_ms"][str(c)], True) for c in args.contexts]
    rows.append((f"prefill {args.prefill} (tokens/s)", lambda r: r["prefill_tokens_per_s"], False))
    rows.append(("peak RSS (MiB)", lambda r: r["peak_rss_mib"], True))
    for label, get, lower_is_better in rows:
        values = [get(results[e]) for e in args.engines]
        line = f"{label:28}" + "".join(f"{v:16.1f}" for v in values)
        if len(values) == 2:
            ratio = values[1] / values[0] if lower_is_better else values[0] / values[1]
            line += f"   {ratio:7.2f}x"
        print(line)
    if "dsv2" in results:
        for c in args.contexts:
            print(f"dsv2 decode @{c}: {results['dsv2']['decode_ms'][str(c)] / floor_ms:.2f}x the bandwidth floor")
    print("\nratio = how many times faster (or smaller) dsv2 is than the other engine")


if __name__ == "__main__":
    main()
