"""C++ kernels built on the user's machine: ``torch.ops.dsv2cli.latent_attention``, ``int8_matmul`` and ``int4_matmul``.

``latent_attention.cpp`` is absorbed MLA attention of one decode step over the latent cache in a
single pass (flash-decoding on CPU): each cached entry is read once, scored against all heads and
accumulated with an online softmax, instead of two BLAS calls that each stream (and pack) the
whole cache. ``int8_matmul.cpp`` is the int8 x int8 product of quantized rows with int8 weights, each
row through its own matrix of a stack (a layer's routed experts, an MLA layer's heads) picked by id;
``int4_matmul.cpp`` the same for group-wise int4 weights (int32 sums per group, as llama.cpp's Q4_0 x Q8_0).

:func:`load` compiles them with ``torch.utils.cpp_extension`` (ninja and a C++ compiler,
``-march=native``, the vector flags inductor picks for this CPU) into torch's extension cache the
first time (about 30 s on 2 cores) and loads them from there afterwards. It returns a :class:`Kernels`
handle, the same one for every call in a process: the operators, or the reason they are missing. The
model never loads them itself; its callers pass the handle in its forward options
(``dsv2cli/model/options.py``), so a process can run with and without them side by side.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCES = [
    Path(__file__).with_name(name) for name in ("latent_attention.cpp", "int8_matmul.cpp", "int4_matmul.cpp", "float_matmul.cpp")
]
_HEADERS = [Path(__file__).with_name(name) for name in ("stacked_rows.h", "lane_sums.h")]  # included by the sources
_NAME = "dsv2cli_kernels"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    """dsv2's C++ operators as this process has them: available, or not with the reason (``error``).

    Frozen and compared by value, so a compiled graph that reads a handle treats it as a constant.
    """

    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None

    def latent_attention_supported(self, query: torch.Tensor, entries: torch.Tensor, rank: int) -> bool:
        """Whether the kernel serves query ``[rows, C + R]`` over entries ``[T, C + R]`` with latent rank ``C``."""
        return (
            self.available
            and query.device.type == "cpu"
            and entries.dtype in (torch.float32, torch.bfloat16)
            and entries.stride(-1) == 1
            and rank % 16 == 0
            and entries.shape[-1] % 2 == 0
        )

    def latent_attention(
        self, query: torch.Tensor, entries: torch.Tensor, filled: torch.Tensor, rank: int, scale: float
    ) -> torch.Tensor:
        """query ``[rows, C + R]`` over entries ``[T, C + R]`` -> ``[rows, C]`` float32.

        ``filled`` (int64): ``[end]`` attends to entries ``0..end-1``, ``[first, end]`` to ``first..end-1``:
        ``softmax(scale * query @ entries[first:end]^T) @ entries[first:end, :C]`` with float32 products and sums
        (a bfloat16 cache widened as it is read).
        """
        return torch.ops.dsv2cli.latent_attention(query.to(torch.float32), entries, filled, rank, scale)

    def int8_matmul_supported(self, weight: torch.Tensor) -> bool:
        """Whether the kernel takes ``weight [..., O, I]``: int8 on CPU, rows contiguous."""
        return self.available and weight.device.type == "cpu" and weight.dtype == torch.int8 and weight.stride(-1) == 1

    def int8_matmul(
        self, x: torch.Tensor, step: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Quantized rows ``x [R, I]`` int8 with steps ``[R, 1]`` against ``weight [E, O, I]`` int8, ``scale [E, O]`` -> ``[R, O]`` float32.

        Row ``r`` goes through matrix ``ids[r]`` (``[R]`` int64; -1: a zero row); without ``ids`` every row
        through ``weight[0]``. ``step[r] * scale[e, o] * sum_i x[r, i] * weight[e, o, i]`` with exact int32
        sums (the same numbers as ``torch._int_mm``); each weight is read once for all the rows that use it.
        """
        empty = torch.empty(0, dtype=torch.long, device=x.device)
        return torch.ops.dsv2cli.int8_matmul(x, step.reshape(-1), weight, scale.float(), empty if ids is None else ids)

    def int4_matmul_supported(self, weight: torch.Tensor) -> bool:
        """Whether the int4 kernel takes ``weight [..., O, I / 2]``: packed uint8 on CPU, rows contiguous."""
        return self.available and weight.device.type == "cpu" and weight.dtype == torch.uint8 and weight.stride(-1) == 1

    def int4_matmul(
        self, x: torch.Tensor, step: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Quantized rows ``x [R, I]`` int8 with steps ``[R, 1]`` against packed int4 ``weight [E, O, I / 2]`` uint8 with
        ``scale [E, O, G]`` float16 (``dsv2cli/model/int4.py``) -> ``[R, O]`` float32.

        ``step[r] * sum_g scale[e, o, g] * sum_{i in g} x[r, i] * (level[e, o, i] - 8)``, int32 sums per group;
        ``ids`` as in :meth:`int8_matmul`.
        """
        empty = torch.empty(0, dtype=torch.long, device=x.device)
        return torch.ops.dsv2cli.int4_matmul(x, step.reshape(-1), weight, scale.half(), empty if ids is None else ids)

    def float_matmul_supported(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the float32 kernel serves ``x [R, I] @ weight [O, I]^T``: on CPU, float32, the weight's rows contiguous."""
        return (
            self.available
            and x.device.type == "cpu"
            and x.dim() == 2
            and x.dtype == weight.dtype == torch.float32
            and weight.dim() == 2
            and weight.stride(-1) == 1
        )

    def float_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x [R, I] @ weight [O, I]^T`` -> ``[R, O]`` float32 with float32 sums, threads splitting the rows of ``weight``;
        a row's result does not depend on the other rows of ``x``."""
        return torch.ops.dsv2cli.float_matmul(x, weight)


# The handle of a forward that was given no kernels: torch's own operators only.
NO_KERNELS = Kernels(error="not loaded (dsv2cli.kernels.load() gives the kernels)")


@functools.cache
def load() -> Kernels:
    """Build (once per machine and source) and load the kernels; the handle says why not when they cannot be.

    Once per process: later calls return the same handle (a failure is logged once and not retried).
    Only CPUs with AVX2 or AVX-512 (as inductor detects them) are served; elsewhere, or without a
    compiler or ninja, the callers keep torch's operators.
    """
    try:
        _build_and_load()
    except Exception as error:  # a missing compiler or ninja, an unsupported CPU, a failed build
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        log.warning("dsv2cli kernels unavailable, decoding with BLAS attention: %s", reason)
        return Kernels(error=reason)
    return Kernels()


# A build takes seconds; a lock file older than this was left by a build that was killed.
STALE_LOCK_S = 600


def _clear_stale_lock(build_directory: Path) -> None:
    """Remove the lock file of a killed build: torch's extension builder would wait for it forever."""
    lock = build_directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f s ago by an interrupted build of the dsv2cli kernels", lock, age)
        lock.unlink(missing_ok=True)


def _ninja_directory() -> str | None:
    """The directory of the ninja wheel's binary when no ``ninja`` is on PATH (this environment's bin directory is
    not on PATH when its scripts run without activating it), else None."""
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja  # the optional wheel; only its path is read
    except ImportError:
        return None
    return ninja.BIN_DIR


@contextlib.contextmanager
def _path_with(directory: str | None) -> Iterator[None]:
    """PATH with ``directory`` in front for the duration of the build, restored after.

    torch's extension builder runs ``ninja`` from PATH (``is_ninja_available`` and its build both call it
    through ``subprocess`` with this process's environment) and takes no path to it.
    """
    if directory is None:
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = directory + os.pathsep + (before or "")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _build_and_load() -> None:
    # Imported here: inductor and the extension builder take seconds to import, and only a build needs them.
    from torch._inductor import cpu_vec_isa
    from torch.utils import cpp_extension

    isa = cpu_vec_isa.pick_vec_isa()
    if not isinstance(isa, (cpu_vec_isa.VecAVX2, cpu_vec_isa.VecAVX512)):
        raise RuntimeError("the kernels are written for x86 CPUs with AVX2 or AVX-512")
    _clear_stale_lock(Path(cpp_extension._get_build_directory(_NAME, verbose=False)))
    flags = ["-O3", "-march=native", "-fopenmp", *(f"-D{macro}" for macro in isa.build_macro()), *isa.build_arch_flags().split()]
    # torch rebuilds when the sources or the flags change; the headers' digest in a flag makes their changes count too
    headers = hashlib.sha256(b"".join(header.read_bytes() for header in _HEADERS)).hexdigest()[:16]
    flags.append(f"-DDSV2_HEADERS_DIGEST={headers}")
    with _path_with(_ninja_directory()):
        cpp_extension.load(
            _NAME, [str(source) for source in _SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False
        )

    @torch.library.register_fake("dsv2cli::latent_attention")
    def _(query, entries, filled, rank, scale):  # shapes for torch.compile
        return query.new_empty(query.shape[0], rank, dtype=torch.float32)

    @torch.library.register_fake("dsv2cli::int8_matmul")
    def _(x, step, weight, scale, ids):
        return x.new_empty(x.shape[0], weight.shape[1], dtype=torch.float32)

    @torch.library.register_fake("dsv2cli::int4_matmul")
    def _(x, step, weight, scale, ids):
        return x.new_empty(x.shape[0], weight.shape[1], dtype=torch.float32)

    @torch.library.register_fake("dsv2cli::float_matmul")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)
