"""`torchrun -m dsv2cli ...` on CPU (Gloo) against one process, as a user would launch it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv2cli.cli.main import app
from dsv2cli.parallel import session as parallel_session
from dsv2cli.parallel.group import DistributedError
from dsv2cli.parallel.loading import load_sharded
from tests.helpers import reference_model, save_reference, save_tokenizer
from tests.test_parallel import run_ranks

runner = CliRunner()
PROMPTS = ["def add(a, b):", "for item in items:", "class"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parallel_cli")
    save_reference(reference_model(seed=5, vocab_size=320), directory, shard_size="150KB")
    save_tokenizer(directory)
    return directory


def torchrun(world: int, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m", "dsv2cli", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DSV2_DIST_TIMEOUT": "60", **(env or {})}
    environment.pop("DSV2_DEBUG", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, stdin=subprocess.DEVNULL)


@pytest.mark.slow  # a real torchrun launch: the launcher and two fresh interpreters start up
def test_generate_on_two_ranks_gives_the_single_process_tokens(model_dir):
    args = ["generate", "-m", str(model_dir), *PROMPTS, "-n", "8", "--temperature", "0", "-f", "json"]
    single = runner.invoke(app, args)
    assert single.exit_code == 0, single.output
    expected = json.loads(single.stdout)

    run = torchrun(2, *args)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert [r["token_ids"] for r in doc["results"]] == [r["token_ids"] for r in expected["results"]]
    assert [r["text"] for r in doc["results"]] == [r["text"] for r in expected["results"]]
    for got, want in zip(doc["results"], expected["results"], strict=True):
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) < 1e-4
    # the per-rank memory, printed once by rank 0: half the routed experts each
    assert "2 ranks (gloo)" in run.stderr
    assert run.stderr.count("rank 1: parameters") == 1
    assert run.stderr.count("routed experts") >= 2 and "(50.0% of all)" in run.stderr


def _cli_rank(rank: int, args: list[str], directory: Path, stdin: str = "") -> tuple[int, str, str]:
    """Run ``dsv2 ARGS`` as one rank (torchrun's variables are set by run_ranks); returns (exit code, stdout, stderr)."""
    out_path, err_path = directory / f"stdout.{rank}", directory / f"stderr.{rank}"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO(stdin if rank == 0 else "")  # only rank 0 may read input
        try:
            app(args, prog_name="dsv2")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out_path.read_text(), err_path.read_text()


def run_cli(world: int, args: list[str], directory: Path, stdin: str = "", timeout: float = 60) -> list[tuple[int, str, str]]:
    """``torchrun --nproc-per-node WORLD -m dsv2cli ARGS`` without torchrun's start-up cost: the ranks are forked."""
    results = run_ranks(world, _cli_rank, args, directory, stdin, timeout=timeout)
    assert sorted(results) == list(range(world)), results
    for rank, (status, value) in results.items():
        assert status == "ok", f"rank {rank}: {value}"
    return [results[r][1] for r in range(world)]  # type: ignore[misc]


def test_generate_on_four_ranks_gives_the_single_process_tokens(model_dir, tmp_path):
    args = ["generate", "-m", str(model_dir), *PROMPTS, "-n", "6", "--temperature", "0.7", "--seed", "11", "-f", "json"]
    single = runner.invoke(app, args)
    assert single.exit_code == 0, single.output
    ranks = run_cli(4, args, tmp_path)
    assert [code for code, _, _ in ranks] == [0, 0, 0, 0]
    assert all(out == "" and err == "" for _, out, err in ranks[1:])  # only rank 0 speaks
    doc = json.loads(ranks[0][1])
    assert [r["token_ids"] for r in doc["results"]] == [r["token_ids"] for r in json.loads(single.stdout)["results"]]
    assert "4 ranks (gloo)" in ranks[0][2]


def test_interactive_chat_on_two_ranks_reads_lines_on_rank_zero(model_dir, tmp_path):
    args = ["generate", "-m", str(model_dir), "--interactive", "-n", "3"]
    lines = "hello\n/clear\nagain\n/exit\n"
    single = runner.invoke(app, args, input=lines)
    assert single.exit_code == 0, single.output
    ranks = run_cli(2, args, tmp_path, stdin=lines)
    assert [code for code, _, _ in ranks] == [0, 0]
    assert ranks[0][1] == single.stdout and ranks[1][1] == ""


def test_a_failing_rank_fails_every_rank_and_is_named(model_dir, tmp_path, monkeypatch):
    """Rank 1 fails after loading its shard (the ranks are forked after the patch): every rank stops, rank 0 names it."""

    def load_then_fail_on_rank_one(directory, group, dtype):
        model = load_sharded(directory, group, dtype)
        if group.rank == 1:
            raise DistributedError("this rank's memory ran out", hint="use more ranks")
        return model

    monkeypatch.setattr(parallel_session, "load_sharded", load_then_fail_on_rank_one)
    ranks = run_cli(2, ["generate", "-m", str(model_dir), "hello", "-n", "2"], tmp_path)
    assert [code for code, _, _ in ranks] == [1, 1]
    assert ranks[0][2].splitlines()[0] == "Error: this rank's memory ran out (on rank 1)"
    assert ranks[0][1] == "" and ranks[1][1] == "" and ranks[1][2] == ""


def test_bad_input_is_reported_once_by_rank_zero(model_dir, tmp_path):
    ranks = run_cli(2, ["generate", "-m", str(model_dir), "--token-ids", "1,x"], tmp_path)
    assert [code for code, _, _ in ranks] == [1, 1]
    assert ranks[0][2].startswith("Error: token ids must be integers")
    assert ranks[1][2] == ""


@pytest.mark.parametrize("world", [2, 4])
def test_expert_stats_counts_on_ranks_equal_one_process(model_dir, tmp_path, world):
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 6 + "for item in items:\n    print(item)\n" * 4)
    output = tmp_path / "stats.json"
    args = ["expert-stats", str(text), "-m", str(model_dir), "--seq-len", "32", "--apply-drop", "1.0", "-f", "json"]
    single = runner.invoke(app, args)
    assert single.exit_code == 0, single.output
    expected = json.loads(single.stdout)

    ranks = run_cli(world, [*args, "--output", str(output)], tmp_path)
    assert [code for code, _, _ in ranks] == [0] * world
    assert all(out == "" and err == "" for _, out, err in ranks[1:])
    doc = json.loads(output.read_text())  # written once, by rank 0
    assert [layer["counts"] for layer in doc["layers"]] == [layer["counts"] for layer in expected["layers"]]
    assert doc["drop_overall"] == expected["drop_overall"]
    assert doc["apply_drop"]["perplexity"] == pytest.approx(expected["apply_drop"]["perplexity"], rel=1e-5)
    # the load each rank's experts carried, gathered across ranks, adds up to every assignment
    loads = [line for line in ranks[0][2].splitlines() if "assignments" in line]
    assert len(loads) == world
    total = sum(int(line.split(": ")[1].split()[0]) for line in loads)
    assert total == sum(sum(layer["counts"]) for layer in expected["layers"])
