"""Running a command under ``torchrun``: join the group, keep ranks other than 0 quiet, report failures, leave.

``with distributed_run(device, backend) as group:`` wraps a command body. Outside torchrun it yields None
and does nothing else, so single-process runs are untouched. Under torchrun it yields this rank's
:class:`ParallelGroup`, with stdout and stderr of ranks other than 0 sent to ``/dev/null`` (rank 0 reads
the input and prints; every rank computes the same thing).

Failures end every rank and are printed once, naming the rank:

* a failure all ranks agreed on (:class:`CollectiveFailure`) is printed by rank 0; the ranks then meet
  at a barrier so that the message is out before torchrun stops anyone;
* a failure of one rank alone is printed by that rank on its real stderr as ``Error: rank N: ...``;
  the others notice when their next collective fails (:class:`LostContact`, printed by rank 0 only),
  or torchrun stops them;
* bad input is the same on every rank, so only rank 0 prints it; Ctrl-C prints ``Interrupted.`` once.

The exit status is 1 (130 after Ctrl-C); ``DSV2_DEBUG=1`` re-raises for a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import torch.distributed as dist

from dsv2cli.errors import DSV2Error, InputError
from dsv2cli.parallel.group import (
    CollectiveFailure,
    LostContact,
    ParallelGroup,
    env_rank,
    launched_by_torchrun,
    start,
    stop,
)


def _say(stream: TextIO, message: str, hint: str | None, render: Callable[[str], str]) -> None:
    lines = f"Error: {render(message)}\n" + (f"Hint: {render(hint)}\n" if hint else "")
    stream.write(lines)
    stream.flush()


def _report(exc: BaseException, rank: int, stream: TextIO, render: Callable[[str], str]) -> int:
    """Print what this rank should say about ``exc``; returns the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        if rank == 0:
            stream.write("Interrupted.\n")
        return 130
    if isinstance(exc, CollectiveFailure | LostContact | InputError):
        if rank == 0:
            _say(stream, exc.message, exc.hint, render)
        return 1
    if isinstance(exc, DSV2Error):
        _say(stream, f"rank {rank}: {exc.message}", exc.hint, render)
        return 1
    _say(stream, f"rank {rank}: unexpected {type(exc).__name__}: {exc}", "this is a bug; the traceback follows", str)
    traceback.print_exception(exc, file=stream)
    return 1


@contextmanager
def distributed_run(
    device: str = "auto", backend: str = "auto", render: Callable[[str], str] = str
) -> Iterator[ParallelGroup | None]:
    """This rank's group under torchrun (None otherwise); failures leave as ``SystemExit`` after being reported.

    ``render`` turns an error's text into what the user reads (the CLI shows each `field` as its flag).
    """
    if not launched_by_torchrun():
        yield None
        return
    rank = env_rank()
    real_stdout, real_stderr = sys.stdout, sys.stderr
    quiet = open(os.devnull, "w") if rank != 0 else None  # noqa: SIM115 - closed in finally
    if quiet is not None:
        sys.stdout = sys.stderr = quiet
    try:
        group = start(device, backend)
        yield group
    except BaseException as exc:
        if hasattr(exc, "exit_code") or isinstance(exc, SystemExit):  # click/typer exits pass through
            raise
        status = _report(exc, rank, real_stderr, render)
        if isinstance(exc, CollectiveFailure):
            _barrier()
        if os.environ.get("DSV2_DEBUG") == "1":
            raise
        raise SystemExit(status) from None
    finally:
        stop()
        sys.stdout, sys.stderr = real_stdout, real_stderr
        if quiet is not None:
            quiet.close()


def _barrier() -> None:
    """Wait for every rank (rank 0 has printed by then); a rank that is already gone just ends the wait."""
    try:
        dist.barrier()
    except RuntimeError:
        pass
