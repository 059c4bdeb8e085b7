"""Training text: finding files, a held-out split by file, packing token ids into fixed-length sequences.

The data order is a pure function of ``(seed, step)`` (a seeded permutation per epoch), so a resumed
run sees exactly the batches the uninterrupted run would have seen without storing any iterator state.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv2cli.errors import InputError
from dsv2cli.text_files import find_files, read_text


@dataclass(frozen=True)
class TextFile:
    path: Path
    text: str


@dataclass(frozen=True)
class CorpusSplit:
    train: list[TextFile]
    held_out: list[TextFile]
    skipped: int  # files that were not UTF-8 text

    def fingerprint(self) -> str:
        """Identifies the file lists and contents, so a resume can refuse changed data."""
        digest = hashlib.sha256()
        for name, files in (("train", self.train), ("held_out", self.held_out)):
            digest.update(name.encode())
            for f in files:
                digest.update(str(f.path).encode())
                digest.update(hashlib.sha256(f.text.encode()).digest())
        return digest.hexdigest()[:16]


def read_text_files(
    inputs: list[str], include: list[str] | None = None, exclude: list[str] | None = None
) -> tuple[list[TextFile], int]:
    """The non-empty UTF-8 files ``inputs`` name (see :func:`dsv2cli.text_files.find_files`); binary files are
    skipped and counted."""
    files, skipped = [], 0
    for found in find_files(inputs, include, exclude):
        text = read_text(found)
        if text is None:
            skipped += 1
        elif text.strip():
            files.append(TextFile(found.path, text))
    return files, skipped


def load_corpus(
    inputs: list[str], held_out_fraction: float, seed: int, include: list[str] | None = None, exclude: list[str] | None = None
) -> CorpusSplit:
    """Read the text files and hold out ``held_out_fraction`` of them (at least one) for evaluation."""
    if not 0.0 < held_out_fraction < 1.0:
        raise InputError(f"`held_out` must be between 0 and 1 (exclusive), got {held_out_fraction}")
    files, skipped = read_text_files(inputs, include, exclude)
    if len(files) < 2:
        raise InputError(
            f"found {len(files)} usable text file(s) in {', '.join(inputs)} (need at least 2: one to train on, one held out)",
            hint="pass files, directories or globs of UTF-8 text; check `include` / `exclude`",
        )
    order = sorted(files, key=lambda f: str(f.path))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(order) * held_out_fraction))
    return CorpusSplit(train=order[n_held:], held_out=order[:n_held], skipped=skipped)


def pack(documents: list[list[int]], seq_len: int, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """Concatenate ``[bos] doc [eos]`` streams and cut them into rows of ``seq_len + 1`` ids -> int64 ``[R, S+1]``.

    Each row gives ``seq_len`` next-token targets; the short tail is dropped.
    """
    stream: list[int] = []
    for ids in documents:
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    rows = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: rows * (seq_len + 1)], dtype=torch.long).view(rows, seq_len + 1)


def batch_indices(num_rows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Row indices of the batch used at ``step`` (0-based): epochs are seeded permutations, never repeated inside one."""
    per_epoch = num_rows // batch_size
    if per_epoch == 0:
        raise InputError(
            f"the training text gives only {num_rows} sequences, fewer than `batch_size` {batch_size}",
            hint="add text, or lower `batch_size` / `seq_len`",
        )
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size]


def evaluation_rows(num_rows: int, max_tokens: int, seq_len: int) -> torch.Tensor:
    """Evenly spaced held-out rows holding at most ``max_tokens`` targets (all rows if they fit)."""
    wanted = max(1, min(num_rows, max_tokens // seq_len))
    return torch.linspace(0, num_rows - 1, wanted).round().long().unique()


def unigram_cross_entropy(train_rows: torch.Tensor, eval_targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``eval_targets`` under add-one smoothed unigram frequencies of the training targets."""
    counts = torch.bincount(train_rows[:, 1:].reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[eval_targets.reshape(-1)].mean())


def epochs_seen(step: int, num_rows: int, batch_size: int) -> float:
    return step * batch_size / max(num_rows, 1)
