"""Token sequences for routing analysis: text files and directories, or JSON lines, cut to a sequence length.

* A text file (or every UTF-8 file under a directory, hidden paths skipped) is tokenised on its own
  and cut into consecutive sequences of ``seq_len`` tokens; the last one may be shorter. Files are
  never packed together, so no sequence attends across a file boundary.
* A ``.jsonl`` file holds one object per line with ``text`` (tokenised) or ``prompt_token_ids``;
  each line is its own sequence (cut into ``seq_len`` pieces when longer), lines are never packed.

``max_tokens`` stops reading once that many tokens were collected (the last sequence is cut short).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv2cli.errors import InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.text_files import JSONL_SUFFIX, find_files, json_lines, read_text
from dsv2cli.untrusted import check_text, is_int


@dataclass(frozen=True)
class TokenSequence:
    """One sequence the model reads on its own; ``source`` is ``path`` or ``path:line``."""

    token_ids: list[int]
    source: str


@dataclass(frozen=True)
class SequenceSet:
    sequences: list[TokenSequence]
    files: int  # files that contributed at least one token
    skipped_files: int  # files under a directory that were not UTF-8 text
    truncated: bool  # max_tokens stopped the reading early

    @property
    def tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def lengths(self) -> list[int]:
        return [len(s.token_ids) for s in self.sequences]


def read_sequences(
    inputs: list[Path],
    tokenizer: TextTokenizer | None,
    vocab_size: int,
    seq_len: int,
    max_tokens: int | None = None,
) -> SequenceSet:
    """Tokenise ``inputs`` (files, directories or globs) into sequences of at most ``seq_len`` tokens."""
    if seq_len < 1:
        raise InputError(f"`seq_len` must be at least 1, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"`max_tokens` must be at least 1, got {max_tokens}")
    if not inputs:
        raise InputError("no input given", hint="pass text files, directories or .jsonl files")
    collector = _Collector(seq_len, max_tokens)
    skipped = 0
    for file in find_files(inputs):
        if collector.full:
            collector.truncated = True
            break
        text = read_text(file)
        if text is None:
            skipped += 1
            continue
        if not text.strip():
            if file.named:
                raise InputError(f"input file {file.path} is empty", hint="pass a file with text in it")
            continue
        if file.path.suffix == JSONL_SUFFIX:
            for number, ids in _jsonl_records(file.path, text, tokenizer):
                collector.add(ids, f"{file.path}:{number}", file.path, vocab_size)
        else:
            collector.add(_encode(tokenizer, text, str(file.path)), str(file.path), file.path, vocab_size)
    if not collector.sequences:
        raise InputError(f"no text found in {', '.join(map(str, inputs))}", hint="pass UTF-8 text files or .jsonl files")
    return SequenceSet(collector.sequences, len(collector.files), skipped, collector.truncated)


class _Collector:
    """Cuts each token stream into ``seq_len`` pieces until ``max_tokens`` are held."""

    def __init__(self, seq_len: int, max_tokens: int | None) -> None:
        self.seq_len = seq_len
        self.left = max_tokens
        self.sequences: list[TokenSequence] = []
        self.files: set[Path] = set()
        self.truncated = False

    @property
    def full(self) -> bool:
        return self.left is not None and self.left <= 0

    def add(self, ids: list[int], source: str, file: Path, vocab_size: int) -> None:
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise InputError(f"{source}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
        if self.left is not None:
            self.truncated |= len(ids) > self.left
            ids = ids[: self.left]
            self.left -= len(ids)
        for start in range(0, len(ids), self.seq_len):
            self.sequences.append(TokenSequence(ids[start : start + self.seq_len], source))
        if ids:
            self.files.add(file)


def _encode(tokenizer: TextTokenizer | None, text: str, source: str) -> list[int]:
    if tokenizer is None:
        raise InputError(
            f"{source}: this checkpoint has no tokenizer.json, so text cannot be tokenised",
            hint='give token ids as JSON lines: {"prompt_token_ids": [1, 2, 3]}',
        )
    return tokenizer.encode(check_text(text, source))


def _jsonl_records(file: Path, text: str, tokenizer: TextTokenizer | None) -> list[tuple[int, list[int]]]:
    """``(line number, token ids)`` of every non-blank line holding ``text`` or ``prompt_token_ids``."""
    records = []
    expected = "an object with exactly one of 'text' or 'prompt_token_ids'"
    for number, record in json_lines(text, file, expected):
        where = f"{file}:{number}"
        keys = [k for k in ("text", "prompt_token_ids") if k in record]
        if len(keys) != 1:
            raise InputError(f"{where}: each line must be {expected}")
        value = record[keys[0]]
        if keys[0] == "text":
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{where}: 'text' must be a non-empty string")
            records.append((number, _encode(tokenizer, value, where)))
        else:
            if not isinstance(value, list) or not value or not all(is_int(i) for i in value):
                raise InputError(f"{where}: 'prompt_token_ids' must be a non-empty list of integers")
            records.append((number, value))
    return records
