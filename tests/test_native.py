"""The native layout: what the converter writes, and loading it by mapping the files."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.loader import load_checkpoint, load_hf_checkpoint
from dsv2cli.checkpoint.native import MANIFEST_NAME, read_manifest
from dsv2cli.errors import CheckpointError
from dsv2cli.model.quantized import Int8Linear, Int8RoutedExperts, quantize_int8
from tests.helpers import one_thread_per_module, reference_model, save_reference  # noqa: F401 (autouse fixture)

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    return save_reference(reference_model(seed=1), directory, shard_size="80KB")


@pytest.fixture(scope="module")
def native(hf, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("n") / "native"
    convert_checkpoint(str(hf), output, probe=False)
    return output


def _mapped_ranges(paths: list[Path]) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``paths`` (from /proc/self/maps)."""
    names = {str(p.resolve()) for p in paths}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_layout_and_manifest(native):
    names = sorted(p.name for p in native.iterdir())
    assert names == [
        "config.json",
        "embed.safetensors",
        "generation_config.json",
        "head.safetensors",
        "layer-00.safetensors",
        "layer-01.safetensors",
        "layer-02.safetensors",
        MANIFEST_NAME,
    ]
    manifest = read_manifest(native)
    assert manifest.dtype == "float32" and manifest.quantization is None
    stacked = manifest.tensors["layers.1.mlp.experts.gate_up_proj"]
    assert stacked == {"file": "layer-01.safetensors", "dtype": "F32", "shape": [8, 64, 64]}
    assert manifest.tensors["layers.2.mlp.experts.down_proj"]["shape"] == [8, 64, 32]
    assert set(manifest.files) == set(names) - {MANIFEST_NAME}
    assert all(len(record["sha256"]) == 64 for record in manifest.files.values())
    raw = json.loads((native / MANIFEST_NAME).read_text())
    assert raw["format"] == "dsv2-native" and raw["format_version"] == 1


def test_native_load_equals_hf_load_and_maps_the_files(hf, native):
    model = load_checkpoint(native)
    ranges = _mapped_ranges(sorted(native.glob("*.safetensors")))
    assert ranges, "the native files should be memory-mapped"
    for name, tensor in model.state_dict().items():
        address = tensor.data_ptr()
        assert any(start <= address < end for start, end in ranges), f"{name} was copied instead of mapped"
    with torch.no_grad():
        assert torch.equal(model(TOKENS), load_hf_checkpoint(hf)(TOKENS))


def test_dtype_argument(native):
    model = load_checkpoint(native, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float32


def test_bfloat16_native_keeps_its_dtype_and_router(hf, tmp_path):
    convert_checkpoint(str(hf), tmp_path / "bf16", dtype="bfloat16", probe=False)
    model = load_checkpoint(tmp_path / "bf16")
    reference = load_hf_checkpoint(hf)
    assert model.layers[2].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[2].self_attn.o_proj.weight, reference.layers[2].self_attn.o_proj.weight.bfloat16())
    assert torch.equal(model.layers[1].mlp.gate.weight, reference.layers[1].mlp.gate.weight)  # float32, untouched
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_int8_native_loads_int8_modules(hf, tmp_path):
    convert_checkpoint(str(hf), tmp_path / "q", quantize="int8", probe=False)
    model = load_checkpoint(tmp_path / "q")
    assert isinstance(model.layers[1].self_attn.o_proj, Int8Linear)
    assert isinstance(model.layers[1].mlp.experts, Int8RoutedExperts)
    assert model.layers[1].mlp.experts.gate_up_proj.dtype == torch.int8
    assert isinstance(model.lm_head, Int8Linear) and model.embed_tokens.weight.dtype == torch.float32
    in_memory = quantize_int8(load_hf_checkpoint(hf))
    with torch.no_grad():
        got, ref = model(TOKENS), load_hf_checkpoint(hf)(TOKENS)
        assert torch.equal(got, in_memory(TOKENS))  # the streamed conversion quantizes exactly like the transform
        bf16 = load_checkpoint(tmp_path / "q", dtype=torch.bfloat16)(TOKENS)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert (got - ref).abs().mean() <= 0.05 * ref.abs().mean()
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - got).abs().mean() <= 0.05 * got.abs().mean()


def test_tied_embeddings_round_trip(tmp_path):
    hf = save_reference(reference_model(seed=2, tie_word_embeddings=True), tmp_path / "tied")
    convert_checkpoint(str(hf), tmp_path / "native", probe=False)
    model = load_checkpoint(tmp_path / "native")
    assert model.lm_head.weight is model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(TOKENS), load_hf_checkpoint(hf)(TOKENS))


@pytest.fixture
def damaged(native, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(native, target)
    return target


def test_newer_format_version_is_refused(damaged):
    raw = json.loads((damaged / MANIFEST_NAME).read_text())
    raw["format_version"] = 99
    (damaged / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(damaged)


def test_wrong_shape_in_a_native_file_names_file_and_tensor(damaged):
    from safetensors.torch import load_file, save_file

    path = damaged / "layer-01.safetensors"
    tensors = load_file(str(path))
    tensors["layers.1.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(damaged)
    assert "layer-01.safetensors: tensor 'layers.1.self_attn.o_proj.weight' has shape [3, 3]" in info.value.message


def test_missing_native_file(damaged):
    (damaged / "layer-02.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file 'layer-02.safetensors'"):
        load_checkpoint(damaged)


def test_int8_native_written_before_the_head_was_quantized_still_loads_and_verifies(hf, tmp_path, monkeypatch):
    import dsv2cli.checkpoint.plan as plan
    from dsv2cli.checkpoint.native import expected_tensors
    from dsv2cli.checkpoint.verify import verify_checkpoint

    monkeypatch.setattr(plan, "expected_tensors", lambda config, quantize, **scheme: expected_tensors(config, quantize, False))
    convert_checkpoint(str(hf), tmp_path / "old", quantize="int8", probe=False)
    monkeypatch.undo()
    model = load_checkpoint(tmp_path / "old")
    assert model.lm_head.weight.dtype == torch.float32 and isinstance(model.layers[1].self_attn.o_proj, Int8Linear)
    assert verify_checkpoint(tmp_path / "old").ok
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS)).all()
