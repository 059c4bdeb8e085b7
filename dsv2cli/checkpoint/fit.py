"""Will it fit? The memory a load needs, read from the files' headers, against what this machine has.

Every command that loads weights asks :func:`check_load` first, so a model that does not fit is
refused with one line (needed vs available, and how to make it fit) instead of being killed by the
kernel halfway through. Nothing is read but headers.

A load needs three kinds of memory:

* **copied**: tensors the loader allocates: a dtype or device change, experts stacked from a HF
  checkpoint, projections fused for inference (``model/fusion.py``). These must fit, or the process dies.
* **mapped**: tensors of a native checkpoint used as they are on disk (``mmap``). They live in the page
  cache: the kernel can drop them under pressure and read them again, so they never get the process
  killed, but when they do not fit beside everything else every step reads weights from disk.
* **working**: the latent cache, activations and the runtime's slack (:func:`working_bytes`).

What this machine has is ``machine.py``'s :func:`available_memory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv2cli.checkpoint.files import ST_TO_TORCH, TORCH_TO_ST, find_problems
from dsv2cli.checkpoint.hf_keys import expert_slice, native_name
from dsv2cli.checkpoint.hf_keys import runtime_dtype as hf_runtime_dtype
from dsv2cli.checkpoint.machine import Available, address_space_limited, available_memory
from dsv2cli.checkpoint.native import expected_tensors, is_native, read_manifest
from dsv2cli.checkpoint.native import runtime_dtype as native_runtime_dtype
from dsv2cli.checkpoint.share import Share
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import DSV2Error
from dsv2cli.model.dtypes import DTYPES

GB = 10**9
RUNTIME_SLACK = 256 << 20  # allocator slack, the tokenizer, temporaries of one layer
DEFAULT_CONTEXT = 4096  # tokens of one sequence a load reserves a cache for when the request is not known yet
# Linears whose weights fuse_projections stacks into one new tensor at load time (a copy, even when mapped).
_FUSED = (".self_attn.q_proj.", ".self_attn.q_a_proj.", ".self_attn.kv_a_proj_with_mqa.", "mlp.gate_proj.", "mlp.up_proj.")


class InsufficientMemoryError(DSV2Error):
    """What was asked for needs more memory than this machine (or process, or device) has."""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a load needs: ``copied`` (allocated), ``mapped`` (used from the page cache), ``working``."""

    copied: int
    mapped: int
    working: int = 0

    @property
    def allocated(self) -> int:
        """What must fit for the process to live: copies and working memory."""
        return self.copied + self.working

    @property
    def total(self) -> int:
        return self.copied + self.mapped + self.working

    def with_working(self, working: int) -> MemoryNeed:
        return MemoryNeed(self.copied, self.mapped, working)


def gb(n: float) -> str:
    """31419784192 -> '31.4 GB'; below 1 GB in MB."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 10**6:.0f} MB"


# ---- what a load needs -----------------------------------------------------------------------------------------


def _local_share(name: str, shape: tuple[int, ...], plan: Share | None) -> tuple[int, bool]:
    """Elements of ``name`` one rank holds (``plan.split_for``; a scale follows its weight's rows), and whether they
    are one contiguous block of the stored tensor (whole, or a slice of its first dimension), which the loaders map."""
    split = None if plan is None else plan.split_for(name)
    if split is None:
        return math.prod(shape), True
    return math.prod(shape) // shape[split.dim] * split.size, split.dim == 0


def _fused(name: str) -> bool:
    return ".experts." not in name and any(part in name for part in _FUSED)


@dataclass(frozen=True)
class StoredWeights:
    """A checkpoint's tensors as its headers describe them: ``name -> (safetensors dtype, shape)``.

    Names are as stored (HF names for a HF checkpoint, dsv2 names for a native one); read once by
    :func:`stored_weights` and passed to every estimate, so a load reads its headers once more, not five times.
    """

    directory: Path
    config: ModelConfig
    native: bool
    quantization: str | None
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    declared: torch.dtype | None = None  # a native manifest's dtype
    files: tuple[Path, ...] = ()  # the safetensors files a load reads

    @property
    def dtype(self) -> torch.dtype | None:
        """The float dtype holding most of the bytes (the manifest's for a native checkpoint)."""
        if self.declared is not None:
            return self.declared
        by_dtype: dict[torch.dtype, int] = {}
        for st_dtype, shape in self.tensors.values():
            dtype = ST_TO_TORCH.get(st_dtype)
            if dtype is not None and dtype.is_floating_point:
                by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(shape) * dtype.itemsize
        return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None


def stored_weights(directory: Path, config: ModelConfig | None = None) -> StoredWeights:
    """Read the headers of ``directory`` (HF or native). Bad files are the loader's to report: what cannot be read is left out."""
    directory = Path(directory)
    config = config or load_config(directory)
    if is_native(directory):
        manifest = read_manifest(directory)
        tensors = {
            name: (str(entry.get("dtype")), tuple(entry.get("shape", ())))
            for name, entry in manifest.tensors.items()
            if entry.get("dtype") in ST_TO_TORCH
        }
        files = tuple(directory / f for f in sorted({str(e.get("file")) for e in manifest.tensors.values()}))
        return StoredWeights(directory, config, True, manifest.quantization, tensors, DTYPES[manifest.dtype], files)
    found, _ = find_problems(directory, config)
    tensors = {name: (i.dtype, i.shape) for name, i in found.tensors.items()}
    return StoredWeights(directory, config, False, None, tensors, None, tuple(found.files))


def load_need(
    weights: StoredWeights,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    plan: Share | None = None,
) -> MemoryNeed:
    """Memory of loading ``weights`` in ``dtype`` on ``device`` the way the loaders do; ``plan``: one rank's share.

    ``dtype=None`` is the loaders' own default (float32 for HF, the stored dtype for native). A tensor is
    mapped when it keeps its stored dtype on the CPU, whole and not fused (safetensors maps what it
    returns); else it is copied in the dtype the loader gives it (``native.runtime_dtype``,
    ``hf_keys.runtime_dtype``), and HF experts are always stacked into new tensors.
    """
    on_cpu = torch.device(device).type == "cpu"
    config = weights.config
    activation = dtype or (weights.dtype if weights.native else torch.float32) or torch.float32
    first, stop = plan.experts if plan is not None else (0, config.n_routed_experts or 0)
    copied = mapped = 0
    for name, (st_dtype, shape) in weights.tensors.items():
        have = ST_TO_TORCH.get(st_dtype)
        if have is None:
            continue
        expert = None if weights.native else expert_slice(name)
        if expert is not None:
            copied += math.prod(shape) * activation.itemsize if first <= expert.expert < stop else 0
            continue
        target = name if weights.native else native_name(name)
        if weights.native:
            want = native_runtime_dtype(target, have, dtype, activation, weights.quantization is not None)
        else:
            want = hf_runtime_dtype(target, activation)
        n, contiguous = _local_share(target, shape, plan)
        if want == have and on_cpu and not _fused(target) and contiguous:
            mapped += n * have.itemsize
        else:
            copied += n * want.itemsize
    return MemoryNeed(copied, mapped)


def native_weights(config: ModelConfig, quantization: str | None = None, stored: torch.dtype = torch.bfloat16) -> StoredWeights:
    """The tensors a native checkpoint of ``config`` would hold (``dsv2 convert`` output), without files."""
    st_dtype = TORCH_TO_ST[stored]
    tensors = {name: (required or st_dtype, shape) for name, (shape, required) in expected_tensors(config, quantization).items()}
    return StoredWeights(Path(), config, True, quantization, tensors, stored)


def int8_need(config: ModelConfig, dtype: torch.dtype = torch.float32, plan: Share | None = None) -> MemoryNeed:
    """Memory of an int8 native copy of ``config`` (what ``dsv2 convert --quantize int8`` writes), loaded in ``dtype``."""
    return load_need(native_weights(config, "int8"), dtype, "cpu", plan)


# ---- working memory ----------------------------------------------------------------------------------------------


def working_bytes(
    config: ModelConfig,
    dtype: torch.dtype,
    rows: int = 1,
    tokens: int = 0,
    capacity: int = 0,
    slack: int = RUNTIME_SLACK,
) -> int:
    """Cache and activations of one forward of ``rows x tokens`` new tokens over ``capacity`` cached ones.

    latent cache ``rows x capacity x layers x (kv_lora_rank + qk_rope_head_dim)`` values; activations of
    one layer at a time (the widest MLP, the heads' queries, keys and values, and the attention scores
    ``rows x heads x tokens x capacity`` in float32), plus ``slack`` (counted once per process: a check
    made after loading, which reserved it, passes 0).
    """
    size = dtype.itemsize
    cache = rows * capacity * config.num_hidden_layers * config.kv_cache_elements_per_token_per_layer * size
    heads = config.num_attention_heads
    per_token = 4 * (
        8 * config.hidden_size
        + 3 * max(config.intermediate_size, config.shared_intermediate_size or 0)
        + 3 * heads * max(config.qk_head_dim, config.v_head_dim, config.kv_lora_rank)
        + 2 * (config.n_routed_experts or 0)
    )
    scores = 2 * rows * heads * tokens * max(tokens, capacity) * 4
    return cache + rows * tokens * per_token + scores + slack


def default_working(config: ModelConfig, dtype: torch.dtype) -> int:
    """What a load reserves beside its weights: a :data:`DEFAULT_CONTEXT`-token cache of one sequence and the slack."""
    return working_bytes(config, dtype, capacity=DEFAULT_CONTEXT)


# ---- the check ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """A load's need against what is available, and whether its mapped weights fit in the page cache too."""

    need: MemoryNeed
    available: Available

    @property
    def fits(self) -> bool:
        counted = self.need.total if address_space_limited() else self.need.allocated
        return counted <= self.available.bytes

    @property
    def mapped_fits(self) -> bool:
        return self.need.total <= self.available.bytes


def fit_of(need: MemoryNeed, device: torch.device | str = "cpu") -> Fit:
    return Fit(need, available_memory(device))


def check_load(
    directory: Path | StoredWeights,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    plan: Share | None = None,
    working: int | None = None,
) -> Fit:
    """Raise :class:`InsufficientMemoryError` unless loading ``directory`` fits; returns the fit otherwise.

    ``working`` defaults to :func:`default_working`. Mapped
    weights that do not fit beside the rest are allowed (the page cache reads them again), and the
    returned :class:`Fit` says so (``mapped_fits``) for the caller to warn about.
    """
    weights = directory if isinstance(directory, StoredWeights) else stored_weights(Path(directory))
    config = weights.config
    activation = dtype or weights.dtype or torch.float32
    need = load_need(weights, dtype, device, plan)
    need = need.with_working(working if working is not None else default_working(config, activation))
    fit = fit_of(need, device)
    if fit.fits:
        return fit
    subject = f"{weights.directory.name} in {str(activation).removeprefix('torch.')}"
    if plan is not None:
        subject += f" (rank {plan.rank} of {plan.world_size})"
    raise _refusal(fit, subject, fix_hint(weights, dtype, device, fit.available, plan))


def require(need: MemoryNeed, subject: str, hint: str, device: torch.device | str = "cpu") -> Fit:
    """Raise :class:`InsufficientMemoryError` (``subject needs ...; ... available``) unless ``need`` fits on ``device``."""
    fit = fit_of(need, device)
    if not fit.fits:
        raise _refusal(fit, subject, hint)
    return fit


def _refusal(fit: Fit, subject: str, hint: str) -> InsufficientMemoryError:
    return InsufficientMemoryError(
        f"{subject} needs {describe(fit.need)}; {gb(fit.available.bytes)} available ({fit.available.source})", hint=hint
    )


def describe(need: MemoryNeed) -> str:
    """'29.7 GB: 29.3 GB of weights copied into memory + 396 MB of cache and working memory (+ 2.1 GB mapped from disk)'.

    Parts that are zero are left out; a need of one part is its size alone.
    """
    limited = address_space_limited()
    parts = [
        f"{gb(n)} of {what}"
        for n, what in ((need.copied, "weights copied into memory"), (need.working, "cache and working memory"))
        if n
    ]
    if need.mapped and limited:
        parts.append(f"{gb(need.mapped)} of weights mapped from disk")
    text = gb(need.total if limited else need.allocated)
    if len(parts) > 1:
        text += ": " + " + ".join(parts)
    if need.mapped and not limited:
        text += f" (+ {gb(need.mapped)} of weights mapped from disk)"
    return text


def fix_hint(
    weights: StoredWeights,
    dtype: torch.dtype | None,
    device: torch.device | str,
    available: Available,
    plan: Share | None = None,
) -> str:
    """How to make it fit, each with what it would need: the stored dtype, an int8 copy, more processes."""
    options = []
    config, stored = weights.config, weights.dtype
    if dtype == torch.float32 and stored is not None and stored != torch.float32:
        smaller = load_need(weights, stored, device, plan).with_working(default_working(config, stored))
        if Fit(smaller, available).fits:
            options.append(f"`dtype={str(stored).removeprefix('torch.')}` ({gb(smaller.allocated)})")
    if weights.quantization is None:
        int8 = int8_need(config, torch.float32, plan).with_working(default_working(config, torch.float32))
        per_rank = " per rank" if plan is not None else ""
        directory = weights.directory
        if Fit(int8, available).fits:
            options.append(
                f"an int8 copy ({gb(int8.total)}{per_rank}): dsv2 convert {directory} {directory}-int8 --quantize int8"
            )
        else:
            options.append(f"an int8 copy would need {gb(int8.total)}{per_rank}, more than there is here")
    world = plan.world_size if plan is not None else 1
    options.append(f"more memory, or more processes (torchrun --nproc-per-node {2 * world}, or across machines)")
    return "; or ".join(options)
