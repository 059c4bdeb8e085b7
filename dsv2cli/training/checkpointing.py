"""Writing a training run to disk: a HF-layout model directory plus the trainer state needed to resume.

Layout of an output directory::

    config.json  model.safetensors  tokenizer.json  tokenizer_config.json  generation_config.json
    training.json                      summary of the run (settings, losses, balance, timings)
    trainer/model.safetensors          float32 master weights (dsv2 names)
    trainer/optimizer.safetensors      AdamW moments and step counts
    trainer/state.json                 step, data fingerprint, optimizer hyper-parameters, RNG state

Everything is safetensors or JSON (nothing is pickled). A checkpoint is written into a temporary
sibling directory and renamed into place, so an interrupted write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsv2cli.checkpoint.hf_keys import hf_name
from dsv2cli.config import ModelConfig
from dsv2cli.errors import CheckpointError
from dsv2cli.model import DeepseekV2

TRAINER_DIR = "trainer"
STATE_FILE = "state.json"


def hf_state_dict(model: DeepseekV2, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under HF checkpoint names, routed experts split per expert (router kept in float32)."""
    config = model.config
    inter = config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = f"model.{name.removesuffix('gate_up_proj')}"
            for j in range(tensor.shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = tensor[j, :inter].to(dtype).contiguous()
                out[f"{prefix}{j}.up_proj.weight"] = tensor[j, inter:].to(dtype).contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = f"model.{name.removesuffix('down_proj')}"
            for j in range(tensor.shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = tensor[j].to(dtype).contiguous()
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            keep = torch.float32 if name.endswith(".mlp.gate.weight") else dtype
            out[hf_name(name)] = tensor.to(keep).contiguous()
    return out


def write_model_files(model: DeepseekV2, directory: Path, dtype: torch.dtype, dtype_name: str) -> None:
    """``config.json`` (DeepSeek spelling) and ``model.safetensors`` in HF layout."""
    hf = model.config.replace(torch_dtype=dtype_name).to_hf("deepseek")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(hf_state_dict(model, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})


def write_generation_config(config: ModelConfig, directory: Path) -> None:
    # DeepSeek-V2's believed defaults (spec §7): sampling at temperature 0.3, top-p 0.95.
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.eos_token_ids[0] if config.eos_token_ids else None,
        "do_sample": True,
        "temperature": 0.3,
        "top_p": 0.95,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as flat tensors ``state.{param_index}.{key}`` plus JSON-able param groups."""
    state_dict = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for index, entry in state_dict["state"].items()
        for key, value in entry.items()
    }
    return tensors, state_dict["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    output: Path,
    write_extra: Callable[[Path], None],
    model: DeepseekV2,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    export_dtype: torch.dtype,
    export_dtype_name: str,
) -> None:
    """Write the whole output directory atomically: temp sibling dir, then rename over the old one.

    ``write_extra(dir)`` adds the tokenizer files and the run summary.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        write_model_files(model, tmp, export_dtype, export_dtype_name)
        write_generation_config(model.config, tmp)
        write_extra(tmp)
        trainer = tmp / TRAINER_DIR
        trainer.mkdir()
        master = {name: t.detach().float().contiguous() for name, t in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            master.pop("lm_head.weight", None)
        save_file(master, str(trainer / "model.safetensors"))
        tensors, groups = optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(trainer / "optimizer.safetensors"))
        (trainer / STATE_FILE).write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n")
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o666 & ~_umask())
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            output.rename(old)
        tmp.rename(output)
        if old is not None and old.is_dir():
            shutil.rmtree(old)
        elif old is not None:
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_trainer_state(output: Path) -> dict[str, Any]:
    path = output / TRAINER_DIR / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{output} has no resumable trainer state ({TRAINER_DIR}/{STATE_FILE})",
            hint="--resume takes an output directory written by `dsv2 train`",
        )
    return json.loads(path.read_text())


def restore_training(output: Path, model: DeepseekV2, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load master weights, optimizer moments and the RNG state saved by :func:`save_checkpoint`."""
    trainer = output / TRAINER_DIR
    weights = load_file(str(trainer / "model.safetensors"))
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)
    tensors = load_file(str(trainer / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    restore_optimizer(optimizer, tensors, state["param_groups"])
