"""Every problem with checkpoint files is reported in one error that names the file or tensor."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.errors import CheckpointError
from tests.helpers import reference_model, save_reference


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded")
    save_reference(reference_model(), directory, shard_size="60KB")
    return directory


@pytest.fixture
def checkpoint(sharded, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(sharded, target)
    return target


def _index(directory):
    return json.loads((directory / "model.safetensors.index.json").read_text())


def _error(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(directory)
    return info.value.message


def test_missing_shard(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"missing shard '{shard.name}'" in _error(checkpoint)


def test_truncated_shard(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    message = _error(checkpoint)
    assert shard.name in message and "truncated" in message


def test_corrupt_header(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"#" * 10
    shard.write_bytes(bytes(data))
    message = _error(checkpoint)
    assert shard.name in message and "not valid JSON" in message


def test_missing_unexpected_and_wrong_shape_in_one_error(checkpoint):
    index = _index(checkpoint)
    shard_name = index["weight_map"]["model.norm.weight"]
    shard = checkpoint / shard_name
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    victim = next(k for k in tensors if k.endswith("o_proj.weight"))
    tensors[victim] = torch.zeros(3, 3)
    save_file(tensors, str(shard))
    for name in list(index["weight_map"]):
        if name == "model.norm.weight":
            del index["weight_map"][name]
    index["weight_map"]["model.layers.0.self_attn.extra_proj.weight"] = shard_name
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    message = _error(checkpoint)
    assert "missing tensor: model.norm.weight" in message
    assert "unexpected tensor 'model.layers.0.self_attn.extra_proj.weight'" in message
    assert f"'{victim}' has shape [3, 3]" in message
    assert "3 problems" in message


def test_index_pointing_outside_directory(checkpoint):
    index = _index(checkpoint)
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    message = _error(checkpoint)
    assert "'../../etc/passwd'" in message and "outside the checkpoint directory" in message


def test_pickled_weights_are_refused_not_loaded(tmp_path, sharded):
    shutil.copy(sharded / "config.json", tmp_path / "config.json")
    sentinel = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a real pickle; must never be opened by torch.load")
    message = _error(tmp_path)
    assert "pytorch_model.bin" in message and "pickle" in message
    assert not sentinel.exists()


def test_missing_directory(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere")


def test_load_is_complete(sharded):
    model = load_hf_checkpoint(sharded)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
