"""Decode tokens/s of the sharded model on GPUs over NCCL: the path `torchrun -m dsv2cli generate` takes.

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_distributed_gpu.py          # bench-300m, random weights
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_distributed_gpu.py --model ./DeepSeek-V2-Lite
    python benchmarks/bench_distributed_gpu.py --batch 8 --new-tokens 128                 # world size 1, no torchrun

Every rank decodes the same greedy batch; rank 0 prints prefill and decode tokens/s and the per-rank
parameter memory. At world size 1 the plain (unsharded) model runs in the same process as well: the
ratio shows what the collectives and the sharded modules cost, and the logits of the two are compared.

Needs CUDA; without it the script stops with a message. Status: written and checked on a machine
without a GPU (the CPU/Gloo path of the same code is covered by tests/test_parallel*.py); this script
itself has not been run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv2cli.analysis.kv_measure import random_model  # noqa: E402
from dsv2cli.checkpoint.loader import load_checkpoint  # noqa: E402
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest  # noqa: E402
from dsv2cli.model.dtypes import DTYPES  # noqa: E402
from dsv2cli.parallel.group import launched_by_torchrun, start, stop  # noqa: E402
from dsv2cli.parallel.layers import parallelize  # noqa: E402
from dsv2cli.parallel.loading import load_sharded  # noqa: E402
from dsv2cli.parallel.memory import gather_report  # noqa: E402
from dsv2cli.presets import preset_config  # noqa: E402


def _as_single_rank() -> None:
    """Plain ``python`` run: describe a world of one, as torchrun would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _decode(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """Greedy generation of ``new_tokens`` per row; returns (prefill tokens/s, decode tokens/s, token ids)."""
    requests = [GenerationRequest(row.tolist(), None, i) for i, row in enumerate(prompts)]
    results = Generation(model, requests, GenerationOptions(max_new_tokens=new_tokens, ignore_eos=True)).run()
    decode_s = max(r.timings.decode_s for r in results)
    prefill_s = results[0].timings.prefill_s
    tokens = sum(len(r.token_ids) for r in results)
    return prompts.numel() / prefill_s, tokens / decode_s, [r.token_ids for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF-layout checkpoint directory (default: random weights of --preset)")
    parser.add_argument("--preset", default="bench-300m")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench_distributed_gpu.py needs a CUDA GPU (it measures the NCCL path); none is visible here.\n"
            "On CPU, check the same code with: torchrun --standalone --nproc-per-node 2 -m dsv2cli generate ..."
        )
    if not launched_by_torchrun():
        _as_single_rank()
    dtype = DTYPES[args.dtype]
    group = start("cuda", "nccl")
    try:
        if args.model is not None:
            model = load_sharded(args.model, group, dtype)
            plain = load_checkpoint(args.model, dtype, group.device) if group.world_size == 1 else None
        else:
            config = preset_config(args.preset)
            model = parallelize(random_model(config, dtype, seed=0), group).to(group.device)
            plain = random_model(config, dtype, seed=0).to(group.device) if group.world_size == 1 else None
        report = gather_report(group, model, dtype)
        vocab = model.config.vocab_size
        prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        _decode(model, prompts[:, :16], 4)  # warm-up: kernel selection and NCCL communicators
        prefill, decode, ids = _decode(model, prompts, args.new_tokens)
        result: dict[str, object] = {
            "world_size": group.world_size,
            "backend": group.backend,
            "device": torch.cuda.get_device_name(group.device),
            "dtype": args.dtype,
            "model": str(args.model or args.preset),
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode,
            "parameter_bytes_per_rank": [r.parameter_bytes for r in report.ranks],
        }
        if plain is not None:
            _decode(plain, prompts[:, :16], 4)
            plain_prefill, plain_decode, plain_ids = _decode(plain, prompts, args.new_tokens)
            with torch.inference_mode():
                sharded_logits = model(prompts.to(group.device)).float()
                plain_logits = plain(prompts.to(group.device)).float()
            scale = plain_logits.abs().max().item()
            result.update(
                plain_decode_tokens_per_s=plain_decode,
                plain_prefill_tokens_per_s=plain_prefill,
                sharded_over_plain_decode=decode / plain_decode,
                max_logit_difference_relative=(sharded_logits - plain_logits).abs().max().item() / scale,
                same_greedy_tokens=ids == plain_ids,
            )
        if group.is_main:
            print(json.dumps(result, indent=2))
            line = f"decode {decode:.1f} tokens/s on {group.world_size} rank(s) ({group.backend}, {args.dtype})"
            if plain is not None:
                line += f"; plain model {result['plain_decode_tokens_per_s']:.1f} tokens/s (ratio {result['sharded_over_plain_decode']:.2f})"
            print(line, file=sys.stderr)
    finally:
        stop()


if __name__ == "__main__":
    main()
