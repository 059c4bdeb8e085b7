"""Loading a model for generation: resolve MODEL, pick device/dtype/threads, load weights and tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv2cli import kernels
from dsv2cli.checkpoint.loader import DTYPES, load_checkpoint
from dsv2cli.errors import InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.fusion import fuse_projections
from dsv2cli.resolve import resolve_checkpoint


@dataclass
class LoadedModel:
    name: str
    directory: Path
    model: DeepseekV2
    tokenizer: TextTokenizer | None
    device: torch.device
    dtype: torch.dtype

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.tokenizer is not None and self.tokenizer.special.eos_token_ids:
            return self.tokenizer.special.eos_token_ids
        return tuple(self.model.config.eos_token_ids)


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"unknown device '{name}'", hint="choose cpu, cuda or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    return torch.device(name)


def choose_dtype(name: str, device: torch.device, directory: Path) -> torch.dtype:
    """``auto``: float32 on CPU (fastest and exact there); the checkpoint's dtype on CUDA."""
    if name != "auto":
        if name not in DTYPES:
            raise InputError(f"unknown dtype '{name}'", hint=f"choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    try:
        stored = json.loads((directory / "config.json").read_text()).get("torch_dtype")
    except (OSError, json.JSONDecodeError):
        stored = None
    return DTYPES.get(stored or "bfloat16", torch.bfloat16)


def configure_cpu(threads: int | None) -> None:
    """Thread count for torch, and denormal floats flushed to zero.

    Attention probabilities of far-away tokens reach the denormal range, where x86 arithmetic
    slows down many times over; flushing them changes results by less than 1e-38.
    """
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def use_attention_kernel(model: DeepseekV2) -> bool:
    """Absorbed one-token decode steps of ``model`` attend through the C++ kernel (``dsv2cli/kernels``), built once per machine.

    False (the BLAS path stays) when it cannot be built here or the model is not on the CPU.
    """
    if model.embed_tokens.weight.device.type != "cpu" or not kernels.load():
        return False
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.attention_kernel = True
    return True


def load_for_generation(
    spec: str | None,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
) -> LoadedModel:
    """Everything `dsv2 generate` needs before the first prompt."""
    configure_cpu(threads)
    name, directory = resolve_checkpoint(spec)
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device, directory)
    model = fuse_projections(load_checkpoint(directory, torch_dtype, torch_device))
    return LoadedModel(name, directory, model, TextTokenizer.from_directory(directory), torch_device, torch_dtype)
