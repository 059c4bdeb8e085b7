"""The generation engine: token ids in, records out, streaming as an iterator.

Prompts of different lengths decode together in one batch: they are left-padded into one latent
cache sized ``longest prompt + max_new_tokens``; each row keeps its own positions, so a row
computes what it would alone. Attention runs absorbed on the cached latents (never re-expanded).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dsv2cli.checkpoint.fit import MemoryNeed, require, working_bytes
from dsv2cli.config import ModelConfig
from dsv2cli.errors import InputError
from dsv2cli.inference.compiled import CompiledDecoder, round_capacity
from dsv2cli.inference.sampling import SamplingParams, choose_tokens, row_generators
from dsv2cli.inference.tokenizer import StreamDecoder, TextTokenizer
from dsv2cli.model import DeepseekV2, ForwardOptions


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    prompt: str | None = None
    index: int = 0  # position in the whole input; seeds per-row sampling


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    attention: str = "absorbed"
    cache_dtype: torch.dtype | None = None  # the latent cache's values; None = the model's dtype
    forward: ForwardOptions = ForwardOptions()  # what eager forwards use (compiled steps: the decoder's own)


# A prefill this long is compute-bound: expanding K/V once for the new tokens is cheaper than attending in the
# 576-wide latent space (vLLM does the same). Decode steps always attend on the latent directly.
PREFILL_EXPAND_MIN_TOKENS = 64


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Prompts as one batch ``[B, longest]`` of token ids, each right-aligned after left padding (id 0), and each
    row's padding (the cache's ``pad``: its positions start after it and attention masks it out)."""
    longest = max(len(tokens) for tokens in prompts)
    pad = [longest - len(tokens) for tokens in prompts]
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, tokens in enumerate(prompts):
        batch[row, pad[row] :] = torch.tensor(tokens)
    return batch, pad


def prefill_attention(requested: str, new_tokens: int) -> str:
    """The attention path for a prefill of ``new_tokens`` when the user asked for ``requested``."""
    if requested == "absorbed" and new_tokens >= PREFILL_EXPAND_MIN_TOKENS:
        return "naive"
    return requested


@dataclass
class Timings:
    compile_s: float = 0.0  # compiling the decode step for this cache shape (0 when eager or already compiled)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, float]:
        return {
            "compile_s": self.compile_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass
class GenerationResult:
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the raw logits
    finish_reason: str | None = None  # "eos", "stop" or "length"
    text: str | None = None
    timings: Timings = field(default_factory=Timings)

    def to_json(self) -> dict[str, object]:
        return {
            "prompt": self.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "text": self.text,
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
            "timings": self.timings.to_json(),
        }


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row; ``text`` is the newly printable text (may be empty)."""

    index: int
    token_id: int
    logprob: float
    text: str
    finished: str | None


class RowText:
    """Incremental text of one row, holding back what might be the start of a stop string."""

    def __init__(self, decoder: StreamDecoder, stop: tuple[str, ...]) -> None:
        self.decoder = decoder
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return ``(printable delta, stop string found)``."""
        search_from = max(0, len(self.text) - self.hold)
        self.text += self.decoder.step(token_id)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        safe = max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted : safe], safe
        return delta, False

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


def check_requests(
    config: ModelConfig, requests: list[GenerationRequest], options: GenerationOptions, tokenizer: TextTokenizer | None
) -> None:
    """What :class:`Generation` refuses, checked before any work: prompts that are empty, do not fit the context or hold
    ids outside the vocabulary, no tokens to generate, stop strings without a tokenizer."""
    if not requests:
        raise InputError("no prompts to generate from")
    context = config.max_position_embeddings
    for r in requests:
        if not r.prompt_token_ids:
            raise InputError(f"prompt {r.index + 1} is empty")
        if len(r.prompt_token_ids) >= context:
            raise InputError(
                f"prompt {r.index + 1} has {len(r.prompt_token_ids)} tokens; the model's context is {context}",
                hint="shorten the prompt",
            )
        bad = [t for t in r.prompt_token_ids if not 0 <= t < config.vocab_size]
        if bad:
            raise InputError(f"prompt {r.index + 1} has token ids outside the vocabulary (0..{config.vocab_size - 1}): {bad[:5]}")
    if options.max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be at least 1, got {options.max_new_tokens}")
    if tokenizer is None and options.stop:
        raise InputError(
            "stop strings need a tokenizer, and this checkpoint has none", hint="use token-id prompts without `stop`"
        )


class Generation:
    """A batch being generated: iterate for :class:`TokenEvent` s, then read ``results``.

    With a :class:`CompiledDecoder`, decode steps (of one prompt or of a batch) run through it.
    """

    def __init__(
        self,
        model: DeepseekV2,
        requests: list[GenerationRequest],
        options: GenerationOptions,
        tokenizer: TextTokenizer | None = None,
        decoder: CompiledDecoder | None = None,
    ) -> None:
        check_requests(model.config, requests, options, tokenizer)
        context = model.config.max_position_embeddings
        self.model = model
        self.requests = requests
        self.options = options
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.results = [GenerationResult(r.index, r.prompt, list(r.prompt_token_ids)) for r in requests]
        self.limits = [min(options.max_new_tokens, context - len(r.prompt_token_ids)) for r in requests]
        self.cache_bytes = 0
        longest = max(len(r.prompt_token_ids) for r in requests)
        weight = model.embed_tokens.weight
        working = working_bytes(
            model.config, options.cache_dtype or weight.dtype, len(requests), longest, longest + max(self.limits), slack=0
        )
        require(
            MemoryNeed(0, 0, working),
            f"generating {max(self.limits)} tokens after {len(requests)} prompt(s) of up to {longest} tokens",
            hint="fewer prompts at once, shorter prompts or fewer new tokens",
            device=weight.device,
        )

    def __iter__(self) -> Iterator[TokenEvent]:
        with torch.inference_mode():
            yield from self._run()

    def run(self) -> list[GenerationResult]:
        for _ in self:
            pass
        return self.results

    def _run(self) -> Iterator[TokenEvent]:
        model, options = self.model, self.options
        device = model.embed_tokens.weight.device
        lengths = [len(r.prompt_token_ids) for r in self.requests]
        tokens, pad = left_padded([r.prompt_token_ids for r in self.requests])
        rows, longest = tokens.shape
        capacity = longest + max(self.limits)
        if self.decoder is not None:
            capacity = round_capacity(capacity)  # similar lengths share one compiled graph
        cache = model.new_cache(rows, capacity, pad=pad, dtype=options.cache_dtype)
        self.cache_bytes = cache.nbytes()
        generators = row_generators(options.sampling.seed, [r.index for r in self.requests])
        seen = None
        if options.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(rows, model.config.vocab_size, dtype=torch.bool, device=device)
            for row, r in enumerate(self.requests):
                seen[row, torch.tensor(r.prompt_token_ids, device=device)] = True
        texts = [RowText(self.tokenizer.stream_decoder(), options.stop) if self.tokenizer else None for _ in range(rows)]
        eos = set() if options.ignore_eos else set(options.eos_token_ids)
        active = list(range(rows))

        start = time.perf_counter()
        attention = prefill_attention(options.attention, longest)
        logits = model(tokens.to(device), cache=cache, attention=attention, last_only=True, options=options.forward)
        prefill_s = time.perf_counter() - start
        use_compiled = self.decoder is not None and options.attention == "absorbed" and self.decoder.serves(cache)
        compiled = self.decoder if use_compiled else None
        compile_s = compiled.prepare(cache) if compiled is not None else 0.0
        for row, result in enumerate(self.results):
            result.timings.prefill_s, result.timings.prefill_tokens = prefill_s, lengths[row]
            result.timings.compile_s = compile_s
        decode_start = time.perf_counter()
        step = 0
        while active:
            last = logits[:, -1].float()
            logprobs = torch.log_softmax(last, dim=-1)
            chosen = choose_tokens(last, options.sampling, generators, seen)
            if seen is not None:
                seen.scatter_(1, chosen[:, None], True)
            chosen_list = chosen.tolist()
            step += 1
            still_active = []
            for row in active:
                token, result = chosen_list[row], self.results[row]
                result.token_ids.append(token)
                result.logprobs.append(float(logprobs[row, token]))
                delta, hit_stop = texts[row].add(token) if texts[row] is not None else ("", False)
                finished = None
                if hit_stop:
                    finished = "stop"
                elif token in eos:
                    finished = "eos"
                elif len(result.token_ids) >= self.limits[row]:
                    finished = "length"
                if finished is not None:
                    result.finish_reason = finished
                    if texts[row] is not None:
                        delta += texts[row].flush()
                        result.text = texts[row].text
                    result.timings.decode_s = time.perf_counter() - decode_start
                    result.timings.decode_tokens = len(result.token_ids)
                else:
                    still_active.append(row)
                yield TokenEvent(result.index, token, result.logprobs[-1], delta, finished)
            active = still_active
            if active and compiled is not None:
                logits = compiled.step(chosen[:, None], cache)
            elif active:
                logits = model(chosen[:, None], cache=cache, attention=options.attention, options=options.forward)
