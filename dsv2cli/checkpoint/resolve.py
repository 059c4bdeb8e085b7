"""Turning what a user typed as MODEL into a config, and for commands that need weights, a directory.

MODEL may be a local checkpoint directory (HF layout, or dsv2's native layout), a ``config.json``,
a preset name (configuration only), the bundled demo model (``demo``), or a Hugging Face repo id
(``owner/name``), resolved through the local HF cache and downloaded when allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import InputError
from dsv2cli.presets import PRESETS, preset_config

DEMO_NAME = "demo"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedConfig:
    name: str
    source: str  # "preset", "directory", "file", "bundled" or "hub"
    config: ModelConfig
    directory: Path | None = None


def bundled_model_dir() -> Path | None:
    """The bundled demo model's directory, or None when this install has none."""
    directory = Path(str(resources.files("dsv2cli") / "assets" / DEMO_NAME))
    return directory if (directory / "config.json").is_file() else None


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).expanduser().exists()


def resolve_config(spec: str) -> ResolvedConfig:
    """A local directory or ``config.json``, the bundled model, a preset, or a Hub repo id (config only)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ResolvedConfig(path.name or str(path), "directory", load_config(path), path)
    if path.is_file():
        return ResolvedConfig(str(path), "file", load_config(path), path.parent)
    if spec == DEMO_NAME and bundled_model_dir() is not None:
        directory = bundled_model_dir()
        assert directory is not None
        return ResolvedConfig(DEMO_NAME, "bundled", load_config(directory), directory)
    if spec.lower() in PRESETS:
        return ResolvedConfig(spec.lower(), "preset", preset_config(spec))
    if looks_like_repo_id(spec):
        from dsv2cli.checkpoint.hub import fetch_config

        config_path = fetch_config(spec)
        return ResolvedConfig(spec, "hub", load_config(config_path), config_path.parent)
    raise InputError(
        f"'{spec}' is not a directory, a config.json, a preset or a Hugging Face repo id",
        hint=f"presets: {', '.join(PRESETS)}",
    )


def resolve_checkpoint(spec: str | None, download: bool = True) -> tuple[str, Path]:
    """``(name, directory)`` of a checkpoint with weights: a local directory, ``demo``, or a Hub repo id.

    With no ``spec`` the bundled demo model is used when this install has one.
    """
    if spec is None:
        directory = bundled_model_dir()
        if directory is None:
            raise InputError(
                "no --model given and this install has no bundled demo model", hint="pass --model DIR or --model owner/name"
            )
        return DEMO_NAME, directory
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.name or str(path), path
    if path.exists():
        raise InputError(f"'{spec}' is a file, not a checkpoint directory", hint="pass the directory that holds config.json")
    if spec == DEMO_NAME and bundled_model_dir() is not None:
        return DEMO_NAME, bundled_model_dir()  # type: ignore[return-value]
    if spec.lower() in PRESETS:
        raise InputError(
            f"'{spec}' is a preset (a configuration without weights)",
            hint="pass a checkpoint directory, a Hub repo id, or 'demo' for the bundled model",
        )
    if looks_like_repo_id(spec):
        from dsv2cli.checkpoint.hub import fetch_checkpoint, hub_offline

        return spec, fetch_checkpoint(spec, download=download and not hub_offline())
    raise InputError(f"model '{spec}' not found: not a directory, 'demo' or a Hugging Face repo id (owner/name)")
