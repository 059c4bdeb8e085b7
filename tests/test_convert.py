"""`dsv2 convert`: round trips, parity with transformers, int8, atomicity, determinism and bad input."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsv2cli.checkpoint import writer
from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.loader import load_checkpoint, load_hf_checkpoint
from dsv2cli.cli.main import app
from dsv2cli.errors import UnsupportedError
from tests.helpers import one_thread_per_module, reference_model, save_reference  # noqa: F401 (autouse fixture)

runner = CliRunner()
TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    return reference_model(seed=4)


@pytest.fixture(scope="module")
def hf(reference, tmp_path_factory) -> Path:
    return save_reference(reference, tmp_path_factory.mktemp("hf") / "src", shard_size="90KB")


@pytest.fixture(scope="module")
def native(hf, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("native") / "native"
    convert_checkpoint(str(hf), output, probe=False)
    return output


def _tensors(directory: Path) -> dict[str, tuple[torch.dtype, bytes]]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                found[name] = (tensor.dtype, tuple(tensor.shape), tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return found


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _convert(*args: str):
    return runner.invoke(app, ["convert", *args])


def test_hf_native_hf_is_byte_identical_and_transformers_gives_identical_logits(reference, hf, native, tmp_path):
    result = _convert(str(native), str(tmp_path / "back"), "--to", "hf", "--shard-size", "100KB", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source_layout"] == "native" and report["target_layout"] == "hf" and report["quality"] is None
    back = tmp_path / "back"
    assert _tensors(back) == _tensors(hf)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in back.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in reference.state_dict().values())

    from transformers import DeepseekV2ForCausalLM

    loaded = DeepseekV2ForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, reference(TOKENS).logits)


def test_report_fields(hf, reference, tmp_path):
    result = _convert(str(hf), str(tmp_path / "out"), "--format", "json", "--no-probe")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tensors"] == 45 and report["files"] == 8  # 5 weight files, 2 configs, the manifest
    tensor_bytes = sum(t.nbytes for t in reference.state_dict().values())
    configs = sum((hf / name).stat().st_size for name in ("config.json", "generation_config.json"))
    assert report["bytes_read"] == tensor_bytes + configs
    assert report["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert report["seconds"] > 0 and report["throughput_bytes_per_s"] > 0 and report["peak_rss_bytes"] > 50 * 2**20


def test_dtype_changes_round_trip(hf, reference, tmp_path):
    assert _convert(str(hf), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--no-probe").exit_code == 0
    assert _convert(str(tmp_path / "bf16"), str(tmp_path / "f32"), "--to", "hf", "--dtype", "float32").exit_code == 0
    original, back = _tensors(hf), _tensors(tmp_path / "f32")
    assert set(original) == set(back)
    for name, (dtype, shape, _) in back.items():
        assert dtype == torch.float32 and shape == original[name][1]
    state = dict(reference.state_dict())
    up = state["model.layers.1.mlp.experts.gate_up_proj"][3, 32:]  # transformers stacks experts in memory
    f32 = {k: v for p in (tmp_path / "f32").glob("*.safetensors") for k, v in load_file(str(p)).items()}
    assert torch.equal(f32["model.layers.1.mlp.experts.3.up_proj.weight"], up.bfloat16().float())
    router = "model.layers.1.mlp.gate.weight"
    assert torch.equal(f32[router], state[router])  # the router stayed float32 all along
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert config["dtype"] == "float32"


def test_int8_reports_quality_and_generates_like_float(hf, tmp_path):
    result = _convert(str(hf), str(tmp_path / "q"), "--quantize", "int8", "--probe", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantization"] == "int8" and report["bytes_written"] < 0.5 * report["bytes_read"]
    assert report["probe"] is True and report["probe_seconds"] > 0
    quality = report["quality"]
    assert quality["tokens"] == 63 and quality["token_source"] == "seeded ids"  # 64 probe tokens: 63 predictions
    assert abs(quality["log_likelihood_change"]) < 0.05 and quality["top1_agreement"] >= 0.8
    assert quality["log_likelihood_change"] == pytest.approx(
        quality["candidate_mean_logprob"] - quality["reference_mean_logprob"], abs=2e-6
    )

    float_model, int8_model = load_hf_checkpoint(hf), load_checkpoint(tmp_path / "q")
    greedy = []
    for model in (float_model, int8_model):
        tokens = TOKENS[:1]
        with torch.no_grad():
            for _ in range(8):
                tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
        greedy.append(tokens[0, TOKENS.shape[1] :])
    assert (greedy[0] == greedy[1]).float().mean() >= 0.75


def test_probe_runs_only_when_asked(hf, tmp_path):
    result = _convert(str(hf), str(tmp_path / "q"), "--quantize", "int8", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["probe"] is False and report["quality"] is None and report["probe_peak_rss_bytes"] is None
    text = _convert(str(hf), str(tmp_path / "q2"), "--quantize", "int8")
    assert text.exit_code == 0 and "not measured (pass --probe)" in text.stdout
    assert "--probe" in runner.invoke(app, ["convert", "--help"]).stdout


def test_probe_that_does_not_fit_is_refused_before_converting(hf, tmp_path, monkeypatch):
    from dsv2cli.checkpoint import fit

    monkeypatch.setattr(fit, "available_memory", lambda device="cpu": fit.Available(10**6, "MemAvailable"))
    result = _convert(str(hf), str(tmp_path / "q"), "--quantize", "int8", "--probe")
    assert result.exit_code == 1 and "the quality probe needs" in result.stderr and "without --probe" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_probe_need_counts_one_layer_at_a_time():
    from dsv2cli.checkpoint.probe import probe_need
    from dsv2cli.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "dsv2cli" / "assets" / "demo")
    base = probe_need(config, [])
    tensors = [("model.embed_tokens.weight", 100), ("model.layers.0.mlp.x", 30), ("model.layers.1.mlp.x", 50)]
    head = [("lm_head.weight", 7), ("model.norm.weight", 1)]
    assert probe_need(config, tensors + head) == base + 100 + 50 + 2 * 8
    assert probe_need(config, tensors + head, [("layers.1.mlp.y", 500)]) == base + 500


def test_chunk_sizes_do_not_change_the_bytes(hf, native, tmp_path, monkeypatch):
    """Rows read, quantized and written in any split give the same files (the split is a speed choice)."""
    from dsv2cli.checkpoint import stream

    convert_checkpoint(str(hf), tmp_path / "q", quantize="int8")
    monkeypatch.setattr(stream, "READ_BYTES", 1000)  # some rows need a larger buffer than the pool's
    monkeypatch.setattr(stream, "CONVERT_BYTES", 100)
    monkeypatch.setattr(stream, "READS_AHEAD", 1)
    monkeypatch.setattr(stream, "WRITES_AHEAD", 1)
    convert_checkpoint(str(hf), tmp_path / "small", probe=False)
    convert_checkpoint(str(hf), tmp_path / "small-q", quantize="int8")
    assert _hashes(tmp_path / "small") == _hashes(native)
    assert _hashes(tmp_path / "small-q") == _hashes(tmp_path / "q")


def test_manifest_sha256_is_computed_while_writing_and_matches_the_files(hf, tmp_path):
    specs = [writer.TensorSpec("a", "I8", (3, 7)), writer.TensorSpec("b", "F32", (5,))]
    out = writer.SafetensorsWriter(tmp_path / "x.safetensors", specs)
    data = bytes(range(21)) + bytes(20)
    for start in range(0, len(data), 6):  # splits across the tensors' boundary
        out.write(data[start : start + 6])
    record = out.close()
    assert record == writer.hash_file(tmp_path / "x.safetensors")
    assert record.sha256 == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    convert_checkpoint(str(hf), tmp_path / "q", quantize="int8")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
        name: digest for name, digest in _hashes(tmp_path / "q").items() if name != "manifest.json"
    }


def test_conversion_leaves_torch_threads_and_no_threads_behind(hf, tmp_path):
    import threading

    threads, before = torch.get_num_threads(), threading.active_count()
    convert_checkpoint(str(hf), tmp_path / "q", quantize="int8")
    assert torch.get_num_threads() == threads and threading.active_count() == before


def test_int8_is_native_only_and_final(hf, tmp_path):
    result = _convert(str(hf), str(tmp_path / "x"), "--to", "hf", "--quantize", "int8")
    assert result.exit_code == 1 and "int8 weights have no HF layout" in result.stderr
    convert_checkpoint(str(hf), tmp_path / "q", quantize="int8", probe=False)
    with pytest.raises(UnsupportedError, match="already quantized"):
        convert_checkpoint(str(tmp_path / "q"), tmp_path / "again")
    assert not (tmp_path / "x").exists() and not (tmp_path / "again").exists()


def test_rerun_is_byte_identical(hf, native, tmp_path):
    convert_checkpoint(str(hf), tmp_path / "again", probe=False)
    assert _hashes(tmp_path / "again") == _hashes(native)


def test_existing_output_is_refused_then_overwritten(hf, native, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    result = _convert(str(hf), str(output))
    assert result.exit_code == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (output / "keep.txt").read_text() == "mine"
    assert _convert(str(hf), str(output), "--overwrite", "--no-probe").exit_code == 0
    assert _hashes(output) == _hashes(native)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_output_appearing_mid_run_is_left_alone(hf, native, tmp_path, monkeypatch):
    from dsv2cli.checkpoint import convert

    output = tmp_path / "out"
    original = convert._write_manifest

    def appear(*args, **kwargs):
        output.mkdir()
        (output / "theirs.txt").write_text("theirs")
        return original(*args, **kwargs)

    monkeypatch.setattr(convert, "_write_manifest", appear)
    result = _convert(str(hf), str(output), "--no-probe")
    assert result.exit_code == 1 and "changed while this command ran" in result.stderr, result.output
    assert [p.name for p in output.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.result-")]
    assert len(kept) == 1 and _hashes(kept[0]) == _hashes(native)


def test_overwrite_of_the_current_directory(hf, native, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = _convert(str(hf), ".", "--overwrite", "--no-probe")
    assert result.exit_code == 0, result.output
    assert _hashes(work) == _hashes(native) and [p.name for p in tmp_path.iterdir()] == ["work"]


def test_output_inside_source_is_refused(hf):
    result = _convert(str(hf), str(hf / "native"))
    assert result.exit_code == 1 and "overlaps SOURCE" in result.stderr
    assert not (hf / "native").exists()


def test_killed_conversion_leaves_output_untouched_and_rerun_is_identical(hf, native, tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys
        from dsv2cli.checkpoint import writer
        original, calls = writer.SafetensorsWriter._advance, [0]
        def advance(self, n):
            calls[0] += 1
            if calls[0] > int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, n)
        writer.SafetensorsWriter._advance = advance
        from dsv2cli.cli.main import app
        app(["convert", sys.argv[1], sys.argv[2], "--no-probe"])
        """
    )
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", script, str(hf), str(output), "40"], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    assert not output.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.partial-")  # the staging dir of the killed run
    result = _convert(str(hf), str(output), "--no-probe")
    assert result.exit_code == 0, result.output
    assert _hashes(output) == _hashes(native)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the stale staging dir was cleared


# Bad input: one clear error naming the file (and tensor), exit 1, nothing at OUTPUT, SOURCE unchanged.


@pytest.fixture
def broken(hf, tmp_path) -> Path:
    target = tmp_path / "src"
    shutil.copytree(hf, target)
    return target


def _shard_with(directory: Path, tensor: str) -> Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def _fails(source: Path, *needles: str) -> None:
    before = _hashes(source)
    output = source.parent / "out"
    result = _convert(str(source), str(output))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not output.exists()
    assert not any(p.name.startswith(".out") for p in source.parent.iterdir())
    assert _hashes(source) == before


def test_truncated_shard(broken):
    shard = _shard_with(broken, "model.layers.2.mlp.experts.5.up_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-64])
    _fails(broken, shard.name, "truncated")


def test_corrupt_header(broken):
    shard = _shard_with(broken, "model.norm.weight")
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    _fails(broken, shard.name, "not valid JSON")


def _rewrite(shard: Path, change) -> None:
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_tensor(broken):
    name = "model.layers.1.mlp.experts.6.down_proj.weight"
    _rewrite(_shard_with(broken, name), lambda t: t.pop(name))
    _fails(broken, "has no tensor 'model.layers.1.mlp.experts.6.down_proj.weight'", "missing tensor")


def test_unexpected_tensor(broken):
    shard = _shard_with(broken, "model.norm.weight")
    _rewrite(shard, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    _fails(broken, shard.name, "unexpected tensor 'model.layers.0.self_attn.extra.weight'")


def test_wrong_shape(broken):
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = _shard_with(broken, name)
    _rewrite(shard, lambda t: t.update({name: torch.zeros(64, 63)}))
    _fails(broken, shard.name, f"'{name}' has shape [64, 63]")


def test_index_naming_a_file_outside(broken):
    path = broken / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere/model.safetensors"
    path.write_text(json.dumps(index))
    _fails(broken, "'../elsewhere/model.safetensors'", "outside the checkpoint directory")


def test_pickled_weights_only(broken):
    for shard in broken.glob("*.safetensors"):
        shard.unlink()
    (broken / "model.safetensors.index.json").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"never unpickled")
    _fails(broken, "pytorch_model.bin", "pickle")


def test_read_failure_midway(hf, tmp_path, monkeypatch):
    """A source read that fails while converting names the tensor and file; the threads stop, nothing is left."""
    import threading

    from dsv2cli.checkpoint import stream

    calls, preadv, before = [0], os.preadv, threading.active_count()

    def failing(fd, buffers, offset):
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(errno.EIO, "Input/output error")
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(stream.os, "preadv", failing)
    result = _convert(str(hf), str(tmp_path / "out"), "--quantize", "int8")
    assert result.exit_code == 1 and "could not read tensor '" in result.stderr and "Input/output error" in result.stderr
    assert ".safetensors" in result.stderr and "dsv2 verify" in result.stderr
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == before


def test_disk_full(hf, tmp_path, monkeypatch):
    calls = [0]

    def full(original):
        def fail_after_a_while(self, *args):
            calls[0] += 1
            if calls[0] > 12:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, *args)

        return fail_after_a_while

    monkeypatch.setattr(writer.SafetensorsWriter, "_write_bytes", full(writer.SafetensorsWriter._write_bytes))
    before = _hashes(hf)
    result = _convert(str(hf), str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "no space left on the device while writing layer-0" in result.stderr and "(tensor 'layers." in result.stderr
    assert list(tmp_path.iterdir()) == [] and _hashes(hf) == before


def test_not_enough_free_space_is_refused_before_writing(hf, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    result = _convert(str(hf), str(tmp_path / "out"))
    assert result.exit_code == 1 and "only 0.00 GB is free" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_source_that_is_neither_directory_nor_repo(tmp_path):
    result = _convert(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.exit_code == 1 and "not a checkpoint directory" in result.stderr


def test_demo_converts_to_int8_and_generates(tmp_path):
    """`demo` names the bundled model as SOURCE, as it does as MODEL for generate."""
    result = _convert("demo", str(tmp_path / "demo-int8"), "--quantize", "int8", "--no-probe")
    assert result.exit_code == 0, result.stderr
    generated = runner.invoke(
        app, ["generate", "def add(a, b):", "--model", str(tmp_path / "demo-int8"), "--max-new-tokens", "8", "--format", "json"]
    )
    assert generated.exit_code == 0, generated.stderr
    record = json.loads(generated.stdout)["results"][0]
    assert len(record["token_ids"]) == 8 and record["text"]


def test_an_empty_output_directory_is_used_and_a_full_one_refused(tmp_path):
    """A directory made for the result (empty) takes it; one holding anything is refused without --overwrite."""
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    runner = CliRunner()
    assert runner.invoke(app, ["convert", "demo", str(empty)]).exit_code == 0
    assert (empty / "manifest.json").is_file()
    refused = runner.invoke(app, ["convert", "demo", str(full)])
    assert refused.exit_code == 1 and "already exists and is not empty" in refused.output
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
