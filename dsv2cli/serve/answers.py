"""One request's answer in OpenAI's documents: a whole ``chat.completion`` / ``text_completion``, or stream chunks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsv2cli.serve.batch import Done, TokenOut
from dsv2cli.serve.protocol import finish_reason, new_id, now, usage


class Answer:
    """One request's answer as OpenAI's documents: a whole ``chat.completion`` / ``text_completion``, or chunks."""

    def __init__(self, kind: str, model: str, logprobs: bool, token_text: Callable[[int], str]) -> None:
        self.kind, self.model, self.logprobs, self.token_text = kind, model, logprobs, token_text
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = now()
        self.text: list[str] = []
        self.events: list[TokenOut] = []
        self.finish: str | None = None

    def add(self, event: TokenOut) -> None:
        self.text.append(event.text)
        self.events.append(event)
        self.finish = event.finished

    def _chat_logprobs(self, events: list[TokenOut]) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in events]}

    def _text_logprobs(self, events: list[TokenOut], offset: int) -> dict[str, Any]:
        tokens = [self.token_text(e.token_id) for e in events]
        offsets = []
        for e in events:
            offsets.append(offset)
            offset += len(e.text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in events],
            "text_offset": offsets,
        }

    def _logprobs(self, events: list[TokenOut], offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return self._chat_logprobs(events) if self.kind == "chat" else self._text_logprobs(events, offset)

    def whole(self, done: Done) -> dict[str, Any]:
        text = "".join(self.text)
        reason = finish_reason(self.finish or done.finish_reason)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self._logprobs(self.events)}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(self.events)}
            kind = "text_completion"
        choice["finish_reason"] = reason
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
        }

    def chunk(self, delta: dict[str, Any] | str, logprobs: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def token_chunk(self, event: TokenOut) -> dict[str, Any]:
        offset = sum(len(t) for t in self.text)
        self.add(event)
        delta: dict[str, Any] | str = {"content": event.text} if self.kind == "chat" else event.text
        return self.chunk(delta, self._logprobs([event], offset), finish_reason(event.finished))

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
        }
