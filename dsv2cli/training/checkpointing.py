"""Writing a training run to disk: a HF-layout model directory plus the trainer state needed to resume.

Layout of an output directory::

    config.json  model.safetensors  tokenizer.json  tokenizer_config.json  generation_config.json
    training.json                      summary of the run (settings, losses, balance, timings)
    trainer/model.safetensors          float32 master weights (dsv2 names)
    trainer/optimizer.safetensors      AdamW moments and step counts
    trainer/state.json                 step, data fingerprint, optimizer hyper-parameters, RNG state

Everything is safetensors or JSON (nothing is pickled). A checkpoint is written into a staging
directory beside OUTPUT and committed by :class:`dsv2cli.commit.Output`, so an interrupted write never
leaves a half checkpoint and nothing the run did not write is ever replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsv2cli.checkpoint.files import inspect_checkpoint
from dsv2cli.checkpoint.hf_keys import hf_name
from dsv2cli.checkpoint.loader import read_hf_state_dict
from dsv2cli.checkpoint.native import is_native
from dsv2cli.commit import Output
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError, InputError
from dsv2cli.model import DeepseekV2
from dsv2cli.untrusted import Fields, is_int, is_number, read_json

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
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        if int(index) >= len(params) or (key != "step" and value.shape != params[int(index)].shape):
            raise ValueError(f"optimizer.safetensors: '{name}' does not match the model")
        state.setdefault(int(index), {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    output: Output,
    write_extra: Callable[[Path], None],
    model: DeepseekV2,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    export_dtype: torch.dtype,
    export_dtype_name: str,
) -> None:
    """Write the whole output directory into a staging directory, then commit it in place of the last checkpoint.

    ``write_extra(dir)`` adds the tokenizer files and the run summary.
    """
    with output.staged() as staging:
        try:
            write_model_files(model, staging, export_dtype, export_dtype_name)
            write_generation_config(model.config, staging)
            write_extra(staging)
            trainer = staging / TRAINER_DIR
            trainer.mkdir()
            master = {name: t.detach().float().contiguous() for name, t in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                master.pop("lm_head.weight", None)
            save_file(master, str(trainer / "model.safetensors"))
            tensors, groups = optimizer_tensors(optimizer)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(trainer / "optimizer.safetensors"))
            (trainer / STATE_FILE).write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n")
        except OSError as exc:
            raise InputError(
                f"could not write the checkpoint of {output.path}: {exc.strerror or exc}",
                hint="check free space and that OUTPUT's directory is writable",
            ) from None
        except Exception as exc:  # safetensors raises plain Exceptions for I/O errors
            if type(exc).__name__ != "SafetensorError":
                raise
            raise InputError(f"could not write the checkpoint of {output.path}: {exc}") from None


def read_trainer_state(output: Path) -> dict[str, Any]:
    """``trainer/state.json`` with every field's type checked (``settings`` stays a raw object for the trainer)."""
    path = output / TRAINER_DIR / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{output} has no resumable trainer state ({TRAINER_DIR}/{STATE_FILE})",
            hint="`resume` takes an output directory written by dsv2 train",
        )
    where = f"{TRAINER_DIR}/{STATE_FILE} of {output}"
    fields = Fields(read_json(path, CheckpointError), where, CheckpointError)
    history = fields.list("eval_history")
    for entry in history:
        if not (isinstance(entry, list) and len(entry) == 2 and is_int(entry[0]) and is_number(entry[1])):
            raise fields.fail("eval_history", "must list [step, loss] pairs")
    groups = fields.list("param_groups")
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise fields.fail("param_groups", "must be a list of objects")
    return {
        "step": fields.int("step", low=0),
        "seconds": fields.float("seconds", low=0),
        "settings": fields.object("settings"),
        "data_fingerprint": fields.str("data_fingerprint"),
        "eval_history": history,
        "param_groups": groups,
    }


def restore_training(output: Path, model: DeepseekV2, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load master weights, optimizer moments and the RNG state saved by :func:`save_checkpoint`."""
    trainer = output / TRAINER_DIR
    try:
        _load_weights(model, load_file(str(trainer / "model.safetensors")))
        tensors = load_file(str(trainer / "optimizer.safetensors"))
        rng = tensors.pop("rng.torch", None)
        if rng is None or rng.dtype != torch.uint8:
            raise ValueError("optimizer.safetensors has no RNG state")
        restore_optimizer(optimizer, tensors, state["param_groups"])
        torch.set_rng_state(rng)
    except Exception as exc:  # safetensors, torch and our own checks: all mean a damaged checkpoint
        raise CheckpointError(
            f"the trainer checkpoint in {trainer} cannot be restored: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint="it is damaged or from another run; start a new run with another `out`",
        ) from None


def _load_weights(model: DeepseekV2, weights: dict[str, torch.Tensor]) -> None:
    """dsv2-named ``weights`` into ``model`` in its own dtypes; a missing, extra or misshapen tensor raises ValueError."""
    if model.config.tie_word_embeddings and "embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    own = model.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise ValueError("model.safetensors does not hold this model's weights")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)


def check_init_source(source: Path) -> ModelConfig:
    """The config of a model that ``--init-from`` can start from: a float HF-layout directory with a tokenizer."""
    if not (source / "config.json").is_file():
        raise InputError(f"{source} has no config.json", hint="`init_from` takes the directory of a trained model")
    if is_native(source):
        raise InputError(
            f"{source} is a dsv2 native (converted) checkpoint",
            hint="start from the float model it was converted from, e.g. a directory written by dsv2 train",
        )
    if not (source / "tokenizer.json").is_file():
        raise InputError(f"{source} has no tokenizer.json", hint="a run that starts from a model keeps its tokenizer")
    return load_config(source)


def read_initial_weights(source: Path, model: DeepseekV2) -> str:
    """Copy a trained model's weights into ``model`` and return the file read.

    A directory written by ``dsv2 train`` has float32 master weights (``trainer/model.safetensors``); they
    are read in preference to the exported ``model.safetensors``, which may have been rounded to bfloat16.
    """
    master = source / TRAINER_DIR / "model.safetensors"
    try:
        if master.is_file():
            _load_weights(model, load_file(str(master)))
            return str(master.relative_to(source))
        _load_weights(model, read_hf_state_dict(inspect_checkpoint(source, model.config), model.config, torch.float32))
        return "model.safetensors"
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, torch and our own checks
        raise CheckpointError(
            f"the weights of {source} cannot be used to start this run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            hint="`init_from` takes a float model whose shapes are its own config.json's",
        ) from None
