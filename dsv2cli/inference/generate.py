"""What `dsv2 generate` does with a loaded model: the user's settings, prompts in batches, one record of the run.

:class:`GenerateSettings` holds what was asked (checked before the model loads) and turns into
:class:`GenerationOptions` once the checkpoint's own sampling defaults are known; :func:`generate_batches`
runs the prompts ``batch_size`` at a time and returns a :class:`GenerateRun`, whose ``to_json()`` is the
``--format json`` document. Callbacks let a caller stream tokens and results while it runs.

The kernel policy is here too: :func:`choose_forward` (the attention kernel: as asked, else wherever it
builds) and :func:`choose_decoder` (compiled decode steps: as asked, else wherever they can run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from dsv2cli.errors import InputError
from dsv2cli.inference.compiled import CompiledDecoder, cannot_compile
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest, GenerationResult, TokenEvent
from dsv2cli.inference.sampling import SamplingParams
from dsv2cli.inference.session import LoadedModel, with_attention_kernel
from dsv2cli.model import ForwardOptions

# A context the CLI shows a status line in while something slow happens (loading kernels, compiling).
Status = Callable[[], AbstractContextManager[object]]


def default_sampling(
    generation_defaults: Mapping[str, Any],
    temperature: float | None = None,
    top_k: int = 0,
    top_p: float | None = None,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
) -> SamplingParams:
    """The sampling asked for; ``temperature`` / ``top_p`` left None come from the checkpoint's generation_config.json
    when it samples (``do_sample``), else greedy decoding with top-p off. ``repetition_penalty`` left None comes
    from generation_config.json whether or not it samples (as transformers applies it), else 1 (off)."""
    sampled = bool(generation_defaults.get("do_sample"))
    if temperature is None:
        temperature = float(generation_defaults.get("temperature", 1.0)) if sampled else 0.0
    if top_p is None:
        top_p = float(generation_defaults.get("top_p", 1.0)) if sampled else 1.0
    if repetition_penalty is None:
        repetition_penalty = float(generation_defaults.get("repetition_penalty", 1.0))
    return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)


@dataclass(frozen=True)
class GenerateSettings:
    """What the user asked for; ``max_new_tokens``, ``batch_size`` and ``seed`` are checked here, before any model loads."""

    max_new_tokens: int = 128
    temperature: float | None = None  # None: the checkpoint's generation_config, else greedy
    top_k: int = 0
    top_p: float | None = None  # None: the checkpoint's generation_config, else off
    min_p: float = 0.0
    repetition_penalty: float | None = None  # None: the checkpoint's generation_config, else off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    attention: str = "absorbed"
    cache_dtype: torch.dtype | None = None  # None: the model's dtype
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"`max_new_tokens` must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise InputError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.seed is not None and not 0 <= self.seed < 1 << 63:
            raise InputError(f"`seed` must be between 0 and 2**63 - 1, got {self.seed}")

    def options(self, loaded: LoadedModel, seed: int | None, forward: ForwardOptions | None = None) -> GenerationOptions:
        """The engine's options for ``loaded``; ``seed`` is the one every process uses (``self.seed`` in one process)."""
        defaults = loaded.tokenizer.special.generation_defaults if loaded.tokenizer else {}
        sampling = default_sampling(defaults, self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, seed)
        return GenerationOptions(
            max_new_tokens=self.max_new_tokens,
            sampling=sampling,
            eos_token_ids=loaded.eos_token_ids,
            ignore_eos=self.ignore_eos,
            stop=self.stop,
            attention=self.attention,
            cache_dtype=self.cache_dtype,
            forward=loaded.options if forward is None else forward,
        )


@dataclass
class GenerateRun:
    """Every prompt's result and what the run held: the ``--format json`` document and the summary line's numbers."""

    model: str
    results: list[GenerationResult]
    cache_bytes: int  # the largest latent cache of a batch
    cache_dtype: str
    dtype: str
    device: str

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    @property
    def decode_s(self) -> float:
        """The slowest batch's decode time (batches run one after another; rows of a batch together)."""
        return max((r.timings.decode_s for r in self.results), default=0.0)

    @property
    def compile_s(self) -> float:
        return sum(r.timings.compile_s for r in self.results)

    @property
    def finish_reasons(self) -> list[str]:
        return sorted({r.finish_reason or "?" for r in self.results})

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "results": [r.to_json() for r in self.results],
            "cache": {"scheme": "mla-latent", "bytes": self.cache_bytes, "dtype": self.cache_dtype},
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def generate_batches(
    loaded: LoadedModel,
    requests: list[GenerationRequest],
    options: GenerationOptions,
    batch_size: int,
    decoder: CompiledDecoder | None = None,
    on_token: Callable[[TokenEvent], None] | None = None,
    on_results: Callable[[list[GenerationResult]], None] | None = None,
) -> GenerateRun:
    """Generate for every request, ``batch_size`` prompts decoding together; ``on_token`` sees each token as it
    comes, ``on_results`` each batch's results as it ends."""
    if batch_size < 1:
        raise InputError(f"`batch_size` must be at least 1, got {batch_size}")
    results: list[GenerationResult] = []
    cache_bytes = 0
    for start in range(0, len(requests), batch_size):
        generation = Generation(loaded.model, requests[start : start + batch_size], options, loaded.tokenizer, decoder)
        for event in generation:
            if on_token is not None:
                on_token(event)
        cache_bytes = max(cache_bytes, generation.cache_bytes)
        results.extend(generation.results)
        if on_results is not None:
            on_results(generation.results)
    return GenerateRun(
        model=loaded.name,
        results=results,
        cache_bytes=cache_bytes,
        cache_dtype=dtype_name(options.cache_dtype or loaded.dtype),
        dtype=dtype_name(loaded.dtype),
        device=str(loaded.device),
    )


def choose_forward(
    loaded: LoadedModel, attention_kernel: bool | None, loading: Status = contextlib.nullcontext
) -> ForwardOptions:
    """``loaded``'s forward options, one-token steps attending through dsv2's C++ kernel as asked (None: wherever it
    builds; ``loading`` is entered while the kernels load, the first time on a machine a build of about 30 s).
    An explicit ``attention_kernel=True`` that cannot be honoured is an error; the default falls back to BLAS."""
    if attention_kernel is False:
        return with_attention_kernel(loaded.options, loaded.device, enabled=False)
    with loading():
        forward = with_attention_kernel(loaded.options, loaded.device)
    if forward.latent_attention is None and attention_kernel:
        reason = "it runs on CPU only" if loaded.device.type != "cpu" else forward.kernels.error
        raise InputError(f"`attention_kernel`: the kernel is not available here ({reason})", hint="drop `attention_kernel`")
    return forward


def choose_decoder(
    loaded: LoadedModel, compile: bool | None, forward: ForwardOptions, compiling: Status = contextlib.nullcontext
) -> tuple[CompiledDecoder | None, str | None]:
    """Compiled decode steps as asked (None: wherever they can run), and, when the default decodes eagerly, why.

    ``compiling`` is entered while a batch shape compiles (15-60 s the first time, seconds from the disk cache later).
    """
    if compile is False:
        return None, None
    if compile is None:
        reason = cannot_compile(loaded.model)
        if reason is not None:
            return None, reason
    return CompiledDecoder(loaded.model, forward, compiling=compiling), None
