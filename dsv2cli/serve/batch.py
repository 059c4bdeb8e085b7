"""The running decode batch: rows that join and leave one latent cache between steps.

Shape legend: L layers, B rows, T slots, C + R one latent entry (``kv_lora_rank + qk_rope_head_dim``), V vocabulary.

A request's prompt is prefilled in a cache of its own (the path ``Generation`` takes; requests admitted together
are prefilled together, left-padded, in one forward); its latent entries then move into the batch's cache
``[L, B, capacity, C + R]``, right-aligned at the batch's current length: the slots before them are the row's left
padding (``cache.pad``), masked out, with positions counted after them — the layout ``Generation`` uses for prompts
of different lengths, so a row computes what it would alone. A row that leaves becomes idle (fully padded, fed
token 0) until a later request takes its place; when no idle row can take a request (its prompt is longer than the
batch's length, or the capacity is short), the cache is laid out anew with every live row's entries copied over.
With compiled steps, row counts are powers of two and capacities multiples of ``CAPACITY_STEP``, so a few graphs
serve every batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from threading import Event

import torch

from dsv2cli.inference.compiled import CompiledDecoder, round_capacity
from dsv2cli.inference.engine import RowText, left_padded, prefill_attention
from dsv2cli.inference.sampling import SamplingParams, apply_frequency_penalties, choose_tokens, row_generators
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2, ForwardOptions
from dsv2cli.model.cache import LatentKVCache
from dsv2cli.serve.experts import ExpertRecorder


@dataclass(frozen=True)
class TokenOut:
    """One generated token of a request: its raw log-probability, the ``top`` alternatives, the new text."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    text: str
    finished: str | None  # "eos", "stop", "length" or None


@dataclass(frozen=True)
class Done:
    """A request ended; ``finish_reason`` is ``eos`` / ``stop`` / ``length``, or ``cancelled``."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


@dataclass
class ServeRequest:
    """One request as the scheduler runs it; ``emit`` receives its :class:`TokenOut` s, then one :class:`Done` or :class:`Failed`."""

    prompt_token_ids: list[int]
    max_tokens: int
    emit: Callable[[TokenOut | Done | Failed], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0
    cancelled: Event = field(default_factory=Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """A request's decoding state: its sampler's state, its text, the token the next step feeds."""

    def __init__(
        self,
        request: ServeRequest,
        tokenizer: TextTokenizer | None,
        vocab: int,
        eos: tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> None:
        self.request = request
        self.eos = set() if request.ignore_eos else set(eos)
        sampling = request.sampling
        self.generators = row_generators(sampling.seed, [0])
        self.seen: torch.Tensor | None = None  # [1, V]
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt_token_ids, device=device)] = True
        self.counts: torch.Tensor | None = None  # [1, V] tokens generated so far
        if request.frequency_penalty or request.presence_penalty:
            self.counts = torch.zeros(1, vocab, device=device)
        self.text = RowText(tokenizer.stream_decoder(), request.stop) if tokenizer is not None else None
        self.generated = 0
        self.token_ids: list[int] = []
        self.pending = 0  # the last chosen token: the next step writes it to the cache
        self.cached_tokens = 0  # prompt tokens whose entries came from the prefix cache
        self.last_token_at = 0.0

    @property
    def remaining_steps(self) -> int:
        """Steps (cache slots) this row may still need."""
        return self.request.max_tokens - self.generated

    def take(self, logits: torch.Tensor) -> TokenOut:
        """Choose the next token from ``logits [V]``; the event says whether the request finished."""
        request = self.request
        last = logits.float()[None]  # [1, V]
        logprobs = torch.log_softmax(last, dim=-1)
        scores = last
        if self.counts is not None:
            scores = apply_frequency_penalties(last, self.counts, request.frequency_penalty, request.presence_penalty)
        token = int(choose_tokens(scores, request.sampling, self.generators, self.seen)[0])
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        top: tuple[tuple[int, float], ...] = ()
        if request.top_logprobs:
            values, ids = torch.topk(logprobs[0], request.top_logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        self.generated += 1
        self.token_ids.append(token)
        self.pending = token
        delta, hit_stop = self.text.add(token) if self.text is not None else ("", False)
        finished = None
        if hit_stop:
            finished = "stop"
        elif token in self.eos:
            finished = "eos"
        elif self.generated >= request.max_tokens:
            finished = "length"
        if finished is not None and self.text is not None:
            delta += self.text.flush()
        return TokenOut(token, float(logprobs[0, token]), top, delta, finished)


class RunningBatch:
    """Rows decoding together in one :class:`LatentKVCache`; ``rows[i]`` is None for an idle row."""

    def __init__(
        self,
        model: DeepseekV2,
        forward: ForwardOptions,
        decoder: CompiledDecoder | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.forward = forward
        self.decoder = decoder
        self.cache_dtype = cache_dtype
        self.rows: list[Row | None] = []
        self.cache: LatentKVCache | None = None
        self.recorder: ExpertRecorder | None = None  # set while expert loads are recorded (steps then run eagerly)

    @property
    def live(self) -> list[Row]:
        return [row for row in self.rows if row is not None]

    def cache_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    def prefill(self, tokens: list[int], prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a prompt alone after ``prefix [L, K, C + R]`` (entries of its first K tokens, or None).

        Returns the next token's logits ``[V]`` and the prompt's entries ``[L, N, C + R]``.
        """
        known = 0 if prefix is None else prefix.shape[1]
        cache = self.model.new_cache(1, len(tokens), dtype=self.cache_dtype)
        if prefix is not None:
            cache.entries[:, 0, :known] = prefix
            cache.advance(known)
        new = torch.tensor([tokens[known:]], device=cache.entries.device)
        attention = prefill_attention("absorbed", len(tokens) - known)
        recorder = self.recorder
        if recorder is not None:
            recorder.next_forward(None)
        logits = self.model(new, cache=cache, attention=attention, routing_hook=recorder, last_only=True, options=self.forward)
        return logits[0, -1], cache.entries[:, 0]

    def prefill_together(self, prompts: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefill several prompts (nothing cached of them) in one forward, left-padded to the longest.

        Returns each prompt's next-token logits ``[V]`` and its entries ``[L, N_i, C + R]``: what
        :meth:`prefill` returns for it alone (padding is masked out and positions start after it, as in
        ``Generation``), from one read of the weights instead of one per prompt.
        """
        new, pad = left_padded(prompts)
        longest = new.shape[1]
        cache = self.model.new_cache(len(prompts), longest, pad=pad, dtype=self.cache_dtype)
        attention = prefill_attention("absorbed", longest)
        logits = self.model(new.to(cache.entries.device), cache=cache, attention=attention, last_only=True, options=self.forward)
        return [(logits[i, -1], cache.entries[:, i, pad[i] :]) for i in range(len(prompts))]

    def remove(self, row: Row) -> None:
        self.rows[self.rows.index(row)] = None
        live = len(self.live)
        if live == 0:
            self.rows, self.cache = [], None
        elif len(self.rows) > 2 * self.row_count(live):
            self._lay_out([])  # mostly idle rows: compact them away

    def add(self, row: Row, entries: torch.Tensor) -> None:
        """Put a prefilled ``row`` with its prompt's ``entries [L, N, C + R]`` into the batch."""
        cache, n = self.cache, entries.shape[1]
        if cache is not None and None in self.rows and n <= cache.length and cache.length + row.remaining_steps <= cache.capacity:
            i = self.rows.index(None)
            cache.entries[:, i, cache.length - n : cache.length] = entries
            cache.pad[i] = cache.length - n
            self.rows[i] = row
        else:
            self._lay_out([(row, entries)])

    def entries_of(self, row: Row) -> torch.Tensor:
        """The entries ``[L, N, C + R]`` of ``row``'s tokens in the cache (its prompt and all but its pending token)."""
        assert self.cache is not None
        i, length = self.rows.index(row), self.cache.length
        return self.cache.entries[:, i, int(self.cache.pad[i]) : length]

    def step(self) -> torch.Tensor:
        """One decode step of every row: writes each row's pending token, returns the next logits ``[B, V]``."""
        assert self.cache is not None
        tokens = torch.tensor([[row.pending if row is not None else 0] for row in self.rows], device=self.cache.pad.device)
        recorder = self.recorder
        if recorder is not None:
            recorder.next_forward(torch.tensor([row is not None for row in self.rows]))
        if self.decoder is not None and self.decoder.serves(self.cache, recorder):
            logits = self.decoder.step(tokens, self.cache)
        else:
            logits = self.model(tokens, cache=self.cache, attention="absorbed", routing_hook=recorder, options=self.forward)
        return logits[:, -1]

    def row_count(self, rows: int) -> int:
        """Rows to allocate for ``rows`` requests: a power of two when steps are compiled (fewer graphs)."""
        return 1 << (rows - 1).bit_length() if self.decoder is not None else rows

    def _lay_out(self, incoming: list[tuple[Row, torch.Tensor]]) -> None:
        """A new cache holding the live rows and ``incoming``, each right-aligned at the longest one's length."""
        everything: list[tuple[Row, torch.Tensor]] = []
        if self.cache is not None:
            length = self.cache.length
            for i, row in enumerate(self.rows):
                if row is not None:
                    filled = length - int(self.cache.pad[i])
                    everything.append((row, self.cache.entries[:, i, length - filled : length]))
        everything += incoming
        length = max(entries.shape[1] for _, entries in everything)
        capacity = round_capacity(max(length + row.remaining_steps for row, _ in everything))
        rows = self.row_count(len(everything))
        cache = self.model.new_cache(rows, capacity, pad=[length] * rows, dtype=self.cache_dtype)
        for i, (_, entries) in enumerate(everything):
            cache.entries[:, i, length - entries.shape[1] : length] = entries
            cache.pad[i] = length - entries.shape[1]
        cache.advance(length)
        self.cache = cache
        self.rows = [row for row, _ in everything] + [None] * (rows - len(everything))
