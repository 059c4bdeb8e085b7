"""Loss of a saved model on a text, next to the entropy of the text's own token frequencies; whether code compiles.

The unigram entropy is the best any model that ignores context could do on that very text, so a
loss well below it means the model uses the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.errors import InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2
from dsv2cli.training.data import pack


@dataclass(frozen=True)
class TextEvaluation:
    tokens: int  # next-token targets scored
    loss: float  # mean cross-entropy, nats/token
    perplexity: float
    unigram_entropy: float  # entropy of the text's own token frequencies, nats/token

    def to_json(self) -> dict[str, float | int]:
        return {"tokens": self.tokens, "loss": self.loss, "perplexity": self.perplexity, "unigram_entropy": self.unigram_entropy}


@torch.no_grad()
def summed_loss(model: DeepseekV2, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Next-token cross-entropy summed over every target of packed ``rows [R, S+1]``, ``batch_size`` rows at a time."""
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    return total


@torch.no_grad()
def evaluate_text(directory: Path, text: str, seq_len: int, batch_size: int = 8) -> TextEvaluation:
    """Pack ``BOS text EOS`` into rows of ``seq_len + 1`` like training does and score every row (float32)."""
    tokenizer = TextTokenizer.from_path(directory)
    rows = pack([tokenizer.encode(text, add_bos=False)], seq_len, tokenizer.bos_id, tokenizer.eos_id)  # [R, S+1]
    if len(rows) == 0:
        raise InputError(f"the text is shorter than one sequence of {seq_len} tokens")
    model = load_checkpoint(directory)
    total = summed_loss(model, rows, batch_size)
    targets = rows[:, 1:].reshape(-1)
    counts = torch.bincount(targets).double()
    probs = counts[counts > 0] / targets.numel()
    loss = total / targets.numel()
    return TextEvaluation(targets.numel(), loss, math.exp(loss), float(-(probs * probs.log()).sum()))


def first_statement_compiles(header: str, continuation: str) -> bool:
    """Whether a ``def``/``class`` header and the start of its generated body compile with Python's ``compile()``.

    The header plus the longest prefix of the continuation's complete lines (at least one non-blank body
    line) is tried; a line cut off by the token limit is never counted.
    """
    lines = [line for line in (header + continuation).splitlines(keepends=True) if line.endswith("\n")]
    for k in range(len(lines), 1, -1):
        if not any(line.strip() for line in lines[1:k]):
            continue
        try:
            compile("".join(lines[:k]), "<generated>", "exec")
        except (SyntaxError, ValueError):
            continue
        return True
    return False
