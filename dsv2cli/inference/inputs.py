"""Prompts from arguments, stdin or an input file (plain lines or JSON lines), turned into token ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv2cli.errors import InputError
from dsv2cli.inference.chat import DEEPSEEK_V2_TEMPLATE, render_chat, validate_messages
from dsv2cli.inference.engine import GenerationRequest
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.text_files import JSONL_SUFFIX, FoundFile, json_lines, read_text
from dsv2cli.untrusted import check_text, is_int


@dataclass(frozen=True)
class PromptInput:
    """One prompt: plain text, chat messages, or token ids (exactly one is set)."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None


def parse_token_ids(value: str) -> list[int]:
    """``"1, 2,3"`` -> ``[1, 2, 3]``."""
    try:
        ids = [int(part) for part in value.replace(",", " ").split()]
    except ValueError as exc:
        raise InputError(f"token ids must be integers separated by commas or spaces, got {value!r}") from exc
    if not ids:
        raise InputError("no token ids given")
    return ids


def _prompt_of(record: dict, where: str) -> PromptInput:
    keys = [k for k in ("prompt", "messages", "prompt_token_ids") if k in record]
    if len(keys) != 1:
        raise InputError(f"{where}: needs exactly one of 'prompt', 'messages' or 'prompt_token_ids'")
    if keys[0] == "prompt":
        if not isinstance(record["prompt"], str):
            raise InputError(f"{where}: 'prompt' must be a string")
        return PromptInput(text=record["prompt"])
    if keys[0] == "messages":
        return PromptInput(messages=validate_messages(record["messages"]))
    ids = record["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(is_int(i) and 0 <= i < 1 << 31 for i in ids):
        raise InputError(f"{where}: 'prompt_token_ids' must be a non-empty list of integers")
    return PromptInput(token_ids=ids)


def read_input_file(path: Path) -> list[PromptInput]:
    """One prompt per line, or JSON lines (``.jsonl`` files, or files whose lines all start with ``{``)."""
    if not path.is_file():
        raise InputError(f"input file {path} not found")
    text = read_text(FoundFile(path, named=True)) or ""
    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not numbered:
        raise InputError(f"input file {path} has no prompts", hint="write one prompt per line, or JSON lines")
    if path.suffix == JSONL_SUFFIX or all(line.lstrip().startswith("{") for _, line in numbered):
        return [_prompt_of(record, f"{path}:{n}") for n, record in json_lines(text, path)]
    return [PromptInput(text=line) for _, line in numbered]


def to_requests(
    inputs: list[PromptInput],
    tokenizer: TextTokenizer | None,
    chat: bool = False,
    system: str | None = None,
) -> list[GenerationRequest]:
    """Token ids for every prompt; ``chat`` wraps plain text as a user message (after ``system``)."""
    requests = []
    if system is not None:
        check_text(system, "`system`")
    for index, item in enumerate(inputs):
        for text in [item.text or "", *(m["content"] for m in item.messages or [])]:
            check_text(text, f"prompt {index + 1}")
        if item.token_ids is not None:
            requests.append(GenerationRequest(list(item.token_ids), None, index))
            continue
        if tokenizer is None:
            raise InputError(
                "this checkpoint has no tokenizer.json, so prompts must be token ids",
                hint='use `token_ids="1,2,3"` or JSON lines with "prompt_token_ids"',
            )
        messages = item.messages
        if messages is None and chat:
            messages = [{"role": "user", "content": item.text or ""}]
        if messages is not None:
            if system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *messages]
            text = chat_prompt(tokenizer, messages)
            requests.append(GenerationRequest(tokenizer.encode(text, add_bos=False), text, index))
        else:
            if not item.text:
                raise InputError(f"prompt {index + 1} is empty")
            requests.append(GenerationRequest(tokenizer.encode(item.text), item.text, index))
    return requests


def chat_prompt(tokenizer: TextTokenizer, messages: list[dict[str, str]]) -> str:
    """The checkpoint's chat template (DeepSeek-V2's when it has none) rendered for generation."""
    special = tokenizer.special
    template = special.chat_template or DEEPSEEK_V2_TEMPLATE
    return render_chat(template, messages, special.bos_token, special.eos_token, add_generation_prompt=True)
