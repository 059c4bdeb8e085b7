"""`dsv2 train` through the CLI: a tiny run with JSON output, resume, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dsv2cli
from dsv2cli.cli.main import app

CORPUS = str(Path(dsv2cli.__file__).parent / "model")
TINY = [
    "--vocab-size", "300", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--experts", "8", "--top-k", "2",
    "--moe-intermediate-size", "16", "--intermediate-size", "64", "--kv-lora-rank", "16", "--q-lora-rank", "0",
    "--set", "qk_nope_head_dim=8", "--set", "qk_rope_head_dim=4", "--set", "v_head_dim=8", "--set", "rope_scaling=null",
    "--seq-len", "32", "--batch-size", "4", "--held-out", "0.2", "--eval-tokens", "128", "--warmup-steps", "1",
]  # fmt: skip


def run(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def test_tiny_run_json_and_resume(tmp_path):
    out = tmp_path / "m"
    result = run(CORPUS, "--out", str(out), *TINY, "--max-steps", "3", "--devices", "4", "--max-devices-per-token", "2",
                 "--expert-alpha", "0.01", "--capacity-factor", "1.0", "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["steps"] == 3 and doc["eval_loss"] > 0 and doc["drop_rate"] is not None
    config = json.loads((out / "config.json").read_text())
    assert config["q_lora_rank"] is None and config["n_group"] == 4 and config["num_experts_per_tok"] == 2
    summary = json.loads((out / "training.json").read_text())
    assert summary["command"].startswith("dsv2 ")
    again = run("--resume", str(out), "--format", "json")  # already finished: nothing left to do
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["steps"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/dir/*.txt", "--out", "{out}"], "no such file"),
        (["{empty}", "--out", "{out}"], "usable text file"),
        ([CORPUS], "--out is required"),
        ([CORPUS, "--out", "{out}", "--devices", "3"], "n_group"),
        ([CORPUS, "--out", "{out}", "--devices", "4", "--max-devices-per-token", "5"], "--max-devices-per-token"),
        ([CORPUS, "--out", "{out}", "--capacity-factor", "0"], "--capacity-factor"),
        ([CORPUS, "--out", "{out}", "--held-out", "1.5"], "--held-out"),
        ([CORPUS, "--out", "{out}", "--vocab-size", "100"], "--vocab-size"),
        ([CORPUS, "--out", "{out}", "--dtype", "int8"], "dtype"),
        ([CORPUS, "--out", "{out}", "--set", "novalue"], "KEY=VALUE"),
        ([CORPUS, "--out", "{out}", "--expert-alpha", "-1"], "must not be negative"),
        (["--resume", "{empty}"], "no resumable trainer state"),
        ([CORPUS, "--out", "{out}", "--init-from", "demo", "--layers", "3"], "--layers cannot change"),
        ([CORPUS, "--out", "{out}", "--init-from", "demo", "--vocab-size", "300"], "--vocab-size cannot change"),
        ([CORPUS, "--out", "{out}", "--init-from", "/nonexistent/model"], "--init-from '/nonexistent/model' not found"),
        ([CORPUS, "--out", "{out}", "--init-from", "{empty}"], "no config.json"),
        (["--resume", "{empty}", "--init-from", "demo"], "--init-from starts a new run"),
        ([], "no training text"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bin.dat").write_bytes(b"\x00\x01\x02")
    filled = [a.format(out=tmp_path / "out", empty=empty) for a in args]
    result = run(*filled)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run(CORPUS, "--out", str(out), *TINY, "--max-steps", "1")
    assert result.exit_code == 1 and "not empty" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"
    replaced = run(CORPUS, "--out", str(out), *TINY, "--max-steps", "1", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_help_has_examples():
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "--capacity-factor" in result.stdout


def test_resume_of_a_moved_run_writes_where_it_is_now(tmp_path):
    first, moved = tmp_path / "runA", tmp_path / "runB"
    assert run(CORPUS, "--out", str(first), *TINY, "--max-steps", "3", "--save-every", "1").exit_code == 0
    state = json.loads((first / "trainer" / "state.json").read_text())
    state["step"] = 1  # as if it had been stopped after its first checkpoint
    (first / "trainer" / "state.json").write_text(json.dumps(state))
    first.rename(moved)
    first.mkdir()
    (first / "mine.txt").write_text("a directory the user put at the old place")
    resumed = run("--resume", str(moved), "--format", "json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["steps"] == 3
    assert json.loads((moved / "trainer" / "state.json").read_text())["step"] == 3
    assert [p.name for p in first.iterdir()] == ["mine.txt"]


def test_output_appearing_mid_run_is_left_alone(tmp_path, monkeypatch):
    from dsv2cli.training import checkpointing

    out = tmp_path / "out"
    original = checkpointing.write_generation_config

    def appear(config, directory):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        original(config, directory)

    monkeypatch.setattr(checkpointing, "write_generation_config", appear)
    result = run(CORPUS, "--out", str(out), *TINY, "--max-steps", "1")
    assert result.exit_code == 1 and "changed while this command ran" in result.stderr, result.output
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.result-")]
    assert len(kept) == 1 and (kept[0] / "trainer" / "state.json").is_file()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: "{not json", "not valid JSON"),
        (lambda s: s[: len(s) // 2], "not valid JSON"),
        (lambda s: json.dumps({**json.loads(s), "step": -5}), "'step' must be at least 0"),
        (lambda s: json.dumps({**json.loads(s), "step": "3"}), "'step' must be an integer"),
        (lambda s: json.dumps({**json.loads(s), "settings": []}), "settings"),
        (lambda s: json.dumps({**json.loads(s), "settings": {**json.loads(s)["settings"], "lr": "fast"}}), "'lr'"),
        (lambda s: json.dumps({**json.loads(s), "settings": {**json.loads(s)["settings"], "lr": -1}}), "--lr"),
        (lambda s: "[" * 100000 + "]" * 100000, "nested"),
    ],
)
def test_damaged_trainer_state_is_one_error_line(tmp_path, edit, message):
    out = tmp_path / "m"
    assert run(CORPUS, "--out", str(out), *TINY, "--max-steps", "2").exit_code == 0
    state = out / "trainer" / "state.json"
    state.write_text(edit(state.read_text()))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("--resume", str(out))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_damaged_trainer_weights_are_one_error_line(tmp_path):
    out = tmp_path / "m"
    assert run(CORPUS, "--out", str(out), *TINY, "--max-steps", "2").exit_code == 0
    state = json.loads((out / "trainer" / "state.json").read_text())
    state["step"] = 1
    (out / "trainer" / "state.json").write_text(json.dumps(state))
    weights = out / "trainer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = run("--resume", str(out))
    assert result.exit_code == 1 and "cannot be restored" in result.stderr and "Traceback" not in result.output
