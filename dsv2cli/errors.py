"""One exception family for expected failures.

The CLI maps every :class:`DSV2Error` to ``Error: <message>`` plus an optional
hint on stderr and exit code 1. Anything else is a bug and keeps its traceback.

Errors name the parameter they are about in backticks, as the caller of the function
knows it: "`max_new_tokens` must be at least 1", "decode eagerly (`compile=False`)".
The CLI shows each named field as its flag (``--max-new-tokens``, ``--no-compile``;
``dsv2cli/cli/common.py``), so core code never writes command-line spellings.
"""

from __future__ import annotations

import re

# A field named in a message: `name` or `name=value`.
FIELD = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`\s]*))?`")


class DSV2Error(Exception):
    """An expected failure that a user can act on."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def fields(self) -> tuple[str, ...]:
        """The parameters the message and hint name (in backticks), in order of appearance."""
        names = [m.group(1) for text in (self.message, self.hint or "") for m in FIELD.finditer(text)]
        return tuple(dict.fromkeys(names))


class ConfigError(DSV2Error):
    """A model configuration that is malformed or asks for something unsupported."""


class CheckpointError(DSV2Error):
    """Checkpoint files that are missing, corrupt, pickled or do not match the config."""


class UnsupportedError(DSV2Error):
    """A feature or value this toolkit does not implement."""


class InputError(DSV2Error):
    """Bad user input: options, prompts, files."""
