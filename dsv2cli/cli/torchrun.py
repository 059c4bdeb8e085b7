"""A command's run: one process, or one rank of a torchrun launch.

Only a torchrun launch goes through :mod:`dsv2cli.parallel` (joining the group, rank 0 reading the
input, each rank loading its shard); in one process these helpers call the core directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from dsv2cli.cli.common import LoadStatus, err, flag_text
from dsv2cli.inference.session import LoadedModel, load_for_generation
from dsv2cli.parallel import ParallelGroup, distributed_run, from_main_rank, launched_by_torchrun, shared_seed
from dsv2cli.parallel.session import load_model

T = TypeVar("T")


@contextmanager
def torchrun_group(device: str, backend: str) -> Iterator[ParallelGroup | None]:
    """This rank's group under torchrun (failures reported once, naming the rank); None in one process."""
    if not launched_by_torchrun():
        yield None
        return
    with distributed_run(device, backend, render=flag_text) as group:
        yield group


def on_main_rank(group: ParallelGroup | None, produce: Callable[[], T]) -> T:
    """``produce()`` (it reads stdin or files); under torchrun rank 0 runs it and every rank gets its value."""
    return produce() if group is None else from_main_rank(group, produce)


def run_seed(group: ParallelGroup | None, seed: int | None) -> int | None:
    """The sampling seed: ``seed``, or under torchrun one drawn on rank 0 for every rank when none was given."""
    return seed if group is None else shared_seed(group, seed)


def load(model: str | None, group: ParallelGroup | None, device: str, dtype: str, threads: int | None) -> LoadedModel:
    """The whole model in one process; this rank's shard under torchrun (each rank's memory shown on stderr)."""
    if group is None:
        return load_for_generation(model, device, dtype, threads, progress=LoadStatus())
    loaded, shards = load_model(model, group, dtype, threads)  # the group chose the device when it started
    for line in shards.lines():
        err.print(f"[dim]{line}[/]", soft_wrap=True)
    return loaded
