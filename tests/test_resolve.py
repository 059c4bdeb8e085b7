"""checkpoint/resolve.py: what a user typed as MODEL (or SOURCE, or a baseline) becomes a config or a directory."""

import json

import pytest

from dsv2cli.checkpoint import resolve
from dsv2cli.checkpoint.resolve import resolve_checkpoint, resolve_config, resolve_hf_config
from dsv2cli.errors import ConfigError, InputError
from dsv2cli.presets import preset_hf_config


def test_presets_and_directories(tmp_path):
    assert resolve_config("Tiny").source == "preset" and resolve_config("Tiny").name == "tiny"
    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("tiny")))
    resolved = resolve_config(str(tmp_path))
    assert (resolved.source, resolved.directory) == ("directory", tmp_path)
    assert resolve_config(str(tmp_path / "config.json")).source == "file"
    assert resolve_checkpoint(str(tmp_path)) == (tmp_path.name, tmp_path)


def test_a_checkpoint_needs_weights(tmp_path):
    with pytest.raises(InputError, match="is a preset"):
        resolve_checkpoint("tiny")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="is a file"):
        resolve_checkpoint(str(tmp_path / "config.json"))
    with pytest.raises(InputError, match="^`model` 'no-such' not found"):
        resolve_checkpoint("no-such")
    with pytest.raises(InputError, match="^source 'no-such' not found"):
        resolve_checkpoint("no-such", what="source")


def test_no_model_means_the_bundled_one(monkeypatch, tmp_path):
    monkeypatch.setattr(resolve, "bundled_model_dir", lambda: tmp_path)
    assert resolve_checkpoint(None) == ("demo", tmp_path) == resolve_checkpoint("demo")
    monkeypatch.setattr(resolve, "bundled_model_dir", lambda: None)
    with pytest.raises(InputError, match="no `model` given"):
        resolve_checkpoint(None)


def test_baseline_configs(tmp_path):
    name, hf = resolve_hf_config("DeepSeek-67B")
    assert name == "deepseek-67b" and hf["num_key_value_heads"] == 8
    assert resolve_hf_config("tiny") == ("tiny", preset_hf_config("tiny"))
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert resolve_hf_config(str(tmp_path)) == (tmp_path.name, {"num_hidden_layers": 2})
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="JSON object"):
        resolve_hf_config(str(tmp_path / "list.json"))
    with pytest.raises(InputError, match="baseline 'nothing' is not a preset"):
        resolve_hf_config("nothing")


def test_repo_ids_are_told_from_paths(tmp_path, monkeypatch):
    assert resolve.looks_like_repo_id("deepseek-ai/DeepSeek-V2-Lite")
    assert not resolve.looks_like_repo_id("tiny") and not resolve.looks_like_repo_id("a/b/c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert not resolve.looks_like_repo_id("owner/name")  # an existing path wins
