"""Reading JSON that came from elsewhere (checkpoints, prompts, saved state): bounded, type-checked, one error per fault.

:func:`read_json` / :func:`parse_json` bound a document's size and nesting and refuse what is not
strict JSON (``NaN``, ``Infinity``, invalid UTF-8). :class:`Fields` reads one object's fields with
their types checked; every error names the file and the field, as the given :class:`DSV2Error` kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv2cli.errors import DSV2Error, InputError

MAX_JSON_BYTES = 64 << 20  # config, index, manifest, tokenizer_config, state: far below this in any real checkpoint
MAX_DEPTH = 64  # deepest nesting accepted (a config is 3 deep, a chat template list 4)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, where: str, error: type[DSV2Error] = InputError) -> Any:
    """Parse strict JSON; ``where`` (a file name, ``line 3 of x.jsonl``) starts every error message."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    if depth(value) > MAX_DEPTH:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def read_json(path: Path, error: type[DSV2Error] = InputError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse the JSON file ``path`` (at most ``max_bytes``); errors name the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path.name}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise error(f"{path.name}: larger than {max_bytes >> 20} MiB, not a file dsv2 expects to be that large")
    return parse_json(raw, path.name, error)


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            todo.extend((x, level) for x in item)
    return deepest


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """The fields of one JSON object from ``where``; each getter checks a type and raises ``error`` naming the field."""

    def __init__(self, data: Any, where: str, error: type[DSV2Error] = InputError, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise error(f"{where}: {f'{prefix!r} ' if prefix else ''}must be a JSON object, not {_kind(data)}")
        self.data, self.where, self.error, self.prefix = data, where, error, prefix

    def fail(self, key: str, message: str) -> DSV2Error:
        return self.error(f"{self.where}: field '{self.prefix}{key}' {message}")

    def get(self, key: str, check: Callable[[Any], bool], expected: str, default: Any = ..., optional: bool = False) -> Any:
        if key not in self.data or (optional and self.data[key] is None):
            if default is ...:
                raise self.fail(key, "is missing")
            return default
        value = self.data[key]
        if not check(value):
            raise self.fail(key, f"must be {expected}, not {_describe(value)}")
        return value

    def int(self, key: str, low: int | None = None, high: int | None = None, default: Any = ..., optional: bool = False) -> Any:
        value = self.get(key, is_int, "an integer", default, optional)
        if value is not None and value is not default:
            self._range(key, value, low, high)
        return value

    def float(
        self, key: str, low: float | None = None, high: float | None = None, default: Any = ..., optional: bool = False
    ) -> Any:
        value = self.get(key, is_number, "a finite number", default, optional)
        if value is not None and value is not default:
            self._range(key, value, low, high)
            value = float(value)
        return value

    def str(self, key: str, default: Any = ..., optional: bool = False) -> Any:
        return self.get(key, lambda v: isinstance(v, str), "a string", default, optional)

    def bool(self, key: str, default: Any = ..., optional: bool = False) -> Any:
        return self.get(key, lambda v: isinstance(v, bool), "true or false", default, optional)

    def list(self, key: str, default: Any = ..., optional: bool = False) -> Any:
        return self.get(key, lambda v: isinstance(v, list), "a list", default, optional)

    def object(self, key: str, default: Any = ..., optional: bool = False) -> Any:
        return self.get(key, lambda v: isinstance(v, dict), "an object", default, optional)

    def _range(self, key: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise self.fail(key, f"must be at least {low}, not {_describe(value)}")
        if high is not None and value > high:
            raise self.fail(key, f"must be at most {high}, not {_describe(value)}")


def check_text(text: str, where: str) -> str:
    """``text`` if it can be encoded as UTF-8 (no lone surrogates, as JSON's ``\\ud800`` or a mis-decoded stdin give)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: not valid Unicode text (a lone surrogate at character {exc.start})") from None
    return text


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and math.isfinite(value))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
