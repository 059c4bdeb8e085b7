"""Load a checkpoint into :class:`DeepseekV2` without allocating random weights first.

``load_checkpoint`` is the one loader, for one process or one rank of many: a native directory
(``native.py``) is mapped as it is; a HF-layout one is read by ``read_hf_state_dict`` below. Given a
:class:`~dsv2cli.checkpoint.share.Share` (``parallel/loading.py`` passes its rank's ``ShardPlan``), only
that share of each tensor is read, and ``prepare`` (``parallelize``) gives the empty model its shapes.

The model is built on the meta device; tensors are read from memory-mapped safetensors
files, per-expert tensors are packed into the stacked layout, and everything is assigned
with ``load_state_dict(assign=True)``. Pickled weights are never read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsv2cli.checkpoint.files import CheckpointFiles, inspect_checkpoint
from dsv2cli.checkpoint.fit import check_load
from dsv2cli.checkpoint.hf_keys import IGNORABLE, expert_slice, native_name, native_shapes, runtime_dtype
from dsv2cli.checkpoint.native import build_structure, has_int8_head, is_native, read_manifest, read_native_state_dict
from dsv2cli.checkpoint.share import Share
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError
from dsv2cli.model import DeepseekV2


def build_empty(config: ModelConfig) -> DeepseekV2:
    """The float model with every parameter on the meta device (rotary tables are real)."""
    return build_structure(config, None)


def read_hf_state_dict(
    files: CheckpointFiles,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    on_tensor: Callable[[str], None] | None = None,
    share: Share | None = None,
) -> dict[str, torch.Tensor]:
    """dsv2-named state dict from HF files: experts stacked, dtypes converted.

    With a ``share`` (one rank of a multi-process run) only that rank's part is read: split tensors
    are sliced as they are read, its own experts stacked, other ranks' experts never touched.
    """
    shapes = native_shapes(config)
    first, stop = share.experts if share is not None else (0, config.n_routed_experts or 0)
    intermediate = config.moe_intermediate_size
    rows = {"gate": slice(0, intermediate), "up": slice(intermediate, 2 * intermediate), "down": slice(None)}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, info in files.tensors.items():
        expert = expert_slice(name)
        if IGNORABLE.match(name) or (share is not None and expert is not None and not first <= expert.expert < stop):
            continue
        by_file.setdefault(info.file, []).append(name)
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    expert = expert_slice(name)
                    if expert is None:
                        target = native_name(name)
                        split = None if share is None else share.split_for(target)
                        tensor = f.get_tensor(name) if split is None else f.get_slice(name)[split.index()]
                        state[target] = tensor.to(device=device, dtype=runtime_dtype(target, dtype))
                    else:
                        stacked = state.get(expert.native_name)
                        if stacked is None:
                            shape = shapes[expert.native_name]
                            if share is not None:
                                shape = share.local_shape(expert.native_name, shape)
                            stacked = state[expert.native_name] = torch.empty(shape, dtype=dtype, device=device)
                        stacked[expert.expert - first, rows[expert.part]] = f.get_tensor(name)
                    if on_tensor is not None:
                        on_tensor(name)
        except (
            OSError,
            RuntimeError,
            SafetensorError,
        ) as exc:  # SafetensorError: a RuntimeError before 0.8, a plain Exception since
            raise CheckpointError(f"could not read {path.name}: {exc}", hint="the file may be corrupt; re-download it") from exc
    return state


def load_checkpoint(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    on_tensor: Callable[[str], None] | None = None,
    working: int | None = None,
    checked: bool = False,
    config: ModelConfig | None = None,
    share: Share | None = None,
    prepare: Callable[[DeepseekV2], DeepseekV2] | None = None,
) -> DeepseekV2:
    """Load any checkpoint directory dsv2 understands: HF layout, or native (``manifest.json``, float, int8 or int4).

    ``dtype=None`` keeps float32 for a HF checkpoint (the parity dtype) and the stored dtype for a
    native one (its files are mapped, not copied). An int8 checkpoint keeps int8 weights; ``dtype`` is
    then the dtype of its activations and remaining float tensors. Refused before anything is allocated
    when it does not fit in memory with ``working`` bytes beside it (:func:`fit.check_load`), unless the
    caller has just ``checked``. ``on_tensor`` is called per HF tensor read. With a ``share``, only that
    share of each tensor is read, and ``prepare`` turns the empty model into one of the share's shapes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = config or load_config(directory)
    if not checked:
        check_load(directory, dtype, device, plan=share, working=working)
    if is_native(directory):
        manifest = read_manifest(directory)
        model = build_structure(config, manifest.quantization, has_int8_head(manifest), manifest.group_size)
        state = read_native_state_dict(directory, manifest, config, dtype, device, share)
    else:
        model = build_empty(config)
        files = inspect_checkpoint(directory, config)
        state = read_hf_state_dict(files, config, dtype or torch.float32, device, on_tensor, share)
    return _assign(prepare(model) if prepare is not None else model, state, config, device)


def load_hf_checkpoint(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> DeepseekV2:
    """Build a model from a HF-layout directory (one ``model.safetensors`` or an index with shards), without
    :func:`load_checkpoint`'s memory check (tests and parity runs load small models this way)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = config or load_config(directory)
    state = read_hf_state_dict(inspect_checkpoint(directory, config), config, dtype, device, on_tensor)
    return _assign(build_empty(config), state, config, device)


def _assign(model: DeepseekV2, state: dict[str, torch.Tensor], config: ModelConfig, device: torch.device | str) -> DeepseekV2:
    """``state`` into the meta-device ``model`` as it is (``assign=True``), the head tied to the embedding if so configured."""
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(device)
    return model.eval()
