"""Sharded loading: each rank reads only its own slices of a HF-layout or native (float, int8 or int4) checkpoint.

No rank ever holds the full model, and no pre-sharding step is needed. The loader is checkpoint's own
(``load_checkpoint``); this module gives it the two sharding specifics: this rank's :class:`ShardPlan`
as the share to read (each split tensor is read with ``safe_open(...).get_slice(name)[split]`` from the
memory-mapped files; routed experts of other ranks are not touched at all), and :func:`parallelize` to
give the empty model this rank's shapes. An int4 checkpoint's packed weights and group scales are sliced
the same way, in stored units (the plan takes the manifest's ``group_size``; input columns split on group
boundaries only). Before anything is read, the rank's share is checked against the memory it has
(``checkpoint/fit.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.native import is_native, read_manifest
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
    """This rank's part of a checkpoint (HF layout, or native float, int8 or int4), as a parallelized model on ``group.device``.

    ``dtype`` as in ``load_checkpoint``: None keeps float32 for HF and the stored dtype for native; int8
    and int4 weights stay as stored and ``dtype`` is then the activation dtype. ``on_tensor`` is called per HF tensor read.
    ``working``: the bytes the rank needs beside its weights (``fit.check_load``'s default when None).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = config or load_config(directory)
    group_size = read_manifest(directory).group_size if is_native(directory) else None  # int4's; None otherwise
    return load_checkpoint(
        directory,
        dtype,
        group.device,
        on_tensor,
        working,
        config=config,
        share=ShardPlan(config, group.rank, group.world_size, group_size),
        prepare=lambda model: parallelize(model, group),
    )
