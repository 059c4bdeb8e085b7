"""Sharded loading: each rank reads only its own slices of the HF safetensors files.

No rank ever holds the full model, and no pre-sharding step is needed: the model is built on the meta
device, :func:`parallelize` gives it this rank's shapes, and each tensor is read with
``safe_open(...).get_slice(name)[split]`` (memory-mapped; only the slice's bytes are copied). Routed
experts that belong to other ranks are not touched at all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from dsv2cli.checkpoint.files import CheckpointFiles, inspect_checkpoint
from dsv2cli.checkpoint.hf_keys import IGNORABLE, expert_slice, native_name, runtime_dtype
from dsv2cli.checkpoint.loader import build_empty
from dsv2cli.checkpoint.native import is_native
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError, UnsupportedError
from dsv2cli.model import DeepseekV2
from dsv2cli.parallel.group import ParallelGroup
from dsv2cli.parallel.layers import parallelize
from dsv2cli.parallel.plan import ShardPlan


def read_local_state(
    files: CheckpointFiles,
    plan: ShardPlan,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's dsv2-named state dict: split tensors sliced, its own experts stacked, others skipped."""
    config = plan.config
    first, stop = plan.experts
    intermediate = config.moe_intermediate_size
    parts = {"gate": slice(0, intermediate), "up": slice(intermediate, 2 * intermediate), "down": slice(None)}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, info in files.tensors.items():
        expert = expert_slice(name)
        if IGNORABLE.match(name) or (expert is not None and not first <= expert.expert < stop):
            continue
        by_file.setdefault(info.file, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    expert = expert_slice(name)
                    if expert is None:
                        target = native_name(name)
                        split = plan.split_for(target)
                        tensor = f.get_tensor(name) if split is None else f.get_slice(name)[split.index()]
                        wanted = runtime_dtype(target, dtype)
                        state[target] = tensor.to(device=device, dtype=wanted)
                    else:
                        stacked = state.get(expert.native_name)
                        if stacked is None:
                            full = (config.n_routed_experts or 0, 2 * intermediate, config.hidden_size)
                            if expert.part == "down":
                                full = (full[0], config.hidden_size, intermediate)
                            shape = plan.local_shape(expert.native_name, full)
                            stacked = state[expert.native_name] = torch.empty(shape, dtype=dtype, device=device)
                        stacked[expert.expert - first, parts[expert.part]] = f.get_tensor(name)
                    if on_tensor is not None:
                        on_tensor(name)
        except (OSError, RuntimeError) as exc:  # safetensors raises SafetensorError (a RuntimeError) on bad bytes
            raise CheckpointError(f"could not read {path.name}: {exc}", hint="the file may be corrupt; re-download it") from exc
    return state


def load_sharded(
    directory: str | Path,
    group: ParallelGroup,
    dtype: torch.dtype = torch.float32,
    config: ModelConfig | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> DeepseekV2:
    """This rank's part of a HF-layout checkpoint, as a parallelized model on ``group.device``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if is_native(directory):
        raise UnsupportedError(
            "multi-process runs read HF-layout safetensors; this is a dsv2 native checkpoint",
            hint="run on the HF checkpoint it was converted from",
        )
    config = config or load_config(directory)
    plan = ShardPlan(config, group.rank, group.world_size)
    files = inspect_checkpoint(directory, config)
    model = parallelize(build_empty(config), group)
    state = read_local_state(files, plan, dtype, group.device, on_tensor)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(group.device)
    return model.eval()
