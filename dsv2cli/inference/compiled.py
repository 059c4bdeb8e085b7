"""Decode steps through ``torch.compile``: the model's own forward with its blocks compiled.

:class:`CompiledDecoder` runs ``DeepseekV2.forward`` with ``static_shapes=True`` (the cache read and
written at tensor slots over its whole capacity, ``dsv2cli/model/cache.py``) and each block through
``torch.compile``. There is no second copy of the math: the compiled graphs are traced from the
modules' own forwards, and the kernels the modules choose per op (dsv2's int8 x int8 products, the
one-pass latent attention, ``dsv2cli/kernels``) are called from the graphs as they are eagerly. The
decoder's :class:`ForwardOptions` go to every step; being a frozen dataclass, they are constants of
the graphs (a decoder with other options compiles its own graphs).

Blocks are compiled one by one rather than as one graph of the whole model: the compiler traces a
block once and every block of the same kind (the dense first layers, the MoE ones) reuses its graph,
so compiling takes the same time for 27 layers as for 2. Between the graphs the few top-level
operations (embedding, rope tables, mask, head) run eagerly.

What it costs: compiling takes tens of seconds the first time (inductor keeps its kernels in its
on-disk cache, so later runs in new processes reuse them), and it needs a C++ compiler and dsv2's
kernels. Every step of a cache has the same shapes; a cache of another batch size, capacity or dtype
compiles again (capacities are rounded up to :data:`CAPACITY_STEP` so that similar lengths share
graphs). It serves CPU caches, rows with or without padding, and no routing hook (expert statistics
and token dropping observe routing eagerly).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch._dynamo import config as dynamo_config

from dsv2cli import kernels
from dsv2cli.errors import InputError
from dsv2cli.model import DeepseekV2, ForwardOptions
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.cache import LatentKVCache
from dsv2cli.model.fusion import FusedLinears
from dsv2cli.model.moe import MLP

# Capacities are rounded up to this many slots when the engine allocates a cache for compiled decoding,
# so that generations of similar lengths reuse one compiled graph.
CAPACITY_STEP = 256

# Graphs kept per block kind: each cache shape (batch size, capacity, dtype) is one.
_GRAPHS_PER_BLOCK = 64


def compiler_available() -> bool:
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def round_capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def cannot_compile(model: DeepseekV2) -> str | None:
    """Why decode steps of ``model`` cannot be compiled here, or None when they can."""
    if model.embed_tokens.weight.device.type != "cpu":
        return "compiled decode steps are implemented for CPU only"
    if not compiler_available():
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    handle = kernels.load()
    if not handle.available:
        return f"dsv2's C++ kernels do not build here ({handle.error})"
    return None


class CompiledDecoder:
    """Compiled one-token decode steps for ``model`` (which must not change while this is used)."""

    def __init__(
        self,
        model: DeepseekV2,
        options: ForwardOptions | None = None,
        compiling: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        """``options``: what every step may use (default: dsv2's kernels, the attention kernel included);
        ``compiling``: a context entered while a cache shape compiles (the CLI shows a status line in it)."""
        reason = cannot_compile(model)
        if reason is not None:
            raise InputError(f"cannot compile decode steps: {reason}", hint="decode eagerly (`compile=False`)")
        self.model = model
        self.options = ForwardOptions(kernels.load()) if options is None else options
        self.compiling = compiling
        options = {
            "cpp_wrapper": True,  # the graph runs from C++, without Python between its kernels
            "compile_threads": 1,  # a pool of compile workers costs more than it saves on a few cores
        }
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _GRAPHS_PER_BLOCK)
        # Each block's bound forward, not the module: a step then skips two nn.Module call wrappers per block.
        self.blocks = [torch.compile(block.forward, fullgraph=True, dynamic=False, options=options) for block in model.layers]
        self._compiled_shapes: set[tuple] = set()  # cache shapes and dtypes compiled for
        self._stacked = _stacked_modules(model)  # walking every module costs ~1-3 ms a step on V2-Lite's 27 layers

    def serves(self, cache: LatentKVCache, routing_hook: object = None) -> bool:
        """Whether the next step on ``cache`` can run compiled (else the caller decodes eagerly)."""
        return routing_hook is None and cache.entries.device.type == "cpu" and _stacks_current(self._stacked)

    def prepare(self, cache: LatentKVCache) -> float:
        """Compile for ``cache``'s shape and dtype now; returns the seconds it took (0 when already compiled).

        Compiling runs a step on token 0 at the next slot, which the first real step overwrites.
        """
        shape = (*cache.entries.shape, cache.entries.dtype)
        if shape in self._compiled_shapes:
            return 0.0
        start = time.perf_counter()
        with self.compiling(), torch.inference_mode():
            self._run(torch.zeros(cache.batch_size, 1, dtype=torch.long), cache)
        self._compiled_shapes.add(shape)
        return time.perf_counter() - start

    def step(self, tokens: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """tokens ``[B, 1]`` -> logits ``[B, 1, vocab]``; writes the next slot of ``cache`` and advances it.

        Steps skip dynamo's guard checks (~0.2 ms a block, 5 ms a step of V2-Lite's 27 blocks): only the
        guards that tell apart graphs compiled so far run. That is sound because every step of a prepared
        cache shape traces the same graph: static shapes read no Python state that changes between steps
        (``LatentKVCache.layer_views``), the options are constants and the model does not change. A shape
        not yet prepared is compiled first, under every guard.
        """
        self.prepare(cache)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            logits = self._run(tokens, cache)
        cache.advance(1)
        return logits

    def _run(self, tokens: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        cache.check_room(1)
        tokens = tokens.reshape(cache.batch_size, 1)
        return self.model(tokens, cache=cache, static_shapes=True, blocks=self.blocks, options=self.options)


def _stacked_modules(model: DeepseekV2) -> list[MultiHeadLatentAttention | MLP]:
    """The modules that may hold fused stacks (``fuse_projections``): found once, checked every step."""
    return [module for module in model.modules() if isinstance(module, (MultiHeadLatentAttention, MLP))]


def _stacks_current(modules: list[MultiHeadLatentAttention | MLP]) -> bool:
    """The compiled blocks use the fused stacks without checking them each step: they must still be current."""
    for module in modules:
        stack: FusedLinears | None = module.fused_input if isinstance(module, MultiHeadLatentAttention) else module.fused_gate_up
        if stack is not None and not stack.current():
            return False
    return True
