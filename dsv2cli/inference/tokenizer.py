"""The one tokenizer layer: a ``tokenizer.json`` through the ``tokenizers`` library and its special tokens.

BOS/EOS come from ``tokenizer_config.json``, then ``generation_config.json``, then ``config.json``;
``add_bos_token`` and ``chat_template`` from ``tokenizer_config.json``. A tokenizer without those files (one
``dsv2 train`` just trained, or a bare ``tokenizer.json`` given to it) finds BOS/EOS by their common spellings.
Training a tokenizer from text is ``dsv2cli.training.tokenizer``'s job; reading one is this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dsv2cli.errors import CheckpointError, InputError
from dsv2cli.untrusted import Fields, is_int, read_json

# BOS / EOS spellings looked for in a tokenizer that no JSON file describes: DeepSeek's first.
BOS_SPELLINGS = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
EOS_SPELLINGS = ("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>")


def _read_json(path: Path) -> Fields:
    """A checkpoint's JSON file as checked fields (an absent file reads as an empty object)."""
    data = read_json(path, CheckpointError, max_bytes=16 << 20) if path.is_file() else {}
    return Fields(data, path.name, CheckpointError)


def _token_text(fields: Fields, key: str) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
    value = fields.data.get(key)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if value is None or isinstance(value, str):
        return value
    raise fields.fail(key, "must be a string or an object with a 'content' string")


def _token_ids(fields: Fields, key: str) -> list[int]:
    value = fields.data.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(is_int(v) and 0 <= v < 1 << 31 for v in values):
        raise fields.fail(key, "must be a token id (a non-negative integer) or a list of them")
    return values


def _chat_template(fields: Fields) -> str | None:
    template = fields.data.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        if not all(isinstance(t, dict) for t in template):
            raise fields.fail("chat_template", "must be a string or a list of {name, template} objects")
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise fields.fail("chat_template", "must be a string")
    return template


# generation_config.json fields dsv2 uses as sampling defaults, with what each must be.
_GENERATION_DEFAULTS = {
    "temperature": (0.0, None),
    "top_p": (0.0, 1.0),
    "top_k": (0, None),
    "repetition_penalty": (0.0, None),
}


def _generation_defaults(gen: Fields) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for key, (low, high) in _GENERATION_DEFAULTS.items():
        if gen.data.get(key) is not None:
            defaults[key] = gen.int(key, low, high) if key == "top_k" else gen.float(key, low, high)
    if gen.data.get("do_sample") is not None:
        defaults["do_sample"] = gen.bool("do_sample")
    if defaults.get("repetition_penalty") == 0 or defaults.get("top_p") == 0:
        raise gen.fail("repetition_penalty" if defaults.get("repetition_penalty") == 0 else "top_p", "must be positive")
    return defaults


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
    """Collect BOS/EOS ids, ``add_bos_token`` and the chat template from a checkpoint directory.

    Every field used is type-checked; a wrong one is a :class:`CheckpointError` naming the file and field.
    """
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    gen_cfg = _read_json(directory / "generation_config.json")
    model_cfg = _read_json(directory / "config.json")
    bos_text, eos_text = _token_text(tok_cfg, "bos_token"), _token_text(tok_cfg, "eos_token")

    def lookup(text: str | None) -> int | None:
        return tokenizer.token_to_id(text) if (tokenizer is not None and text) else None

    bos = lookup(bos_text)
    if bos is None:
        bos = next(iter(_token_ids(gen_cfg, "bos_token_id") or _token_ids(model_cfg, "bos_token_id")), None)
    eos_ids: list[int] = []
    eos_lookup = lookup(eos_text)
    if eos_lookup is not None:
        eos_ids.append(eos_lookup)
    for source in (gen_cfg, model_cfg):
        for value in _token_ids(source, "eos_token_id"):
            if value not in eos_ids:
                eos_ids.append(value)
        if eos_ids:
            break
    pad = next(iter(_token_ids(gen_cfg, "pad_token_id") or _token_ids(model_cfg, "pad_token_id")), None)
    if tokenizer is not None:
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, ids in (("bos_token_id", [bos]), ("eos_token_id", eos_ids), ("pad_token_id", [pad])):
            if any(i is not None and i >= size for i in ids):
                raise CheckpointError(
                    f"{name} {ids} is outside the tokenizer's {size} tokens", hint="check the checkpoint's JSON files"
                )
        bos_text = bos_text or (tokenizer.id_to_token(bos) if bos is not None else None)
        eos_text = eos_text or (tokenizer.id_to_token(eos_ids[0]) if eos_ids else None)
    return SpecialTokens(
        bos_token_id=bos,
        eos_token_ids=tuple(eos_ids),
        pad_token_id=pad,
        bos_token=bos_text,
        eos_token=eos_text,
        add_bos_token=tok_cfg.bool("add_bos_token", default=True, optional=True),
        chat_template=_chat_template(tok_cfg),
        generation_defaults=_generation_defaults(gen_cfg),
    )


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise CheckpointError(f"could not read {path}: {exc}", hint="the file may be corrupt") from exc


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
        tokenizer = _read_tokenizer(path)
        return cls(tokenizer, read_special_tokens(directory, tokenizer))

    @classmethod
    def from_path(cls, path: Path) -> TextTokenizer:
        """The tokenizer of a directory holding ``tokenizer.json``, or of that file itself (missing: an error)."""
        directory, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not file.is_file():
            raise InputError(f"no tokenizer.json at {file}", hint="pass the directory of a trained model or a tokenizer.json")
        found = cls.from_directory(directory) if file.name == "tokenizer.json" else None
        if found is None:
            found = cls.bare(_read_tokenizer(file))
        if found.special.bos_token_id is None and not found.special.eos_token_ids:
            found = cls.bare(found.tokenizer)
        return found

    @classmethod
    def bare(cls, tokenizer: Tokenizer) -> TextTokenizer:
        """A tokenizer no JSON file describes: BOS and EOS by their common spellings, BOS added."""

        def find(spellings: tuple[str, ...]) -> int | None:
            return next((i for i in map(tokenizer.token_to_id, spellings) if i is not None), None)

        bos, eos = find(BOS_SPELLINGS), find(EOS_SPELLINGS)
        special = SpecialTokens(
            bos_token_id=bos,
            eos_token_ids=() if eos is None else (eos,),
            bos_token=None if bos is None else tokenizer.id_to_token(bos),
            eos_token=None if eos is None else tokenizer.id_to_token(eos),
        )
        return cls(tokenizer, special)

    @property
    def bos_id(self) -> int | None:
        return self.special.bos_token_id

    @property
    def eos_id(self) -> int | None:
        """The first end-of-sequence id (the one training appends)."""
        return self.special.eos_token_ids[0] if self.special.eos_token_ids else None

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
