"""The one thread that does the server's torch work: loading the model, then the scheduler's loop.

OpenMP (libgomp, torch's CPU thread pool) keeps a team of worker threads for each thread that starts parallel
work. A server that loaded its model on the main thread and decoded on another had two teams: on a 2-core
machine more OpenMP threads than cores, and libgomp then lets a waiting worker sleep almost at once instead of
spinning, so every parallel region of a decode step waited for a wake-up (7,000 context switches a second; a
DeepSeek-V2-Lite int8 step took 175 ms against `dsv2 generate`'s 137 ms on 2 Zen 4 cores). Doing all of it on
one thread keeps one team, as `dsv2 generate` has.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    """A daemon thread running the callables it is given, one after the other, in the order given."""

    def __init__(self, name: str = "dsv2-model") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, function: Callable[[], T], report: bool = False) -> Future[T]:
        """Run ``function`` on the thread after what was submitted before; its result or exception lands in the future.

        ``report``: also print the traceback of an exception to stderr, as a thread of its own would (for work whose
        future nobody waits on).
        """
        future: Future[T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(function())
            except BaseException as exc:
                if report:
                    traceback.print_exc()
                future.set_exception(exc)

        self._jobs.put(job)
        return future

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the thread and wait for it: its result, or its exception raised here."""
        return self.submit(function).result()

    def close(self) -> None:
        """End the thread once what was submitted has run (it is a daemon: a process that exits does not wait for it)."""
        self._jobs.put(None)
