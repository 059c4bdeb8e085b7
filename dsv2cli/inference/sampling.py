"""Next-token choice: repetition penalty, temperature, top-k, top-p, min-p, then greedy or seeded sampling.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv2cli.errors import InputError

# Outside these, float32 logits overflow (a temperature of 1e-45 divides them into inf) or the setting means nothing.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
MIN_PENALTY, MAX_PENALTY = 1e-3, 1e3


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InputError(f"`{name}` must be a finite number, got {value}")
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise InputError(
                f"`temperature` must be 0 or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}, got {self.temperature}",
                hint="use 0 for greedy decoding",
            )
        if not 0 < self.top_p <= 1:
            raise InputError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"`top_k` must be >= 0, got {self.top_k}", hint="0 turns it off")
        if not 0 <= self.min_p < 1:
            raise InputError(f"`min_p` must be in [0, 1), got {self.min_p}")
        if not MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise InputError(
                f"`repetition_penalty` must be between {MIN_PENALTY} and {MAX_PENALTY:g}, got {self.repetition_penalty}",
                hint="1.0 turns it off",
            )
        if self.seed is not None and not 0 <= self.seed < 1 << 63:
            raise InputError(f"`seed` must be between 0 and 2**63 - 1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on ``logits [B, V]`` for tokens marked in ``seen [B, V]`` (bool): divide positive, multiply negative."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's penalties on ``logits [B, V]`` from ``counts [B, V]``, how often each token was generated so far:
    ``logits - frequency * count - presence * (count > 0)``."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - frequency * counts.to(logits.dtype) - presence * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p on ``logits [B, V]``; removed entries become -inf."""
    logits = logits / params.temperature if params.temperature > 0 else logits.clone()
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token while the mass before it is below top_p (the top token is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator] | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row from float32 ``logits [B, V]`` -> ``[B]``; one generator per row keeps rows reproducible."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return (
        torch.cat([torch.multinomial(probs[i : i + 1].cpu(), 1, generator=g) for i, g in enumerate(generators)])
        .view(-1)
        .to(logits.device)
    )


def row_generators(seed: int | None, rows: list[int]) -> list[torch.Generator] | None:
    """One CPU generator per row, seeded by ``seed`` and the row's index in the whole input."""
    if seed is None:
        return None
    return [torch.Generator().manual_seed(seed * 1_000_003 + row) for row in rows]
