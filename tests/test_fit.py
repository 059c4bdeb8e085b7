"""Memory checks before loading (dsv2cli/checkpoint/fit.py): what a load needs, and refusals under a real limit.

The limit tests run `dsv2 generate` in a child process whose address space is capped with RLIMIT_AS a
little above what it holds before loading, so a load the check lets through really must fit, and a
load it refuses ends in one `Error:` line instead of a MemoryError traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.fit import (
    RUNTIME_SLACK,
    InsufficientMemoryError,
    MemoryNeed,
    check_load,
    int8_need,
    load_need,
    stored_weights,
    working_bytes,
)
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.writer import safetensors_header
from dsv2cli.config import ModelConfig
from dsv2cli.model.transformer import fuse_projections
from dsv2cli.presets import preset_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from full_size import shard_specs, write_checkpoint  # noqa: E402

MB = 1 << 20


def _config(**changes) -> ModelConfig:
    """~90M parameters: float32 and bfloat16 loads differ by ~180 MB, well above a process's slack."""
    base = dict(
        vocab_size=32000,
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=2048,
        moe_intermediate_size=512,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        max_position_embeddings=512,
        rope_scaling=None,
        torch_dtype="bfloat16",
    )
    base.update(changes)
    return preset_config("tiny").replace(**base)


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fit") / "hf"
    write_checkpoint(_config(), directory, shard_bytes=64 * MB, progress=False)
    return directory


@pytest.fixture(scope="module")
def native_bf16(hf_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit-native") / "native"
    convert_checkpoint(str(hf_bf16), out, probe=False)
    return out


def _parameter_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen and tensor.device.type != "meta":
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_need_of_a_hf_load_is_what_the_loaded_model_holds(hf_bf16, dtype):
    need = load_need(stored_weights(hf_bf16), dtype)
    model = fuse_projections(load_checkpoint(hf_bf16, dtype, working=0))
    rotary = sum(b.numel() * b.element_size() for b in model.rotary.buffers())
    assert need.copied + need.mapped == _parameter_bytes(model) - rotary
    if dtype == torch.bfloat16:
        assert need.mapped > 0  # embeddings, norms, attention outputs, lm_head used as safetensors maps them
    else:
        assert need.mapped == 0


def test_native_load_in_its_own_dtype_is_mapped_except_fused_projections(native_bf16):
    same = load_need(stored_weights(native_bf16), None)
    widened = load_need(stored_weights(native_bf16), torch.float32)
    assert same.mapped > 0 and same.copied < same.mapped
    assert widened.mapped == 0
    assert widened.copied + widened.mapped == pytest.approx(2 * (same.copied + same.mapped), rel=0.01)


def test_int8_need_matches_a_converted_copy(hf_bf16, tmp_path):
    out = tmp_path / "int8"
    convert_checkpoint(str(hf_bf16), out, quantize="int8", probe=False)
    expected = int8_need(_config(), torch.float32)
    assert load_need(stored_weights(out), torch.float32) == expected


def test_working_memory_grows_with_cache_and_prompt():
    config = _config()
    base = working_bytes(config, torch.float32)
    assert base == RUNTIME_SLACK
    cache = working_bytes(config, torch.float32, capacity=1000)
    assert cache - base == 1000 * config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert working_bytes(config, torch.float32, tokens=1000, capacity=1000) > cache


def test_memory_need_arithmetic():
    need = MemoryNeed(copied=10, mapped=5).with_working(3)
    assert (need.allocated, need.total) == (13, 18)


def _header_only_checkpoint(config: ModelConfig, directory: Path) -> Path:
    """A HF checkpoint of ``config`` whose shards are sparse files: real headers and sizes, no data on disk."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    weight_map = {}
    for index, specs in enumerate(shard_specs(config, 5 * 10**9)):
        path = directory / f"model-{index + 1:05d}.safetensors"
        header = safetensors_header(specs)
        path.write_bytes(header)
        os.truncate(path, len(header) + sum(spec.nbytes for spec in specs))
        weight_map.update({spec.name: path.name for spec in specs})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def lite_headers(tmp_path_factory) -> Path:
    return _header_only_checkpoint(preset_config("deepseek-v2-lite"), tmp_path_factory.mktemp("lite") / "lite")


def test_full_size_lite_needs(lite_headers):
    """DeepSeek-V2-Lite (15.7B) from its real shapes: 62.8 GB float32, experts copied and the rest mapped in bfloat16."""
    assert load_need(stored_weights(lite_headers), torch.float32) == MemoryNeed(4 * 15_706_484_224, 0)
    bf16 = load_need(stored_weights(lite_headers), torch.bfloat16)
    routers = 26 * 64 * 2048  # kept in float32: 2 more bytes each
    assert bf16.copied + bf16.mapped == 2 * 15_706_484_224 + 2 * routers
    assert bf16.copied > 2 * 14_394_851_328  # the routed experts, stacked, and the fused projections
    assert stored_weights(lite_headers).dtype == torch.bfloat16


def test_full_size_lite_on_24_gb_is_refused_with_the_int8_fix(monkeypatch, lite_headers):
    from dsv2cli.checkpoint import fit

    monkeypatch.setattr(fit, "available_memory", lambda device="cpu": fit.Available(24 * 10**9, "MemAvailable"))
    monkeypatch.setattr(fit, "address_space_limited", lambda: False)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(InsufficientMemoryError) as caught:
            check_load(lite_headers, dtype)
        message, hint = caught.value.message, caught.value.hint
        assert message.startswith(f"lite in {str(dtype)[6:]} needs ") and "24.0 GB available (MemAvailable)" in message
        assert "an int8 copy (17.1 GB)" in hint and f"dsv2 convert {lite_headers} {lite_headers}-int8 --quantize int8" in hint
        assert "`dtype=" not in hint  # bfloat16 does not fit either


CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from typer.main import get_command
    from dsv2cli.cli.main import app
    torch.set_num_threads(1)
    command = get_command(app)  # everything the command imports, before the limit is measured
    import dsv2cli.cli.generate  # noqa: F401
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), resource.RLIM_INFINITY))
    command.main(sys.argv[2:], prog_name="dsv2")
    """
)


def _generate_under_limit(directory: Path, limit: int, *args: str) -> subprocess.CompletedProcess:
    env = {"MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(limit), "generate", "-m", str(directory), "-n", "2", "--token-ids", "5,6,7", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
def test_auto_dtype_chooses_what_fits_under_a_real_limit(hf_bf16):
    """float32 does not fit, bfloat16 does: auto loads bfloat16 and generates (and a float32 ask is refused)."""
    bf16 = load_need(stored_weights(hf_bf16), torch.bfloat16).total
    fp32 = load_need(stored_weights(hf_bf16), torch.float32).total
    working = working_bytes(_config(), torch.bfloat16, capacity=4096)
    limit = bf16 + working + 48 * MB
    assert fp32 + working > limit
    done = _generate_under_limit(hf_bf16, limit, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["token_ids"]
    refused = _generate_under_limit(hf_bf16, limit, "--dtype", "float32")
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and "available (RLIMIT_AS)" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert lines[1].startswith("Hint: ") and "--dtype bfloat16" in lines[1]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
def test_nothing_fits_gives_one_error_line_not_a_traceback(hf_bf16):
    smallest = load_need(stored_weights(hf_bf16), torch.bfloat16).total + working_bytes(_config(), torch.bfloat16, capacity=4096)
    done = _generate_under_limit(hf_bf16, smallest // 2)  # room for the imports a run makes, not for the model
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Error: hf in bfloat16 needs "), done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    assert "an int8 copy would need" in done.stderr  # it would not fit either: no convert command offered


def test_cgroup_v2_limit_is_the_tightest_of_the_group_and_its_parents(tmp_path):
    from dsv2cli.checkpoint.machine import _cgroup_available

    root = tmp_path / "cgroup"
    leaf = root / "user.slice" / "job"
    leaf.mkdir(parents=True)
    (root / "user.slice" / "memory.max").write_text("8000000000\n")
    (root / "user.slice" / "memory.current").write_text("3000000000\n")
    (root / "user.slice" / "memory.stat").write_text("anon 1\ninactive_file 1000000000\n")
    (leaf / "memory.max").write_text("max\n")  # no limit of its own: the parent's applies
    (leaf / "memory.current").write_text("100\n")
    assert _cgroup_available(root, ["0::/user.slice/job"]) == 8_000_000_000 - 3_000_000_000 + 1_000_000_000
    assert _cgroup_available(root, ["0::/"]) is None


class _Record:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.reports: list = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def reading(self, total_bytes: int):
        return lambda n: None

    def read(self, report) -> None:
        self.reports.append(report)


def test_mapped_weights_that_fit_are_read_ahead_and_those_that_do_not_are_reported(native_bf16, monkeypatch):
    from dsv2cli.checkpoint import fit
    from dsv2cli.inference.session import load_for_generation

    need = load_need(stored_weights(native_bf16), torch.bfloat16).with_working(RUNTIME_SLACK)
    record = _Record()
    load_for_generation(str(native_bf16), "cpu", "bfloat16", working=RUNTIME_SLACK, progress=record)
    assert record.reports and record.reports[0].total_bytes > need.mapped and not record.warnings
    # Room for the copies and working memory, not for the mapped files: loaded, with a warning, nothing read ahead.
    tight = need.allocated + need.mapped // 2
    monkeypatch.setattr(fit, "available_memory", lambda device="cpu": fit.Available(tight, "MemAvailable"))
    record = _Record()
    loaded = load_for_generation(str(native_bf16), "cpu", "bfloat16", working=RUNTIME_SLACK, progress=record)
    assert loaded.dtype == torch.bfloat16 and not record.reports
    assert len(record.warnings) == 1 and "read weights from disk" in record.warnings[0]
