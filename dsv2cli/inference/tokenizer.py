"""The checkpoint's tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and its special tokens.

BOS/EOS come from ``tokenizer_config.json``, then ``generation_config.json``, then ``config.json``;
``add_bos_token`` and ``chat_template`` from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dsv2cli.errors import CheckpointError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = True
    chat_template: str | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)


def read_special_tokens(directory: Path, tokenizer: Tokenizer | None = None) -> SpecialTokens:
    """Collect BOS/EOS ids, ``add_bos_token`` and the chat template from a checkpoint directory."""
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    gen_cfg = _read_json(directory / "generation_config.json")
    model_cfg = _read_json(directory / "config.json")
    bos_text, eos_text = _token_text(tok_cfg.get("bos_token")), _token_text(tok_cfg.get("eos_token"))

    def lookup(text: str | None) -> int | None:
        return tokenizer.token_to_id(text) if (tokenizer is not None and text) else None

    bos = lookup(bos_text)
    if bos is None:
        bos = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
    eos_ids: list[int] = []
    eos_lookup = lookup(eos_text)
    if eos_lookup is not None:
        eos_ids.append(eos_lookup)
    for source in (gen_cfg.get("eos_token_id"), model_cfg.get("eos_token_id")):
        for value in source if isinstance(source, list) else [source]:
            if isinstance(value, int) and value not in eos_ids:
                eos_ids.append(value)
        if eos_ids:
            break
    if tokenizer is not None:
        bos_text = bos_text or (tokenizer.id_to_token(bos) if bos is not None else None)
        eos_text = eos_text or (tokenizer.id_to_token(eos_ids[0]) if eos_ids else None)
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    defaults = {k: gen_cfg[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample") if k in gen_cfg}
    return SpecialTokens(
        bos_token_id=bos,
        eos_token_ids=tuple(eos_ids),
        pad_token_id=gen_cfg.get("pad_token_id", model_cfg.get("pad_token_id")),
        bos_token=bos_text,
        eos_token=eos_text,
        add_bos_token=bool(tok_cfg.get("add_bos_token", True)),
        chat_template=template if isinstance(template, str) else None,
        generation_defaults=defaults,
    )


class TextTokenizer:
    """Encode / decode text with the checkpoint's tokenizer; incremental decoding for streaming."""

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens) -> None:
        self.tokenizer = tokenizer
        self.special = special

    @classmethod
    def from_directory(cls, directory: Path) -> TextTokenizer | None:
        """The tokenizer of a checkpoint, or None when it ships no ``tokenizer.json``."""
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"could not read {path}: {exc}", hint="the file may be corrupt") from exc
        return cls(tokenizer, read_special_tokens(directory, tokenizer))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first when the checkpoint asks for it (chat templates carry their own)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.special.add_bos_token
        if add_bos and self.special.bos_token_id is not None and (not ids or ids[0] != self.special.bos_token_id):
            ids = [self.special.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text pieces as they arrive (holding back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer.tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tokenizer, token_id)
        return piece or ""
