"""Sharded loading: each rank reads only its own slices of a HF-layout or native (float or int8) checkpoint.

No rank ever holds the full model, and no pre-sharding step is needed. The loader is checkpoint's own
(``load_checkpoint``); this module gives it the two sharding specifics: this rank's :class:`ShardPlan`
as the share to read (each split tensor is read with ``safe_open(...).get_slice(name)[split]`` from the
memory-mapped files; routed experts of other ranks are not touched at all), and :func:`parallelize` to
give the empty model this rank's shapes. Before anything is read, the rank's share is checked against
the memory it has (``checkpoint/fit.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.native import is_native, read_manifest
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError, UnsupportedError
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
    if is_native(directory) and read_manifest(directory).quantization == "int4":
        # Splitting packed int4 rows and their group scales between ranks is not written yet.
        raise UnsupportedError(
            f"{directory} holds int4 weights, which multi-process (torchrun) runs do not split",
            hint="run it in one process (without torchrun), or convert the float source with `quantize=int8` for torchrun",
        )
    return load_checkpoint(
        directory,
        dtype,
        group.device,
        on_tensor,
        working,
        config=config,
        share=ShardPlan(config, group.rank, group.world_size),
        prepare=lambda model: parallelize(model, group),
    )
