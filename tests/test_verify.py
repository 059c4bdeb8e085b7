"""`dsv2 verify`: every problem named, exit 1; a sound checkpoint passes."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.verify import verify_checkpoint
from dsv2cli.cli.main import app
from tests.helpers import reference_model, save_reference

runner = CliRunner()


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return save_reference(reference_model(seed=5), tmp_path_factory.mktemp("hf") / "hf", shard_size="90KB")


@pytest.fixture(scope="module")
def native_template(hf, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("native") / "native"
    convert_checkpoint(str(hf), output, quantize="int8", probe=False)
    return output


@pytest.fixture
def native(native_template, tmp_path) -> Path:
    return Path(shutil.copytree(native_template, tmp_path / "native"))


@pytest.fixture
def hf_copy(hf, tmp_path) -> Path:
    return Path(shutil.copytree(hf, tmp_path / "hf"))


def _verify(directory: Path):
    result = runner.invoke(app, ["verify", str(directory), "--format", "json"])
    return result, json.loads(result.stdout)


def test_sound_checkpoints_pass(native, hf_copy):
    result, report = _verify(native)
    assert result.exit_code == 0 and report["ok"] and report["layout"] == "native"
    assert report["files_hashed"] == 7 and report["tensors"] == 71  # int8: lm_head.scale included
    result, report = _verify(hf_copy)
    assert result.exit_code == 0 and report["ok"] and report["layout"] == "hf" and report["tensors"] == 89


def test_text_output_names_problems_on_stderr(native):
    (native / "layer-01.safetensors").unlink()
    result = runner.invoke(app, ["verify", str(native)])
    assert result.exit_code == 1
    assert "1 problem" in result.stdout and "missing file 'layer-01.safetensors'" in result.stderr


def test_flipped_byte_fails_the_sha256(native):
    path = native / "layer-02.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    result, report = _verify(native)
    assert result.exit_code == 1 and not report["ok"]
    assert len(report["problems"]) == 1 and report["problems"][0].startswith("layer-02.safetensors: sha256 ")


def test_several_problems_are_all_named(native):
    embed = native / "embed.safetensors"
    embed.write_bytes(embed.read_bytes()[:-10])
    (native / "stray.safetensors").write_bytes(b"")
    manifest = json.loads((native / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"bytes": 3, "sha256": "0" * 64}
    (native / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_checkpoint(native).problems
    assert any(p.startswith("embed.safetensors: ") and "truncated" in p for p in problems)
    assert "stray.safetensors: not named by manifest.json" in problems
    assert "missing file 'tokenizer.json' (named by manifest.json)" in problems


def test_tensor_with_the_wrong_dtype_and_shape(native):
    path = native / "layer-01.safetensors"
    tensors = load_file(str(path))
    tensors["layers.1.mlp.experts.down_proj"] = tensors["layers.1.mlp.experts.down_proj"].float()
    tensors["layers.1.input_layernorm.weight"] = torch.ones(3)
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = json.loads((native / "manifest.json").read_text())
    manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (native / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_checkpoint(native).problems
    assert "layer-01.safetensors: tensor 'layers.1.mlp.experts.down_proj' has dtype F32; expected I8" in problems
    assert "layer-01.safetensors: tensor 'layers.1.input_layernorm.weight' has shape [3], config needs [64]" in problems
    assert any("differs from manifest.json" in p for p in problems)


def test_hf_index_must_match_the_shards(hf_copy):
    index_path = hf_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = "model.layers.0.mlp.up_proj.weight"
    del index["weight_map"][moved]
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    (hf_copy / "model-extra.safetensors").write_bytes((hf_copy / "model-00001-of-00011.safetensors").read_bytes())
    problems = verify_checkpoint(hf_copy).problems
    assert "missing shard 'model-00001-of-00099.safetensors' (named by model.safetensors.index.json)" in problems
    assert any(p.endswith(f"tensor '{moved}' is not listed in model.safetensors.index.json") for p in problems)
    assert "model-extra.safetensors: not named by model.safetensors.index.json" in problems


def test_not_a_checkpoint(tmp_path):
    result, report = _verify(tmp_path)
    assert result.exit_code == 1 and "no config.json" in report["problems"][0]
