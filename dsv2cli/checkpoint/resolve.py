"""Turning what a user typed as MODEL into a config and, for commands that need weights, a directory.

MODEL may be a local checkpoint directory (HF layout, or dsv2's native layout), a ``config.json``,
a preset name (configuration only), the bundled demo model (``demo``), or a Hugging Face repo id
(``owner/name``), resolved through the local HF cache and downloaded unless ``HF_HUB_OFFLINE`` says
otherwise. Every command resolves its model here:

* :func:`resolve_config`: the config of any MODEL (``info``, ``cache-report``);
* :func:`resolve_checkpoint`: the directory of a MODEL with weights (``generate``, ``convert``, ...);
* :func:`resolve_hf_config`: the ``config.json`` object of a comparison baseline, which may be any
  Llama-style model as well as a DeepSeek-V2 one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dsv2cli.checkpoint import hub
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import ConfigError, InputError
from dsv2cli.presets import BASELINE_PRESETS, PRESETS, preset_config, preset_hf_config
from dsv2cli.untrusted import read_json

DEMO_NAME = "demo"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_MAX_CONFIG_BYTES = 1 << 20


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
    demo = bundled_model_dir() if spec == DEMO_NAME else None
    if demo is not None:
        return ResolvedConfig(DEMO_NAME, "bundled", load_config(demo), demo)
    if spec.lower() in PRESETS:
        return ResolvedConfig(spec.lower(), "preset", preset_config(spec))
    if looks_like_repo_id(spec):
        config_path = hub.fetch_config(spec)
        return ResolvedConfig(spec, "hub", load_config(config_path), config_path.parent)
    raise InputError(
        f"'{spec}' is not a directory, a config.json, a preset or a Hugging Face repo id",
        hint=f"presets: {', '.join(PRESETS)}",
    )


def resolve_checkpoint(spec: str | None, download: bool = True, what: str = "`model`") -> tuple[str, Path]:
    """``(name, directory)`` of a checkpoint with weights: a local directory, ``demo``, or a Hub repo id.

    With no ``spec`` the bundled demo model is used when this install has one. A repo id is fetched
    through the HF cache, downloaded when ``download`` and ``HF_HUB_OFFLINE`` allow. ``what`` names the
    parameter in errors: the ``model`` field by default (the CLI shows it as ``--model``), or ``source``.
    """
    if spec is None:
        directory = bundled_model_dir()
        if directory is None:
            raise InputError(
                f"no {what} given and this install has no bundled demo model",
                hint="pass a checkpoint directory or a Hub repo id (owner/name)",
            )
        return DEMO_NAME, directory
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.name or str(path), path
    if path.exists():
        raise InputError(f"'{spec}' is a file, not a checkpoint directory", hint="pass the directory that holds config.json")
    demo = bundled_model_dir() if spec == DEMO_NAME else None
    if demo is not None:
        return DEMO_NAME, demo
    if spec.lower() in PRESETS:
        raise InputError(
            f"'{spec}' is a preset (a configuration without weights)",
            hint="pass a checkpoint directory, a Hub repo id, or 'demo' for the bundled model",
        )
    if looks_like_repo_id(spec):
        return spec, hub.fetch_checkpoint(spec, download=download and not hub.hub_offline())
    raise InputError(
        f"{what} '{spec}' not found: not a checkpoint directory, 'demo' or a Hugging Face repo id (owner/name)",
        hint="pass a directory with config.json and *.safetensors, or owner/name",
    )


def resolve_hf_config(spec: str) -> tuple[str, dict[str, Any]]:
    """``(name, config.json object)`` of a baseline preset (``deepseek-67b``), a dsv2 preset, or a
    ``config.json`` (a path, a directory holding one, or a Hub repo id) of any model; not checked further."""
    key = spec.lower()
    if key in BASELINE_PRESETS:
        return key, dict(BASELINE_PRESETS[key])
    if key in PRESETS:
        return key, preset_hf_config(key)
    path = Path(spec).expanduser()
    name = path.name
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file() and looks_like_repo_id(spec):
        path, name = hub.fetch_config(spec), spec
    if not path.is_file():
        raise InputError(
            f"baseline '{spec}' is not a preset, a config.json, a directory holding one or a Hub repo id",
            hint=f"baseline presets: {', '.join(BASELINE_PRESETS)}; or any dsv2 preset",
        )
    hf = read_json(path, ConfigError, max_bytes=_MAX_CONFIG_BYTES)
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return name or spec, hf
