"""Sharded loading: each rank reads only its own slices of the HF safetensors files.

No rank ever holds the full model, and no pre-sharding step is needed: the model is built on the meta
device, :func:`parallelize` gives it this rank's shapes, and the single-process reader
(``read_hf_state_dict`` with this rank's :class:`ShardPlan`) reads each tensor with
``safe_open(...).get_slice(name)[split]`` (memory-mapped; only the slice's bytes are copied). Routed
experts that belong to other ranks are not touched at all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv2cli.checkpoint.files import inspect_checkpoint
from dsv2cli.checkpoint.loader import build_empty, read_hf_state_dict
from dsv2cli.checkpoint.native import is_native
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError, UnsupportedError
from dsv2cli.model import DeepseekV2
from dsv2cli.parallel.group import ParallelGroup
from dsv2cli.parallel.layers import parallelize
from dsv2cli.parallel.plan import ShardPlan


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
    state = read_hf_state_dict(files, plan.config, dtype, group.device, on_tensor, plan)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(group.device)
    return model.eval()
