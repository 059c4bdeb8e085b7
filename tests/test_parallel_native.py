"""Sharded loading of native checkpoints (float and int8): ranks against one process, each rank's share, mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsv2cli import kernels
from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.native import read_manifest
from dsv2cli.cli.main import app
from dsv2cli.errors import DSV2Error
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.model import ForwardOptions
from dsv2cli.model.quantized import Int8Linear, int8_dot_products
from dsv2cli.parallel.group import ParallelGroup
from dsv2cli.parallel.layers import LocalInt8Experts, RowParallelLinear, parallelize
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
