"""A chat with the model, turn by turn: the history, the chat template, one :class:`Generation` per answer.

The terminal loop (reading lines, ``/clear`` and ``/exit``, printing, Ctrl-C) is the CLI's; this is the
conversation it drives: :meth:`Conversation.ask` returns the answer's generation to iterate, and an
answer enters the history when the caller hands it back (:meth:`Conversation.answered`), so that an
answer stopped half-way is kept as far as it got.
"""

from __future__ import annotations

from dsv2cli.errors import InputError
from dsv2cli.inference.compiled import CompiledDecoder
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.inference.inputs import chat_prompt
from dsv2cli.inference.session import LoadedModel


class Conversation:
    """The messages so far (after an optional system message) and how to generate the next answer."""

    def __init__(
        self,
        loaded: LoadedModel,
        options: GenerationOptions,
        system: str | None = None,
        decoder: CompiledDecoder | None = None,
    ) -> None:
        if loaded.tokenizer is None:
            raise InputError("`interactive` needs a checkpoint with a tokenizer")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.options = options
        self.system = system
        self.decoder = decoder
        self.history: list[dict[str, str]] = []
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> Generation:
        """The user says ``text``: the generation of the answer, to iterate for its tokens."""
        self.history.append({"role": "user", "content": text})
        prompt = chat_prompt(self.tokenizer, self.history)
        request = GenerationRequest(self.tokenizer.encode(prompt, add_bos=False), prompt, 0)
        return Generation(self.loaded.model, [request], self.options, self.tokenizer, self.decoder)

    def answered(self, text: str) -> None:
        """The model's answer (all of it, or as far as it got) joins the history."""
        self.history.append({"role": "assistant", "content": text})
