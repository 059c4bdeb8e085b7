"""Loading a model for generation: resolve MODEL, pick device/dtype/threads, load weights and tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from dsv2cli import kernels
from dsv2cli.checkpoint.fit import Fit, StoredWeights, check_load, default_working, fit_of, gb, load_need, stored_weights
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.readahead import ReadAhead, read_ahead
from dsv2cli.checkpoint.resolve import resolve_checkpoint
from dsv2cli.errors import InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2, ForwardOptions
from dsv2cli.model.dtypes import DTYPES
from dsv2cli.model.int4 import absorb_int4, has_int4
from dsv2cli.model.quantized import absorb_int8, has_int8
from dsv2cli.model.transformer import fuse_projections

# Weight files are read ahead only when this much memory (or 5 % of what is available, if more) stays free beside them.
READ_AHEAD_SPARE = 10**9


@dataclass
class LoadedModel:
    name: str
    directory: Path
    model: DeepseekV2
    tokenizer: TextTokenizer | None
    device: torch.device
    dtype: torch.dtype
    options: ForwardOptions = ForwardOptions()  # what its forwards use (:func:`int8_options`)

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
        raise InputError("`device=cuda` was asked for but no CUDA device is available", hint="use `device=cpu`")
    return torch.device(name)


def choose_dtype(
    name: str,
    device: torch.device,
    weights: StoredWeights | Path,
    working: int | None = None,
) -> torch.dtype:
    """``auto``: on CPU float32 (fastest and exact there) when it fits in memory, else the stored dtype
    (a native checkpoint's files are then mapped, not copied); on CUDA the stored dtype."""
    if name != "auto":
        if name not in DTYPES:
            raise InputError(f"unknown dtype '{name}'", hint=f"choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if not isinstance(weights, StoredWeights):
        weights = stored_weights(weights)
    stored = weights.dtype or torch.bfloat16
    if device.type == "cpu" and stored != torch.float32:
        reserve = working if working is not None else default_working(weights.config, torch.float32)
        if fit_of(load_need(weights, torch.float32, device).with_working(reserve), device).fits:
            return torch.float32
    return stored


def configure_cpu(threads: int | None) -> None:
    """Thread count for torch, and denormal floats flushed to zero.

    Attention probabilities of far-away tokens reach the denormal range, where x86 arithmetic
    slows down many times over; flushing them changes results by less than 1e-38.
    """
    if threads is not None:
        if threads < 1:
            raise InputError(f"`threads` must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def int8_options(model: DeepseekV2) -> ForwardOptions:
    """The forward options of a loaded ``model``: an int8 or int4 model on CPU runs its products through dsv2's kernels
    (``dsv2cli/kernels``, built once per machine) where they build, and attends through them too; other models
    run torch's operators (:func:`with_attention_kernel` adds the attention kernel)."""
    if model.embed_tokens.weight.device.type != "cpu" or not (has_int8(model) or has_int4(model)):
        return ForwardOptions()
    return ForwardOptions(kernels.load())


def with_attention_kernel(options: ForwardOptions, device: torch.device, enabled: bool = True) -> ForwardOptions:
    """``options`` with one-token absorbed steps attending through dsv2's C++ kernel (``enabled``, on CPU, loading
    the kernels: built once per machine) or through BLAS (``enabled=False``); check ``.latent_attention`` for the outcome."""
    if not enabled:
        return replace(options, attention_kernel=False)
    if device.type != "cpu":
        return options
    return replace(options, kernels=kernels.load(), attention_kernel=True)


class LoadProgress(Protocol):
    """What a command shows while a model loads (``cli/common.py`` renders it)."""

    def warn(self, message: str) -> None: ...

    def reading(self, total_bytes: int) -> Callable[[int], None]:
        """Reading ``total_bytes`` of weight files ahead starts; returns the per-block callback."""
        ...

    def read(self, report: ReadAhead) -> None: ...


def read_weights_ahead(weights: StoredWeights, fit: Fit, progress: LoadProgress | None) -> ReadAhead | None:
    """Read the weight files into the page cache before the first step when they fit there with room to spare.

    When the mapped weights do not fit beside the rest, steps will read them from disk as they touch
    them; say so. Files that do not fit with :data:`READ_AHEAD_SPARE` to spare are not read ahead (the
    end of the read would push its beginning out again).
    """
    if fit.need.mapped and not fit.mapped_fits and progress is not None:
        progress.warn(
            f"the mapped weights ({gb(fit.need.mapped)}) do not fit in memory beside the rest "
            f"({gb(max(0, fit.available.bytes - fit.need.allocated))} free of {gb(fit.available.bytes)}): decode steps "
            "will read weights from disk and run slowly; an int8 copy (dsv2 convert --quantize int8) reads half the bytes"
        )
    files = [path for path in weights.files if path.is_file()]
    total = sum(path.stat().st_size for path in files)
    spare = max(READ_AHEAD_SPARE, fit.available.bytes // 20)
    if total > fit.available.bytes - fit.need.allocated - spare:
        return None
    on_bytes = progress.reading(total) if progress is not None else None
    report = read_ahead(files, on_bytes)
    if progress is not None:
        progress.read(report)
    return report


def load_for_generation(
    spec: str | None,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    working: int | None = None,
    progress: LoadProgress | None = None,
    read_weights: bool = True,
) -> LoadedModel:
    """Everything `dsv2 generate` needs before the first prompt.

    Checks that the model fits (``working`` bytes of cache and activations beside it; default: one
    sequence of 4096 tokens), reads the weight files ahead when they fit in the page cache (unless
    ``read_weights`` is False: pages are then faulted in as steps touch them), then loads.
    """
    configure_cpu(threads)
    name, directory = resolve_checkpoint(spec)
    torch_device = choose_device(device)
    weights = stored_weights(directory)
    torch_dtype = choose_dtype(dtype, torch_device, weights, working)
    fit = check_load(weights, torch_dtype, torch_device, working=working)
    if read_weights and torch_device.type == "cpu":  # the page cache is host memory; a GPU load reads each file once anyway
        read_weights_ahead(weights, fit, progress)
    model = fuse_projections(load_checkpoint(directory, torch_dtype, torch_device, checked=True))
    options = int8_options(model)
    absorb_int8(model, options.kernels)
    absorb_int4(model, options.kernels)
    return LoadedModel(name, directory, model, TextTokenizer.from_directory(directory), torch_device, torch_dtype, options)
