"""Continuous batching: one thread owns the model, admits waiting requests between steps and decodes them together.

Each turn of the loop: drop rows whose clients left, admit waiting requests while fewer than ``max_concurrent``
rows decode (prompts the prefix cache knows nothing of are prefilled together in one forward, the others alone
after what the cache holds of them; each gets its first token), then run one decode step of the whole batch and
hand each row its token. A request leaves the batch at the step that finishes it. Prefills run between steps, so
a long prompt delays the other rows' next token by its prefill (there is no chunked prefill).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from dsv2cli.checkpoint.fit import InsufficientMemoryError, MemoryNeed, fit_of, require, working_bytes
from dsv2cli.errors import DSV2Error, InputError
from dsv2cli.inference.compiled import CompiledDecoder, round_capacity
from dsv2cli.inference.session import LoadedModel
from dsv2cli.model import ForwardOptions
from dsv2cli.serve.batch import Done, Failed, Row, RunningBatch, ServeRequest, TokenOut
from dsv2cli.serve.experts import ExpertRecorder
from dsv2cli.serve.metrics import Metrics
from dsv2cli.serve.model_thread import ModelThread
from dsv2cli.serve.prefix_cache import PrefixCache
from dsv2cli.serve.protocol import APIError

# Waiting requests admitted together are prefilled in one forward of at most this many (left-padded) tokens:
# one read of the weights serves them all, instead of one read per prompt.
PREFILL_GROUP_TOKENS = 2048


@dataclass(frozen=True)
class Limits:
    max_concurrent: int = 8  # rows decoding together
    max_queue: int = 64  # requests waiting for a row; more are answered 429
    max_prompt_tokens: int | None = None  # None: the model's context
    prefix_cache_bytes: int = 256 << 20  # 0 turns the prefix cache off

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_queue"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise InputError(f"`max_prompt_tokens` must be at least 1, got {self.max_prompt_tokens}")
        if self.prefix_cache_bytes < 0:
            raise InputError(f"`prefix_cache_bytes` must be >= 0, got {self.prefix_cache_bytes}")


class Scheduler:
    """The thread that owns the model: :meth:`submit` queues a request, :meth:`start` / :meth:`stop` run the loop."""

    def __init__(
        self,
        loaded: LoadedModel,
        forward: ForwardOptions,
        decoder: CompiledDecoder | None,
        limits: Limits,
        metrics: Metrics,
        cache_dtype: torch.dtype | None = None,
        thread: ModelThread | None = None,
    ) -> None:
        """``thread``: where the loop runs, the thread that loaded the model (``model_thread.py`` says why); by default
        a thread of its own, ended by :meth:`stop`."""
        self.loaded = loaded
        self.limits = limits
        self.metrics = metrics
        self.cache_dtype = cache_dtype or loaded.dtype
        self.batch = RunningBatch(loaded.model, forward, decoder, cache_dtype)
        self.prefix = PrefixCache(limits.prefix_cache_bytes) if limits.prefix_cache_bytes > 0 else None
        self.waiting: deque[ServeRequest] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.failure: str | None = None  # why the loop died, if it did
        self.prompt_tokens = 0
        self.recorder: ExpertRecorder | None = None
        self.model_thread = thread or ModelThread("dsv2-scheduler")
        self._own_thread = thread is None
        self.loop: Future[None] | None = None  # the loop's run on the model thread, once started

    @property
    def alive(self) -> bool:
        return self.loop is not None and not self.loop.done() and self.failure is None

    @property
    def started(self) -> bool:
        return self.loop is not None

    def start(self) -> None:
        self.loop = self.model_thread.submit(self._run, report=True)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, end waiting ones (503) and running ones (``cancelled``), and wait for the loop to end."""
        with self.cond:
            self.stopping = True
            while self.waiting:
                self.waiting.popleft().emit(Failed(503, "the server is shutting down"))
            self.cond.notify_all()
        if self.loop is not None:
            futures.wait([self.loop], timeout)
        if self._own_thread:
            self.model_thread.close()

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """503 when one request's cache and activations alone would not fit in memory."""
        config, device = self.loaded.model.config, self.loaded.device
        working = working_bytes(config, self.cache_dtype, 1, prompt_tokens, prompt_tokens + max_tokens, slack=0)
        try:
            require(MemoryNeed(0, 0, working), f"a request of {prompt_tokens} + {max_tokens} tokens", hint="", device=device)
        except InsufficientMemoryError as exc:
            raise APIError(503, f"{exc.message}; ask for fewer tokens", type="server_error", code="insufficient_memory") from None

    def submit(self, request: ServeRequest) -> None:
        """Queue ``request``; 429 (with Retry-After) over the queue limit, 503 while shutting down."""
        with self.cond:
            for gone in [r for r in self.waiting if r.cancelled.is_set()]:  # clients that left while waiting
                self.waiting.remove(gone)
                self._cancelled_waiting(gone)
            if self.stopping or self.failure is not None:
                raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
            if len(self.waiting) >= self.limits.max_queue:
                raise APIError(
                    429,
                    f"{len(self.waiting)} requests are waiting already (max_queue); retry shortly",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self.waiting.append(request)
            self.metrics.queue.set(len(self.waiting))
            self.cond.notify()

    def start_recording(self) -> None:
        """Count expert loads from the next forward on (a new record; steps run eagerly meanwhile)."""
        self.recorder = ExpertRecorder(self.loaded.model.config, self.loaded.name)
        self.batch.recorder = self.recorder

    def stop_recording(self) -> None:
        self.batch.recorder = None

    def expert_loads(self) -> dict[str, Any] | None:
        """The current (or last) record's document; None when nothing was recorded."""
        return self.recorder.document() if self.recorder is not None else None

    def _run(self) -> None:
        torch.set_flush_denormal(True)  # per thread (the MXCSR register): session.configure_cpu set it for the main one
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException:  # a bug: answer everyone, keep the server up to say so (/health turns 503)
            self.failure = traceback.format_exc()
            for row in self.batch.live:
                row.request.emit(Failed(500, "the scheduler failed; see the server's log"))
            with self.cond:
                while self.waiting:
                    self.waiting.popleft().emit(Failed(500, "the scheduler failed; see the server's log"))
            raise
        for row in self.batch.live:
            self._end(row, "cancelled")

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.batch.live:
                    self.cond.wait()
                if self.stopping:
                    return
            while group := self._next_group():
                self._admit(group)
            for row in self.batch.live:
                if row.request.cancelled.is_set():
                    self._end(row, "cancelled")
            if self.batch.live:
                try:
                    self._step()
                except RuntimeError as exc:  # the allocator (out of memory) or an operator: end these rows, keep serving
                    self._fail_batch(f"the batch's step failed: {exc}")
            self.metrics.running.set(len(self.batch.live))
            self.metrics.cache_bytes.set(self.batch.cache_bytes())

    def _next_group(self) -> list[ServeRequest]:
        """Waiting requests to admit together, first come first: while rows are free, their left-padded prompts
        stay within :data:`PREFILL_GROUP_TOKENS` and the batch laid out anew with them fits in memory."""
        group: list[ServeRequest] = []
        with self.cond:
            while not self.stopping and self.waiting and len(self.batch.live) + len(group) < self.limits.max_concurrent:
                candidate = [*group, self.waiting[0]]
                if group and len(candidate) * max(len(r.prompt_token_ids) for r in candidate) > PREFILL_GROUP_TOKENS:
                    break
                if (self.batch.live or group) and not self._fits_beside_batch(candidate):
                    break  # they wait for rows to leave (alone each fitted when it came)
                group.append(self.waiting.popleft())
            self.metrics.queue.set(len(self.waiting))
        return group

    def _fits_beside_batch(self, requests: list[ServeRequest]) -> bool:
        """Whether the batch laid out anew with ``requests`` in it (the larger case) fits in what memory is left."""
        batch, config = self.batch, self.loaded.model.config
        prompt = max(len(request.prompt_token_ids) for request in requests)
        rows = batch.row_count(len(batch.live) + len(requests))
        length = max(batch.cache.length if batch.cache is not None else 0, prompt)
        steps = [request.max_tokens for request in requests] + [row.remaining_steps for row in batch.live]
        need = working_bytes(config, self.cache_dtype, rows, prompt, round_capacity(length + max(steps)), slack=0)
        return fit_of(MemoryNeed(0, 0, need), self.loaded.device).fits

    def _admit(self, group: list[ServeRequest]) -> None:
        """Prefill ``group`` (prompts with nothing in the prefix cache together, in one forward), choose each
        one's first token and put the unfinished ones in the batch."""
        alone: list[tuple[ServeRequest, torch.Tensor | None]] = []
        together: list[ServeRequest] = []
        for request in group:
            if request.cancelled.is_set():
                self._cancelled_waiting(request)
                continue
            prefix = self.prefix.lookup(request.prompt_token_ids) if self.prefix is not None else None
            if prefix is None and self.batch.recorder is None:  # a record counts each prompt's own tokens
                together.append(request)
            else:
                alone.append((request, prefix))
        if len(together) > 1:
            self.metrics.prefill_prompts.observe(len(together))
            try:
                prefilled = self.batch.prefill_together([request.prompt_token_ids for request in together])
            except (DSV2Error, RuntimeError) as exc:  # RuntimeError: the allocator could not give the prompts' cache
                for request in together:
                    request.emit(Failed(503, f"the prompt could not run: {exc}"))
                prefilled = []
            for request, (logits, entries) in zip(together, prefilled, strict=False):
                self._start(request, 0, logits, entries)
        else:
            alone += [(request, None) for request in together]
        for request, prefix in alone:
            self.metrics.prefill_prompts.observe(1)
            try:
                logits, entries = self.batch.prefill(request.prompt_token_ids, prefix)
            except (DSV2Error, RuntimeError) as exc:
                request.emit(Failed(503, f"the prompt could not run: {exc}"))
                continue
            self._start(request, 0 if prefix is None else prefix.shape[1], logits, entries)

    def _start(self, request: ServeRequest, cached_tokens: int, logits: torch.Tensor, entries: torch.Tensor) -> None:
        """A prefilled request: its first token from ``logits [V]``, then its row joins the batch with ``entries``."""
        model = self.loaded.model
        row = Row(request, self.loaded.tokenizer, model.config.vocab_size, self.loaded.eos_token_ids, self.loaded.device)
        tokens = request.prompt_token_ids
        row.cached_tokens = cached_tokens
        self.metrics.prompt_tokens.inc(len(tokens))
        self.metrics.cached_tokens.inc(row.cached_tokens)
        self.prompt_tokens += len(tokens)
        if self.prefix is not None:
            self.prefix.insert(tokens, entries)
        event = row.take(logits)
        self._deliver(row, event)
        if event.finished is None:
            try:
                self.batch.add(row, entries)  # a new layout allocates the whole batch's cache
            except RuntimeError as exc:
                request.emit(Failed(503, f"the request does not fit beside the running ones: {exc}"))

    def _step(self) -> None:
        rows = list(self.batch.rows)
        logits = self.batch.step()
        self.metrics.step_rows.observe(sum(row is not None for row in rows))
        finished = []
        for i, row in enumerate(rows):
            if row is None:
                continue
            event = row.take(logits[i])
            self._deliver(row, event)
            if event.finished is not None:
                finished.append(row)
        for row in finished:
            if self.prefix is not None:  # the prompt and the answer: a chat's next turn starts with both
                written = row.request.prompt_token_ids + row.token_ids[:-1]
                self.prefix.insert(written, self.batch.entries_of(row))
            self.batch.remove(row)

    def _deliver(self, row: Row, event: TokenOut) -> None:
        now = time.perf_counter()
        if row.generated == 1:
            self.metrics.ttft.observe(now - row.request.submitted)
        else:
            self.metrics.itl.observe(now - row.last_token_at)
        row.last_token_at = now
        self.metrics.generated_tokens.inc()
        row.request.emit(event)
        if event.finished is not None:
            self.metrics.finished.labels(event.finished).inc()
            request = row.request
            request.emit(Done(event.finished, len(request.prompt_token_ids), row.generated, row.cached_tokens))

    def _fail_batch(self, message: str) -> None:
        for row in self.batch.live:
            row.request.emit(Failed(503, message))
            self.metrics.finished.labels("error").inc()
        self.batch.rows, self.batch.cache = [], None

    def _cancelled_waiting(self, request: ServeRequest) -> None:
        request.emit(Done("cancelled", len(request.prompt_token_ids), 0, 0))
        self.metrics.finished.labels("cancelled").inc()

    def _end(self, row: Row, reason: str) -> None:
        request = row.request
        request.emit(Done(reason, len(request.prompt_token_ids), row.generated, row.cached_tokens))
        self.metrics.finished.labels(reason).inc()
        self.batch.remove(row)
