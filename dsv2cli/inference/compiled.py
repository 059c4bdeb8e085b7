"""Decode steps through ``torch.compile``: one graph per cache shape instead of ~450 eager operations.

:class:`CompiledDecoder` wraps :func:`dsv2cli.model.decode.decode_step` for one model. Inductor
generates C++ kernels for the whole step: each weight product is a vectorized reduction that
streams the weight (float or int8) with rope, SwiGLU and scales fused around it (an activation that
several operations read, such as a normed hidden state, is stored once rather than recomputed in each), and
the attention over the cache is one call of the one-pass C++ kernel (``dsv2cli/kernels``; two BLAS
calls where it cannot be built); the C++ wrapper (``cpp_wrapper``) runs the graph without Python
between kernels.

What it costs: compiling takes tens of seconds the first time (inductor keeps its kernels in
its on-disk cache, so later runs in new processes reuse them) and it needs a C++ compiler. Every
step has the same shapes: the cache's capacity is fixed, and the slot is a tensor (the kernel
attends over the filled slots; the BLAS path over the whole capacity, masked).
It serves one row without padding, on CPU, with no routing hook; everything else decodes eagerly.
"""

from __future__ import annotations

import itertools
import re
import shutil
import time
import types
from collections.abc import Callable

import torch

from dsv2cli import kernels
from dsv2cli.errors import InputError
from dsv2cli.model import DeepseekV2
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.cache import LatentKVCache
from dsv2cli.model.decode import absorbed_weights, decode_step
from dsv2cli.model.fusion import FusedLinears
from dsv2cli.model.moe import MLP
from dsv2cli.model.quantized import Int8Linear

# Capacities are rounded up to this many slots when the engine allocates a cache for compiled decoding,
# so that generations of similar lengths reuse one compiled graph.
CAPACITY_STEP = 256


def compiler_available() -> bool:
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def round_capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


class CompiledDecoder:
    """Compiled one-token decode steps for ``model`` (which must not change while this is used)."""

    def __init__(self, model: DeepseekV2, attention_kernel: bool = True) -> None:
        if model.embed_tokens.weight.device.type != "cpu":
            raise InputError("--compile is implemented for CPU decoding only", hint="drop --compile or use --device cpu")
        if not compiler_available():
            raise InputError("--compile needs a C++ compiler (c++, g++ or clang++) on PATH", hint="install one or drop --compile")
        self.model = model
        # An int8 model's absorbed products read kv_b_proj in int8 too (a quarter of its float bytes).
        self.absorbed = absorbed_weights(model, quantize=any(isinstance(m, Int8Linear) for m in model.modules()))
        # The graph's token and slot inputs: refilled each step, so every call passes the same tensors
        # (a view with other strides would make the compiler guard fail and compile again).
        self._token = torch.zeros(1, 1, dtype=torch.long)
        self._slot = torch.zeros(1, dtype=torch.long)
        self._compiled_shapes: set[tuple] = set()  # cache shapes and dtypes compiled for
        options = {
            "cpp_wrapper": True,
            "compile_threads": 1,
            "guard_filter_fn": _guards_on_step_inputs,
            # Store every activation that more than one operation reads (a normed hidden state, say) instead of
            # recomputing it inside each weight reduction that reads it: recomputed, an RMSNorm's scalar
            # square root and division ran once per 16 weights (inductor compiles with -fmath-errno, so the
            # compiler cannot hoist them), ~17 % of an int8 step of the benchmark model (docs/performance.md).
            "realize_reads_threshold": 1,
        }
        # Attention through the one-pass C++ kernel when it builds here (dsv2cli/kernels), else two BLAS calls.
        self.attention_kernel = attention_kernel and kernels.load()
        step = _own_step(model, self.absorbed, self.attention_kernel)
        self._step = torch.compile(step, fullgraph=True, dynamic=False, options=options)

    def serves(self, cache: LatentKVCache, routing_hook: object = None) -> bool:
        """Whether the next step on ``cache`` can run compiled (else the caller decodes eagerly)."""
        return (
            routing_hook is None
            and cache.batch_size == 1
            and not cache.has_padding
            and cache.entries.device.type == "cpu"
            and _stacks_current(self.model)
        )

    def prepare(self, cache: LatentKVCache) -> float:
        """Compile for ``cache``'s shape and dtype now; returns the seconds it took (0 when already compiled).

        Compiling runs a step on token 0 at the next slot, which the first real step overwrites.
        """
        shape = (*cache.entries.shape, cache.entries.dtype)
        if shape in self._compiled_shapes:
            return 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            self._run(torch.zeros(1, 1, dtype=torch.long), cache)
        self._compiled_shapes.add(shape)
        return time.perf_counter() - start

    def step(self, token: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """token ``[1, 1]`` -> logits ``[1, 1, vocab]``; writes the next slot of ``cache`` and advances it."""
        logits = self._run(token, cache)
        cache.advance(1)
        return logits

    def _run(self, token: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        cache.check_room(1)
        self._token.copy_(token.reshape(1, 1))
        self._slot.fill_(cache.length)
        return self._step(self._token, self._slot, cache.entries)


# The arguments of the step function: the only values its compiled graphs are guarded on.
_STEP_INPUTS = ("token", "slot", "entries")
_decoders = itertools.count()


def _own_step(
    model: DeepseekV2, absorbed: list, attention_kernel: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``decode_step`` bound to this model, as a function with a code object of its own.

    The compiler keeps its graphs (and their guards) per code object; with one per decoder, a
    decoder's graphs are never looked up for another model, so they need no guards on the model.
    """

    def step(token: torch.Tensor, slot: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        return decode_step(model, absorbed, token, slot, entries, attention_kernel)

    code = step.__code__.replace(co_name=f"decode_step_{next(_decoders)}")
    return types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)


def _guards_on_step_inputs(guards: list) -> list[bool]:
    """Keep the guards on the step's inputs and on global state (grad mode and the like); drop the rest.

    Without this, every step checks ~1500 guards on the model's modules and weights (~0.25 ms, 7 %
    of an int8 step of the benchmark model) that cannot fail: the model must not change while its
    decoder is used (the fused stacks, the one thing that can, are checked by :meth:`CompiledDecoder.serves`).
    """
    return [guard.name == "" or _root_name(guard.name) in _STEP_INPUTS for guard in guards]


def _root_name(source: str) -> str:
    """The local a guard's source starts from: ``entries`` for ``entries`` or ``L['entries'].shape``-style names."""
    match = re.match(r"(?:L\[')?(\w+)", source)
    return match.group(1) if match else ""


def _stacks_current(model: DeepseekV2) -> bool:
    """The compiled step uses the fused stacks (``fuse_projections``) without checking them each step."""
    for module in model.modules():
        stack: FusedLinears | None = None
        if isinstance(module, MultiHeadLatentAttention):
            stack = module.fused_input
        elif isinstance(module, MLP):
            stack = module.fused_gate_up
        if stack is not None and not stack.current():
            return False
    return True
