"""Sharded model against one process: two and four Gloo ranks on CPU, forked by the test."""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.errors import UnsupportedError
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.parallel.memory import rank_memory
from dsv2cli.parallel.plan import ShardPlan
from dsv2cli.presets import preset_config
from tests.helpers import reference_model, save_reference

PROMPTS = [[0, 5, 9, 3, 7, 100, 2, 64], [0, 17, 33, 127], [0, 1, 2]]
NEW_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, target: Callable, args: tuple, results: multiprocessing.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.setdefault("DSV2_DIST_TIMEOUT", "30")
    torch.set_num_threads(1)
    try:
        results.put((rank, "ok", target(rank, *args)))
    except BaseException as exc:  # reported to the test, which fails with it
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_ranks(world: int, target: Callable, *args, timeout: float = 60.0) -> dict[int, tuple[str, object]]:
    """Fork ``world`` processes that each run ``target(rank, *args)`` in one Gloo group; rank -> (status, value)."""
    ctx = multiprocessing.get_context("fork")  # the test process has torch imported already: no start-up cost
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, target, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.2)
                out[rank] = (status, value)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break  # a rank that died without reporting will not report
    finally:
        for rank, p in enumerate(procs):
            p.join(timeout=5 if rank in out else 0)  # a rank that never reported is not waited for
            if p.is_alive():
                p.kill()
                p.join()
    return out


def _ok(results: dict[int, tuple[str, object]], world: int) -> list:
    assert sorted(results) == list(range(world)), results
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {value}"
    return [results[r][1] for r in range(world)]


def _requests() -> list[GenerationRequest]:
    return [GenerationRequest(p, None, i) for i, p in enumerate(PROMPTS)]


def _greedy(model) -> list[list[int]]:
    return [r.token_ids for r in Generation(model, _requests(), GenerationOptions(max_new_tokens=NEW_TOKENS)).run()]


def _forward_and_route(model, tokens: torch.Tensor) -> tuple[list, list]:
    """Full-sequence logits and every MoE layer's chosen experts."""
    routed: list = []

    def hook(decision):
        routed.append((decision.layer_idx, decision.expert_ids.tolist()))

    with torch.inference_mode():
        logits = model(tokens, routing_hook=hook)
    return logits.tolist(), routed


def _sharded_worker(rank: int, directory: Path, tokens: torch.Tensor) -> dict:
    from dsv2cli.parallel.group import start, stop
    from dsv2cli.parallel.loading import load_sharded
    from dsv2cli.parallel.memory import measure_rank

    group = start("cpu", "auto")
    try:
        model = load_sharded(directory, group)
        logits, routed = _forward_and_route(model, tokens)
        return {
            "backend": group.backend,
            "logits": logits,
            "routed": routed,
            "greedy": _greedy(model),
            "memory": measure_rank(model, rank),
            "heads": model.layers[0].self_attn.num_heads,
        }
    finally:
        stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parallel_ckpt")
    # shards so that some files hold only one rank's experts: each rank opens only what it needs
    save_reference(reference_model(seed=3), directory, shard_size="100KB")
    return directory


@pytest.fixture(scope="module")
def single(checkpoint):
    model = load_checkpoint(checkpoint)
    tokens = torch.tensor([PROMPTS[0]])
    logits, routed = _forward_and_route(model, tokens)
    return {"model": model, "tokens": tokens, "logits": torch.tensor(logits), "routed": routed, "greedy": _greedy(model)}


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_ranks_match_one_process(checkpoint, single, world):
    ranks = _ok(run_ranks(world, _sharded_worker, checkpoint, single["tokens"]), world)
    config = single["model"].config
    expected = rank_memory(config, world, torch.float32)
    for r in ranks:
        assert r["backend"] == "gloo"
        assert r["heads"] == config.num_attention_heads // world
        assert (torch.tensor(r["logits"]) - single["logits"]).abs().max().item() <= 1e-5
        assert r["routed"] == single["routed"]
        assert r["greedy"] == single["greedy"]
        # every rank holds exactly its computed share; routed experts are 1/world of the whole
        assert r["memory"].parameter_bytes == expected.total
        assert r["memory"].expert_bytes == expected.routed_experts
    assert expected.routed_experts * world == rank_memory(config, 1, torch.float32).routed_experts


def _agree_worker(rank: int) -> str:
    from dsv2cli.errors import CheckpointError
    from dsv2cli.parallel.group import CollectiveFailure, agree, start, stop

    group = start("cpu", "gloo")
    try:

        def work() -> int:
            if rank == 1:
                raise CheckpointError("shard 2 is unreadable", hint="re-download it")
            return rank

        try:
            agree(group, work)
        except CollectiveFailure as exc:
            return f"{exc.message} | {exc.hint}"
        return "no error"
    finally:
        stop()


def test_one_failing_rank_fails_every_rank_with_its_number():
    messages = _ok(run_ranks(3, _agree_worker), 3)
    assert messages == ["shard 2 is unreadable (on rank 1) | re-download it"] * 3


def _dies_mid_run_worker(rank: int, directory: Path) -> str:
    from dsv2cli.parallel.group import LostContact, start, stop
    from dsv2cli.parallel.loading import load_sharded

    group = start("cpu", "gloo")
    model = load_sharded(directory, group)
    if rank == 1:
        os._exit(3)  # a crash: no clean-up, no message to the others
    try:
        _greedy(model)
    except LostContact as exc:
        return exc.message
    finally:
        stop()
    return "no error"


def test_a_rank_that_dies_mid_run_is_noticed_not_waited_for(checkpoint):
    results = run_ranks(2, _dies_mid_run_worker, checkpoint, timeout=40)
    status, message = results[0]
    assert status == "ok" and message.startswith("lost contact with the other ranks"), message
    assert 1 not in results


def test_plan_slices_whole_heads_and_expert_blocks():
    config = preset_config("deepseek-v2-lite")
    plan = ShardPlan(config, rank=3, world_size=8)
    assert plan.heads == (6, 8) and plan.experts == (24, 32)
    assert plan.local_shape("layers.1.mlp.experts.gate_up_proj", (64, 2816, 2048)) == (8, 2816, 2048)
    assert plan.local_shape("layers.0.self_attn.q_proj.weight", (16 * 192, 2048)) == (2 * 192, 2048)
    assert plan.local_shape("layers.0.self_attn.kv_b_proj.weight", (16 * 256, 512)) == (2 * 256, 512)
    assert plan.local_shape("layers.0.self_attn.o_proj.weight", (2048, 16 * 128)) == (2048, 2 * 128)
    assert plan.local_shape("layers.0.mlp.down_proj.weight", (2048, 10944)) == (2048, 1368)
    assert plan.local_shape("layers.1.mlp.shared_experts.up_proj.weight", (2816, 2048)) == (352, 2048)
    assert plan.local_shape("embed_tokens.weight", (102400, 2048)) == (12800, 2048)
    for replicated in ("layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.1.mlp.gate.weight", "norm.weight"):
        assert plan.split_for(replicated) is None


def test_plan_rejects_uneven_splits_naming_the_field():
    with pytest.raises(UnsupportedError) as info:
        ShardPlan(preset_config("deepseek-v2-lite"), 0, 3)
    assert "across 3 ranks" in info.value.message
    assert info.value.hint.endswith("1, 2, 4, 8, 16")
    assert ShardPlan.world_sizes(preset_config("deepseek-v2"))[-1] == 32


def _seed_worker(rank: int) -> int | None:
    from dsv2cli.parallel.group import shared_seed, start, stop

    group = start("cpu", "gloo")
    try:
        assert shared_seed(group, 7) == 7
        return shared_seed(group, None)
    finally:
        stop()


def test_unseeded_sampling_gets_one_seed_for_every_rank():
    seeds = _ok(run_ranks(2, _seed_worker), 2)
    assert seeds[0] is not None and seeds == [seeds[0]] * 2


def _loads_worker(rank: int, differ: bool) -> list | str:
    from dsv2cli.parallel.expert_loads import gather_expert_loads
    from dsv2cli.parallel.group import CollectiveFailure, start, stop

    group = start("cpu", "gloo")
    config = preset_config("tiny")  # 16 routed experts
    counts = [[1] * 16, [2] * 8 + [0] * 8]
    if differ and rank == 1:
        counts[1][0] += 1
    try:
        return [r.assignments for r in gather_expert_loads(group, config, counts).ranks]
    except CollectiveFailure as exc:
        return exc.message
    finally:
        stop()


def test_expert_loads_are_split_by_owning_rank_and_checked():
    assert _ok(run_ranks(2, _loads_worker, False), 2) == [[8 + 16, 8 + 0]] * 2
    messages = _ok(run_ranks(2, _loads_worker, True), 2)
    assert messages == ["the ranks computed different expert counts (rank 1 differs from rank 0)"] * 2


def _hung_rank_worker(rank: int) -> tuple[str, float]:
    from dsv2cli.parallel.group import LostContact, agree, start, stop

    group = start("cpu", "gloo")
    started = time.monotonic()
    try:
        agree(group, lambda: time.sleep(30) if rank == 1 else None)  # rank 1 hangs instead of answering
    except LostContact as exc:
        return exc.message, time.monotonic() - started
    finally:
        stop()
    return "no error", time.monotonic() - started


def test_a_rank_that_hangs_ends_the_run_after_the_timeout(monkeypatch):
    monkeypatch.setenv("DSV2_DIST_TIMEOUT", "2")
    results = run_ranks(2, _hung_rank_worker, timeout=4)
    status, (message, waited) = results[0]
    assert status == "ok" and message.startswith("lost contact with the other ranks"), message
    assert 1.5 < waited < 5  # rank 0 gave up after the timeout instead of waiting the 30 s
