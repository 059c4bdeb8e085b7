"""A random-weight checkpoint with DeepSeek-V2-Lite's exact config, for the figures users read.

DeepSeek-V2-Lite: 27 layers, hidden 2048, 16 heads, no query compression, kv_lora_rank 512,
64 routed experts (top-6) + 2 shared, vocab 102400: 15,706,484,224 parameters, 31.4 GB in bfloat16.
The small ``bench-300m`` model's active int8 weights (~94 MB a token) fit in this machine's 480 MiB
L3 cache, so only a checkpoint this size measures what a user of V2-Lite gets.

The checkpoint is written in Hugging Face layout (``model-0000N-of-0000M.safetensors`` shards of
about 5 GB and ``model.safetensors.index.json``, as DeepSeek publishes it), streamed tensor by tensor
so that memory stays at a few hundred MB. Values: norms 1, routers std 0.5 (spread-out routing),
everything else std 0.02, drawn as slices at random offsets of one pool of normal values (the disk,
not the random number generator, sets the speed: a few minutes). The demo's tokenizer is copied
beside it (102400 ids: the ids past the demo's vocabulary never come out of it).

    python benchmarks/full_size.py /data/lite-bf16            # writes 31.4 GB; checks free disk first
    python benchmarks/full_size.py /data/lite-bf16 --remove   # deletes what this script wrote there
    python benchmarks/full_size.py --print-needs               # bytes each copy needs, nothing written

Other benchmarks take ``--checkpoint DIR`` of such a directory. Delete it when done: with the int8
copy (15.9 GB) and llama.cpp's Q8_0 GGUF (16.7 GB) it takes 64 GB of the shared disk.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv2cli.analysis.params import count_params  # noqa: E402
from dsv2cli.checkpoint.files import DTYPE_SIZES, INDEX_NAME  # noqa: E402
from dsv2cli.checkpoint.fit import load_need, native_weights  # noqa: E402
from dsv2cli.checkpoint.hf_keys import hf_tensor_shapes  # noqa: E402
from dsv2cli.checkpoint.writer import SafetensorsWriter, TensorSpec  # noqa: E402
from dsv2cli.config import ModelConfig  # noqa: E402
from dsv2cli.presets import preset_config  # noqa: E402

GB = 10**9
LITE_PARAMETERS = 15_706_484_224
SHARD_BYTES = 5 * GB  # DeepSeek's own V2-Lite shards are ~8.6 GB; transformers' default is 5 GB
MARKER = ".dsv2-benchmark-checkpoint"  # written first; --remove deletes only directories that carry it
DEMO = ROOT / "dsv2cli" / "assets" / "demo"
POOL_VALUES = 1 << 26  # 64 Mi normal values (128 MiB in bfloat16) to slice tensors from
CHUNK_VALUES = 1 << 24  # values written per call (32 MiB of bfloat16)


def lite_config() -> ModelConfig:
    return preset_config("deepseek-v2-lite")


def checkpoint_bytes(config: ModelConfig, dtype: str = "BF16") -> int:
    return sum(DTYPE_SIZES[dtype] * math.prod(shape) for shape in hf_tensor_shapes(config).values())


def shard_specs(config: ModelConfig, shard_bytes: int) -> list[list[TensorSpec]]:
    """The tensors of ``config`` in HF order, grouped into shards of at most ``shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for name, shape in hf_tensor_shapes(config).items():
        spec = TensorSpec(name, "BF16", shape)
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def free_bytes(directory: Path) -> int:
    existing = directory
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def write_checkpoint(
    config: ModelConfig, directory: Path, shard_bytes: int = SHARD_BYTES, seed: int = 0, progress: bool = True
) -> None:
    """Write a random bfloat16 HF-layout checkpoint of ``config`` into the new directory ``directory``.

    Refuses (SystemExit) when ``directory`` exists or the disk lacks the bytes. Shards are written
    as ``*.partial`` and renamed when complete; the index is written last, so a directory without
    ``model.safetensors.index.json`` is an interrupted run (rerun after ``--remove``).
    """
    need = checkpoint_bytes(config)
    if directory.exists():
        raise SystemExit(f"{directory} exists; choose a new directory or remove it (--remove)")
    free = free_bytes(directory.parent)
    if need + GB > free:
        raise SystemExit(f"{directory}: needs {need / GB:.1f} GB (+1 GB spare), {free / GB:.1f} GB free on that disk")
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("random-weight benchmark checkpoint written by benchmarks/full_size.py\n")
    hf = config.to_hf()
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(DEMO / name, directory / name)
    shards = shard_specs(config, shard_bytes)
    largest = max(math.prod(spec.shape) for specs in shards for spec in specs)
    pool_values = min(POOL_VALUES, largest)  # a small model needs only a small pool
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_values, generator=generator).bfloat16()
    ones = torch.ones(min(CHUNK_VALUES, largest), dtype=torch.bfloat16)
    weight_map: dict[str, str] = {}
    written, start = 0, time.perf_counter()
    for index, specs in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        partial = directory / (file + ".partial")
        writer = SafetensorsWriter(partial, specs)
        for spec in specs:
            weight_map[spec.name] = file
            numel = math.prod(spec.shape)
            scale = 0.5 / 0.02 if spec.name.endswith("mlp.gate.weight") else 1.0
            for first in range(0, numel, CHUNK_VALUES):
                n = min(CHUNK_VALUES, numel - first)
                if spec.name.endswith("norm.weight"):
                    block = ones[:n]
                else:
                    offset = int(torch.randint(0, pool_values - n + 1, (1,), generator=generator))
                    block = pool[offset : offset + n] * (0.02 * scale)
                writer.write(block.view(torch.uint8).numpy())
            written += spec.nbytes
        writer.close()
        partial.rename(directory / file)
        if progress:
            elapsed = time.perf_counter() - start
            print(f"  {file}: {written / GB:.1f} / {need / GB:.1f} GB, {written / GB / elapsed:.2f} GB/s", file=sys.stderr)
    index_json = {"metadata": {"total_size": need}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index_json, indent=2))


def remove_checkpoint(directory: Path) -> None:
    """Delete a directory this script wrote (it carries :data:`MARKER`); anything else is left alone."""
    if not (directory / MARKER).is_file():
        raise SystemExit(f"{directory} was not written by benchmarks/full_size.py ({MARKER} missing); not removing it")
    shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, nargs="?", help="new directory for the checkpoint")
    parser.add_argument("--remove", action="store_true", help="delete a checkpoint this script wrote")
    parser.add_argument("--print-needs", action="store_true", help="print the bytes each benchmark copy needs and exit")
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / GB, help="shard size in GB (default 5)")
    args = parser.parse_args()
    config = lite_config()
    if args.print_needs:
        stored = load_need(native_weights(config, "int8"), None)  # the int8 copy in its stored dtypes: its files
        print(f"DeepSeek-V2-Lite shape: {count_params(config).total:,} parameters")
        print(f"  bfloat16 HF checkpoint     {checkpoint_bytes(config) / GB:5.1f} GB")
        print(f"  dsv2 int8 copy             {(stored.copied + stored.mapped) / GB:5.1f} GB")
        print(
            f"  llama.cpp Q8_0 GGUF        {count_params(config).total * 34 / 32 / GB:5.1f} GB (approx.: 34 bytes per 32 weights)"
        )
        return
    if args.directory is None:
        parser.error("give a directory")
    if args.remove:
        remove_checkpoint(args.directory)
        return
    total = count_params(config).total
    if total != LITE_PARAMETERS:
        raise SystemExit(f"the deepseek-v2-lite preset has {total:,} parameters, not DeepSeek-V2-Lite's {LITE_PARAMETERS:,}")
    start = time.perf_counter()
    write_checkpoint(config, args.directory, int(args.shard_gb * GB))
    print(f"wrote {checkpoint_bytes(config) / GB:.1f} GB to {args.directory} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
