"""The process group of a ``torchrun`` launch, the collectives the sharded model uses, and rank agreement.

torchrun starts one process per rank and describes the run in environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`start` reads them, picks the
device (``cuda:LOCAL_RANK`` on GPUs, else the CPU) and the backend (NCCL on CUDA, Gloo on CPU; ``--backend``
or ``DSV2_BACKEND`` override), and opens the group with a timeout so that a rank that stops answering
ends the run instead of hanging it (``DSV2_DIST_TIMEOUT`` seconds, default 1800: loading a large checkpoint
can keep the fastest rank waiting for the slowest one for minutes).

Failures are made collective where the program can afford it: :func:`agree` tells every rank whether any
rank failed (used after loading), :func:`from_main_rank` hands rank 0's value or error to all ranks (used for
input). A collective that fails because a peer died or timed out raises :class:`LostContact`.
"""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from dsv2cli.errors import DSV2Error, InputError

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "DSV2_DIST_TIMEOUT"
BACKEND_ENV = "DSV2_BACKEND"


class DistributedError(DSV2Error):
    """A multi-process run that cannot start or continue."""


class CollectiveFailure(DistributedError):
    """Raised on every rank at once: some rank failed and all of them know (see :func:`agree`)."""


class LostContact(DistributedError):
    """A collective failed: a peer crashed, was stopped, or did not answer within the timeout."""


@dataclass(frozen=True)
class ParallelGroup:
    """One rank's view of the run. ``process_group`` None means torch.distributed's default group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    process_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or a launcher that sets the same variables) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def env_rank() -> int:
    """This process's rank from the environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InputError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def choose_device(name: str, local_rank: int) -> torch.device:
    """``auto``/``cuda`` -> this rank's GPU ``cuda:LOCAL_RANK`` when CUDA is there; ``cpu`` -> the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"unknown device '{name}'", hint="choose cpu, cuda or auto")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise InputError(f"`device={name}` was asked for but no CUDA device is available", hint="use `device=cpu`")
    if name.startswith("cuda:"):
        return torch.device(name)
    if local_rank >= torch.cuda.device_count():  # one rank's problem, so not an InputError (see launch.py)
        raise DistributedError(
            f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}",
            hint="start at most one process per GPU (--nproc-per-node)",
        )
    return torch.device("cuda", local_rank)


def choose_backend(requested: str, device: torch.device) -> str:
    """The explicit choice (option, then ``DSV2_BACKEND``), else NCCL on CUDA and Gloo on CPU."""
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if requested not in BACKENDS:
        raise InputError(f"unknown backend '{requested}'", hint=f"choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        requested = "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        raise InputError("the nccl backend needs CUDA devices and a CUDA build of torch", hint="use `backend=gloo` on CPU")
    return requested


def start(device: str = "auto", backend: str = "auto") -> ParallelGroup:
    """Join the run torchrun described in the environment; returns this rank's :class:`ParallelGroup`."""
    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = choose_device(device, local_rank)
    chosen = choose_backend(backend, torch_device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    try:
        dist.init_process_group(
            chosen,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_seconds()),
            device_id=torch_device if chosen == "nccl" else None,  # NCCL binds this rank's GPU up front
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"could not join the process group as rank {rank} of {world}: {exc}",
            hint="check MASTER_ADDR/MASTER_PORT and that every node runs the same torchrun command",
        ) from exc
    return ParallelGroup(rank, world, local_rank, chosen, torch_device)


def stop() -> None:
    """Leave the process group (safe to call when it was never opened or a peer is gone)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:
            pass


def _lost(exc: Exception) -> LostContact:
    return LostContact(
        f"lost contact with the other ranks: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        hint="another rank failed or was stopped (its error is printed above), or it did not answer "
        f"within {TIMEOUT_ENV} seconds",
    )


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as exc:
        raise _lost(exc) from exc
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, group: dist.ProcessGroup | None, world_size: int) -> torch.Tensor:
    """``[..., X]`` on each rank -> ``[..., world_size * X]``, rank 0's part first."""
    local = tensor.contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size)]
    try:
        dist.all_gather(parts, local, group=group)
    except RuntimeError as exc:
        raise _lost(exc) from exc
    return torch.cat(parts, dim=-1)


def gather_objects(group: ParallelGroup, value: object) -> list[object]:
    """Every rank's (picklable) ``value``, in rank order, on every rank."""
    values: list[object] = [None] * group.world_size
    try:
        dist.all_gather_object(values, value, group=group.process_group)
    except RuntimeError as exc:
        raise _lost(exc) from exc
    return values


def broadcast_from_main(group: ParallelGroup, value: object) -> object:
    """Rank 0's ``value`` on every rank (other ranks' ``value`` is ignored)."""
    box = [value if group.is_main else None]
    try:
        dist.broadcast_object_list(box, src=0, group=group.process_group)
    except RuntimeError as exc:
        raise _lost(exc) from exc
    return box[0]


def _describe(exc: BaseException) -> tuple[str, str | None]:
    """What a user should read about a rank's failure: the message and hint, or the exception type for bugs."""
    if isinstance(exc, DSV2Error):
        return exc.message, exc.hint
    return f"{type(exc).__name__}: {exc}", None


def _ranks_phrase(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def failure_message(failures: dict[int, tuple[str, str | None]], world_size: int) -> CollectiveFailure:
    """One error for failures on several ranks; a message every rank shares is printed once."""
    by_message: dict[tuple[str, str | None], list[int]] = {}
    for rank, described in sorted(failures.items()):
        by_message.setdefault(described, []).append(rank)
    if len(by_message) == 1 and len(failures) == world_size:
        (message, hint), _ = next(iter(by_message.items()))
        return CollectiveFailure(message, hint)
    parts = [f"{message} (on {_ranks_phrase(ranks)})" for (message, _), ranks in by_message.items()]
    hint = next((h for (_, h) in by_message if h), None)
    return CollectiveFailure("; ".join(parts), hint)


def agree(group: ParallelGroup, work: Callable[[], T]) -> T:
    """Run ``work`` on every rank, then check together: if any rank failed, every rank raises the same error.

    Without this, ranks that succeeded would wait forever in their next collective for the one that did not.
    """
    error: BaseException | None = None
    value: T | None = None
    try:
        value = work()
    except Exception as exc:  # reported to every rank below; the original stays chained on the failing one
        error = exc
    reports = gather_objects(group, None if error is None else _describe(error))
    failures = {rank: report for rank, report in enumerate(reports) if report is not None}
    if failures:
        raise failure_message(failures, group.world_size) from error  # type: ignore[arg-type]
    return value  # type: ignore[return-value]


def from_main_rank(group: ParallelGroup | None, produce: Callable[[], T]) -> T:
    """Rank 0 runs ``produce`` (it reads stdin and files); every rank gets its value, or raises its error.

    Without a group this is just ``produce()``.
    """
    if group is None:
        return produce()
    outcome: tuple[str, object] | None = None
    if group.is_main:
        try:
            outcome = ("value", produce())
            pickle.dumps(outcome)  # an unpicklable value would fail on rank 0 alone and leave the others waiting
        except Exception as exc:
            outcome = ("error", _describe(exc))
    kind, payload = broadcast_from_main(group, outcome)  # type: ignore[misc]
    if kind == "error":
        message, hint = payload  # type: ignore[misc]
        raise CollectiveFailure(message, hint)
    return payload  # type: ignore[return-value]


def shared_seed(group: ParallelGroup | None, seed: int | None) -> int | None:
    """The sampling seed every rank uses: ``seed`` itself, or one drawn on rank 0 when sampling unseeded.

    Ranks must draw the same tokens; an unseeded global RNG would differ from rank to rank.
    """
    if group is None or seed is not None:
        return seed
    return from_main_rank(group, lambda: secrets.randbits(31))
