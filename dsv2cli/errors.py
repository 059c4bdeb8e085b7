"""One exception family for expected failures.

The CLI maps every :class:`DSV2Error` to ``Error: <message>`` plus an optional
hint on stderr and exit code 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DSV2Error(Exception):
    """An expected failure that a user can act on."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(DSV2Error):
    """A model configuration that is malformed or asks for something unsupported."""


class CheckpointError(DSV2Error):
    """Checkpoint files that are missing, corrupt, pickled or do not match the config."""


class UnsupportedError(DSV2Error):
    """A feature or value this toolkit does not implement."""


class InputError(DSV2Error):
    """Bad user input: options, prompts, files."""
