"""Sharded loading of native checkpoints (float, int8 and int4): ranks against one process, each rank's share, mapping."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsv2cli import kernels
from dsv2cli.checkpoint import native
from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.native import read_manifest
from dsv2cli.cli.main import app
from dsv2cli.errors import DSV2Error, UnsupportedError
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.model import ForwardOptions
from dsv2cli.model.int4 import Int4Linear
from dsv2cli.model.quantized import Int8Linear, int8_dot_products
from dsv2cli.parallel.group import ParallelGroup
from dsv2cli.parallel.layers import GatheredHead, LocalInt4Experts, LocalInt8Experts, RowParallelLinear, parallelize
from dsv2cli.parallel.loading import load_sharded
from dsv2cli.parallel.plan import ShardPlan, Split
from dsv2cli.presets import preset_config
from tests.helpers import reference_model, save_reference, save_tokenizer
from tests.test_native import _mapped_ranges
from tests.test_parallel import PROMPTS, _forward_and_route, _greedy, _ok, run_ranks
from tests.test_parallel_cli import run_cli

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random HF checkpoint (with a tokenizer) as native int8, bfloat16 and float32 copies."""
    root = tmp_path_factory.mktemp("parallel_native")
    save_reference(reference_model(seed=3, vocab_size=320), root / "hf")
    save_tokenizer(root / "hf")
    convert_checkpoint(str(root / "hf"), root / "int8", quantize="int8", probe=False)
    convert_checkpoint(str(root / "hf"), root / "bfloat16", dtype="bfloat16", probe=False)
    convert_checkpoint(str(root / "hf"), root / "float32", probe=False)
    return {name: root / name for name in ("int8", "bfloat16", "float32")}


def _one_at_a_time(model) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities, one prompt at a time: every step is one token (the int8 one-token
    kernels: dsv2's where they build, as generation runs them)."""
    out = []
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, forward=ForwardOptions(kernels.load()))
    for i, prompt in enumerate(PROMPTS[:2]):
        (result,) = Generation(model, [GenerationRequest(prompt, None, i)], options).run()
        out.append((result.token_ids, result.logprobs))
    return out


def _run(model, one_row: bool) -> dict:
    logits, routed = _forward_and_route(model, torch.tensor([PROMPTS[0]]))
    return {"logits": logits, "routed": routed, "batched": _greedy(model), "one_row": _one_at_a_time(model) if one_row else []}


def _worker(rank: int, directory: Path, dtype: torch.dtype | None, one_row: bool) -> dict:
    from dsv2cli.parallel.group import start, stop

    group = start("cpu", "gloo")
    try:
        return _run(load_sharded(directory, group, dtype), one_row)
    finally:
        stop()


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("int8", torch.float32), ("bfloat16", torch.float32), ("float32", None)],
    ids=["int8", "bfloat16-as-float32", "float32-mapped"],
)
def test_two_ranks_on_a_native_checkpoint_give_one_process_tokens(checkpoints, layout, dtype):
    one_row = layout == "int8"  # one-token steps take the int8 one-token kernel; float ones are the batched path's products
    single = _run(load_checkpoint(checkpoints[layout], dtype), one_row)
    for rank in _ok(run_ranks(2, _worker, checkpoints[layout], dtype, one_row), 2):
        assert (torch.tensor(rank["logits"]) - torch.tensor(single["logits"])).abs().max().item() <= 1e-5
        assert rank["routed"] == single["routed"]
        assert rank["batched"] == single["batched"]
        # one-token steps: with dsv2's int8 kernel or VNNI, int8 activations quantized with the whole row's step on
        # every rank (exact int32 sums); without either, torch's int8-weight kernel rounds each rank's partial sums
        # of a row-parallel layer to bfloat16 (8 significant bits) before they are added: the same tokens,
        # log-probabilities to 2e-2.
        tolerance = 1e-5 if int8_dot_products() or kernels.load().available else 2e-2
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(rank["one_row"], single["one_row"], strict=True):
            assert tokens == want_tokens
            assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= tolerance


def _group(rank: int, world: int) -> ParallelGroup:
    """A rank's view without a process group: loading and splitting need no collective."""
    return ParallelGroup(rank, world, rank, "gloo", torch.device("cpu"))


def test_each_rank_holds_its_share_of_an_int8_checkpoint(checkpoints):
    directory = checkpoints["int8"]
    assert read_manifest(directory).quantization == "int8"
    whole = load_checkpoint(directory, torch.float32).state_dict()
    world = 2
    ranks = [load_sharded(directory, _group(r, world), torch.float32) for r in range(world)]
    for rank, model in enumerate(ranks):
        plan = ShardPlan(model.config, rank, world)
        state = model.state_dict()
        assert state.keys() == whole.keys()
        for name, tensor in state.items():
            split = plan.split_for(name)
            want = whole[name] if split is None else whole[name][split.index()]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
        experts = model.layers[1].mlp.experts
        assert isinstance(experts, LocalInt8Experts) and experts.first == rank * 4 and experts.num_experts == 4
        o_proj = model.layers[0].self_attn.o_proj
        assert isinstance(o_proj, RowParallelLinear) and o_proj.weight.dtype == torch.int8
        assert o_proj.weight.shape == (64, 32) and o_proj.scale.shape == (64,)  # input columns split, scale whole
        assert isinstance(model.layers[0].self_attn.q_b_proj, Int8Linear)
    # routed experts: half the bytes each, the two halves make the whole; everything else by the plan
    expert_names = [name for name in whole if ".mlp.experts." in name]
    full = sum(whole[name].numel() * whole[name].element_size() for name in expert_names)
    for model in ranks:
        state = model.state_dict()
        assert sum(state[name].numel() * state[name].element_size() for name in expert_names) * world == full


def test_native_slices_are_mapped_where_nothing_changes(checkpoints):
    directory = checkpoints["float32"]
    model = load_sharded(directory, _group(1, 2), None)  # float32 stored, float32 kept: nothing converted
    ranges = _mapped_ranges(sorted(directory.glob("*.safetensors")))

    def mapped(tensor: torch.Tensor) -> bool:
        return any(start <= tensor.data_ptr() < end for start, end in ranges)

    attn = model.layers[1].self_attn
    assert mapped(attn.kv_a_proj_with_mqa.weight)  # replicated
    assert mapped(model.layers[1].mlp.experts.gate_up_proj)  # this rank's experts: rows of the file
    assert mapped(attn.q_b_proj.weight)  # this rank's heads: rows
    assert not mapped(attn.o_proj.weight) and attn.o_proj.weight.is_contiguous()  # input columns: copied, contiguous


def test_each_rank_checks_its_own_share_against_memory(checkpoints, monkeypatch):
    from dsv2cli.checkpoint import fit

    monkeypatch.setattr(fit, "available_memory", lambda device="cpu": fit.Available(1 << 20, "MemAvailable"))
    with pytest.raises(DSV2Error) as info:
        load_sharded(checkpoints["int8"], _group(1, 2), torch.float32)
    assert "rank 1 of 2" in info.value.message


def test_generate_under_torchrun_reads_an_int8_checkpoint(checkpoints, tmp_path):
    """The CLI path (each rank as torchrun starts it); native checkpoints used to be refused here."""
    args = ["generate", "-m", str(checkpoints["int8"]), "def add(a, b):", "class", "-n", "8", "--temperature", "0", "-f", "json"]
    # Ranks decode eagerly; a single process compiles by default, and compiled kernels may round an activation
    # to the other side of an int8 step (tests/test_one_forward.py holds both to the reference).
    single = CliRunner().invoke(app, [*args, "--no-compile"])
    assert single.exit_code == 0, single.output
    ranks = run_cli(2, args, tmp_path)
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2]
    doc = json.loads(ranks[0][1])
    assert [r["token_ids"] for r in doc["results"]] == [r["token_ids"] for r in json.loads(single.stdout)["results"]]
    assert "2 ranks (gloo)" in ranks[0][2]
    assert ranks[0][2].count("(50.0% of all)") == 2  # int8 experts are buffers: counted, half on each rank


def test_plan_splits_an_int8_scale_with_its_weight_rows_and_keeps_it_whole_for_columns():
    plan = ShardPlan(preset_config("deepseek-v2-lite"), 1, 2)
    for weight in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.shared_experts.up_proj.weight", "lm_head.weight"):
        assert plan.split_for(weight.removesuffix(".weight") + ".scale") == plan.split_for(weight)
    assert plan.split_for("layers.1.mlp.experts.gate_up_proj_scale") == Split(0, 32, 64)
    assert plan.split_for("layers.1.mlp.experts.down_proj_scale") == Split(0, 32, 64)
    for whole in ("self_attn.o_proj", "mlp.down_proj", "mlp.shared_experts.down_proj", "self_attn.kv_a_proj_with_mqa"):
        assert plan.split_for(f"layers.1.{whole}.scale") is None


def test_parallelize_splits_a_loaded_int8_model_like_the_sharded_loader(checkpoints):
    directory = checkpoints["int8"]
    split = parallelize(load_checkpoint(directory, torch.float32), _group(1, 2)).state_dict()
    loaded = load_sharded(directory, _group(1, 2), torch.float32).state_dict()
    assert split.keys() == loaded.keys()
    assert all(torch.equal(split[name], loaded[name]) for name in split)


# ---- int4: packed rows and group scales, input columns split on group boundaries -----------------------------------

# Every input dimension a multiple of 32, and each of 2 ranks' input columns of o_proj (2 x 16 of 4 x 16), the dense
# down_proj (64 of 128) and the shared experts' down_proj (32 of 64) whole groups of 32.
INT4_SHAPES = {"q_lora_rank": 32, "intermediate_size": 128, "moe_intermediate_size": 64}


@pytest.fixture(scope="module")
def int4_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny int4 copies (groups of 32): "int4" splits across 2 ranks on group boundaries; "int4-96" (the dense
    intermediate_size 96) does not: each rank would hold 48 of down_proj's input columns."""
    root = tmp_path_factory.mktemp("parallel_int4")
    save_reference(reference_model(seed=3, vocab_size=320, **INT4_SHAPES), root / "hf")
    save_tokenizer(root / "hf")
    convert_checkpoint(str(root / "hf"), root / "int4", quantize="int4", probe=False)
    save_reference(reference_model(seed=3, vocab_size=320, q_lora_rank=32), root / "hf-96")
    convert_checkpoint(str(root / "hf-96"), root / "int4-96", quantize="int4", probe=False)
    return {"int4": root / "int4", "int4-96": root / "int4-96"}


def test_two_ranks_on_an_int4_checkpoint_give_one_process_tokens(int4_checkpoints):
    """Batched greedy runs and the full-sequence forward (torch's products on dequantized weights) and one-token steps
    (dsv2's int4 kernel where it builds: row-parallel layers quantize each rank's share with the whole row's step,
    so the int32 sums are one process's): the same tokens, logits and log-probabilities to 1e-5."""
    directory = int4_checkpoints["int4"]
    assert read_manifest(directory).quantization == "int4"
    single = _run(load_checkpoint(directory, torch.float32), True)
    for rank in _ok(run_ranks(2, _worker, directory, torch.float32, True), 2):
        assert (torch.tensor(rank["logits"]) - torch.tensor(single["logits"])).abs().max().item() <= 1e-5
        assert rank["routed"] == single["routed"]
        assert rank["batched"] == single["batched"]
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(rank["one_row"], single["one_row"], strict=True):
            assert tokens == want_tokens
            assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= 1e-5


class _Recorded:
    """A safetensors file handle that logs which tensors are read whole and which by slice."""

    def __init__(self, handle, log: list[tuple[str, str]]) -> None:
        self.handle, self.log = handle, log

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name: str):
        self.log.append(("whole", name))
        return self.handle.get_tensor(name)

    def get_slice(self, name: str):
        self.log.append(("slice", name))
        return self.handle.get_slice(name)


def test_each_rank_reads_and_holds_only_its_share_of_an_int4_checkpoint(int4_checkpoints, monkeypatch):
    directory = int4_checkpoints["int4"]
    whole = load_checkpoint(directory, torch.float32).state_dict()
    real_open = native.safe_open
    log: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def recording_open(*args, **kwargs):
        with real_open(*args, **kwargs) as handle:
            yield _Recorded(handle, log)

    monkeypatch.setattr(native, "safe_open", recording_open)
    world = 2
    for rank in range(world):
        log.clear()
        model = load_sharded(directory, _group(rank, world), torch.float32)
        plan = ShardPlan(model.config, rank, world, group_size=32)
        split_names = {name for name in whole if plan.split_for(name) is not None}
        # what the rank read from the mapped files: every split tensor by its slice only, the rest whole
        assert {name for how, name in log if how == "slice"} == split_names
        assert not split_names & {name for how, name in log if how == "whole"}
        state = model.state_dict()
        assert state.keys() == whole.keys()
        for name, tensor in state.items():
            split = plan.split_for(name)
            want = whole[name] if split is None else whole[name][split.index()]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
        experts = model.layers[1].mlp.experts
        assert isinstance(experts, LocalInt4Experts) and experts.first == rank * 4 and experts.num_experts == 4
        assert experts.group_size == 32 and experts.down_proj.shape == (4, 64, 32) and experts.down_proj_scale.shape == (4, 64, 2)
        o_proj = model.layers[0].self_attn.o_proj
        assert isinstance(o_proj, RowParallelLinear) and o_proj.weight.dtype == torch.uint8
        assert o_proj.weight.shape == (64, 16) and o_proj.scale.shape == (64, 1)  # 32 of 64 input columns: 16 bytes, 1 group
        assert tuple(model.layers[0].mlp.down_proj.scale.shape) == (64, 2)  # 64 of 128 input columns
        q_b = model.layers[0].self_attn.q_b_proj
        assert isinstance(q_b, Int4Linear) and q_b.weight.shape == (48, 16) and q_b.scale.shape == (48, 1)  # 2 of 4 heads
        assert isinstance(model.lm_head, GatheredHead) and model.lm_head.weight.shape == (160, 32)  # 160 of 320 rows


def test_int4_slices_are_mapped_where_nothing_changes(int4_checkpoints):
    directory = int4_checkpoints["int4"]
    model = load_sharded(directory, _group(1, 2), torch.float32)  # packed weights and float16 scales stay as stored
    ranges = _mapped_ranges(sorted(directory.glob("*.safetensors")))

    def mapped(tensor: torch.Tensor) -> bool:
        return any(start <= tensor.data_ptr() < end for start, end in ranges)

    attn, experts = model.layers[1].self_attn, model.layers[1].mlp.experts
    assert mapped(experts.gate_up_proj) and mapped(experts.gate_up_proj_scale)  # this rank's experts: rows of the file
    assert mapped(attn.q_b_proj.weight) and mapped(attn.q_b_proj.scale)  # this rank's heads: rows
    for tensor in (attn.o_proj.weight, attn.o_proj.scale):  # input columns (bytes, groups): copied, contiguous
        assert not mapped(tensor) and tensor.is_contiguous()


def test_an_int4_split_off_group_boundaries_is_refused_naming_the_tensor(int4_checkpoints):
    with pytest.raises(UnsupportedError) as info:
        load_sharded(int4_checkpoints["int4-96"], _group(0, 2), torch.float32)
    assert info.value.message == (
        "cannot split the int4 weight layers.0.mlp.down_proj.weight across 2 ranks: each rank would hold 48 of its 96 "
        "input columns, not a whole number of groups of 32 (nor of 32-input packed blocks)"
    )
    assert info.value.hint == "world sizes that split this int4 checkpoint on group boundaries: 1"
    lite = preset_config("deepseek-v2-lite")
    with pytest.raises(UnsupportedError) as info:
        ShardPlan(lite, 0, 2, group_size=64)  # 5472 of the dense down_proj's 10944 columns: 85.5 groups
    assert "layers.0.mlp.down_proj.weight" in info.value.message and "groups of 64" in info.value.message
    assert info.value.hint.endswith(": 1, or convert the float source again with `group_size` = 32")
    with pytest.raises(UnsupportedError) as info:
        ShardPlan(lite, 0, 4, group_size=32)  # 2736 columns
    assert info.value.hint.endswith(": 1, 2")


def test_plan_splits_int4_bytes_and_groups_and_scales_with_their_rows():
    plan = ShardPlan(preset_config("deepseek-v2-lite"), 1, 2, group_size=32)
    assert plan.split_for("layers.0.self_attn.o_proj.weight") == Split(1, 512, 1024)  # inputs 1024..2048, two a byte
    assert plan.split_for("layers.0.self_attn.o_proj.scale") == Split(1, 32, 64)  # their groups of 32
    assert plan.split_for("layers.0.mlp.down_proj.weight") == Split(1, 2736, 5472)
    assert plan.split_for("layers.0.mlp.down_proj.scale") == Split(1, 171, 342)
    assert plan.split_for("layers.1.mlp.shared_experts.down_proj.scale") == Split(1, 44, 88)
    assert plan.local_shape("layers.0.self_attn.o_proj.weight", (2048, 1024)) == (2048, 512)
    for weight in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.shared_experts.up_proj.weight", "lm_head.weight"):
        assert plan.split_for(weight.removesuffix(".weight") + ".scale") == plan.split_for(weight)
    assert plan.split_for("layers.1.mlp.experts.down_proj_scale") == Split(0, 32, 64)
    assert plan.split_for("layers.1.self_attn.kv_a_proj_with_mqa.scale") is None


def test_parallelize_splits_a_loaded_int4_model_like_the_sharded_loader(int4_checkpoints):
    directory = int4_checkpoints["int4"]
    split = parallelize(load_checkpoint(directory, torch.float32), _group(1, 2)).state_dict()
    loaded = load_sharded(directory, _group(1, 2), torch.float32).state_dict()
    assert split.keys() == loaded.keys()
    assert all(torch.equal(split[name], loaded[name]) for name in split)


def test_generate_under_torchrun_reads_an_int4_checkpoint(int4_checkpoints, tmp_path):
    """The CLI path (each rank as torchrun starts it); int4 checkpoints used to be refused here."""
    directory = int4_checkpoints["int4"]
    args = ["generate", "-m", str(directory), "def add(a, b):", "class", "-n", "8", "--temperature", "0", "-f", "json"]
    single = CliRunner().invoke(app, [*args, "--no-compile"])  # ranks decode eagerly
    assert single.exit_code == 0, single.output
    ranks = run_cli(2, args, tmp_path)
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2]
    doc = json.loads(ranks[0][1])
    assert [r["token_ids"] for r in doc["results"]] == [r["token_ids"] for r in json.loads(single.stdout)["results"]]
    assert "2 ranks (gloo)" in ranks[0][2]
    assert ranks[0][2].count("(50.0% of all)") == 2  # int4 experts are buffers: counted, half on each rank
