"""Turning what a user typed for MODEL into a config (and, for commands that need weights, a directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import InputError
from dsv2cli.presets import PRESETS, preset_config


@dataclass(frozen=True)
class ResolvedConfig:
    name: str
    source: str  # "preset", "directory" or "file"
    config: ModelConfig
    directory: Path | None = None


def resolve_config(spec: str) -> ResolvedConfig:
    """A local directory or ``config.json``, else a preset name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ResolvedConfig(path.name or str(path), "directory", load_config(path), path)
    if path.is_file():
        return ResolvedConfig(str(path), "file", load_config(path), path.parent)
    if spec.lower() in PRESETS:
        return ResolvedConfig(spec.lower(), "preset", preset_config(spec))
    raise InputError(
        f"'{spec}' is not a directory, a config.json or a preset",
        hint=f"presets: {', '.join(PRESETS)}",
    )
