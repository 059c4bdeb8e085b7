"""Sharded loading: each rank reads only its own slices of a HF-layout or native (float or int8) checkpoint.

No rank ever holds the full model, and no pre-sharding step is needed: the model is built on the meta
device (with int8 modules for an int8 checkpoint), :func:`parallelize` gives it this rank's shapes, and the
single-process reader of the layout, given this rank's :class:`ShardPlan`, reads each split tensor with
``safe_open(...).get_slice(name)[split]`` from the memory-mapped files: ``read_hf_state_dict`` for HF
safetensors, ``read_native_state_dict`` for a native directory. Routed experts that belong to other
ranks are not touched at all. Before anything is read, the rank's share is checked against the memory it
has (``checkpoint/fit.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv2cli.checkpoint.files import inspect_checkpoint
from dsv2cli.checkpoint.fit import check_load
from dsv2cli.checkpoint.loader import build_empty, read_hf_state_dict
from dsv2cli.checkpoint.native import build_structure, has_int8_head, is_native, read_manifest, read_native_state_dict
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError
from dsv2cli.model import DeepseekV2
from dsv2cli.parallel.group import ParallelGroup
from dsv2cli.parallel.layers import parallelize
from dsv2cli.parallel.plan import ShardPlan


def load_sharded(
    directory: str | Path,
    group: ParallelGroup,
    dtype: torch.dtype | None = None,
    config: ModelConfig | None = None,
    on_tensor: Callable[[str], None] | None = None,
    working: int | None = None,
) -> DeepseekV2:
    """This rank's part of a checkpoint (HF layout, or native float or int8), as a parallelized model on ``group.device``.

    ``dtype`` as in ``load_checkpoint``: None keeps float32 for HF and the stored dtype for native; int8
    weights stay int8 and ``dtype`` is then the activation dtype. ``on_tensor`` is called per HF tensor read.
    ``working``: the bytes the rank needs beside its weights (``fit.check_load``'s default when None).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = config or load_config(directory)
    plan = ShardPlan(config, group.rank, group.world_size)
    check_load(directory, dtype, group.device, plan=plan, working=working)
    if is_native(directory):
        manifest = read_manifest(directory)
        model = parallelize(build_structure(config, manifest.quantization, has_int8_head(manifest)), group)
        state = read_native_state_dict(directory, manifest, config, dtype, group.device, plan)
    else:
        files = inspect_checkpoint(directory, config)
        model = parallelize(build_empty(config), group)
        state = read_hf_state_dict(files, config, dtype or torch.float32, group.device, on_tensor, plan)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(group.device)
    return model.eval()
