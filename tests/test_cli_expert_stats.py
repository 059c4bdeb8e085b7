"""`dsv2 expert-stats` through the CLI: JSON contract, inputs, exports, drop application, placement, errors."""

import csv
import io
import json

import pytest
import torch
from typer.testing import CliRunner

from dsv2cli.cli import expert_stats as expert_stats_cli
from dsv2cli.cli.main import app
from dsv2cli.inference.tokenizer import TextTokenizer
from tests.helpers import CORPUS, one_error_line, reference_model, save_reference, save_tokenizer

runner = CliRunner()
TEXT = "".join(CORPUS[:5]) * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli_stats")
    save_reference(reference_model(vocab_size=320), directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "code.py"
    path.write_text(TEXT)
    return path


def _invoke(model_dir, *args):
    return runner.invoke(app, ["expert-stats", "-m", str(model_dir), "--threads", "1", *map(str, args)])


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_contract(model_dir, text_file):
    tokens = len(TextTokenizer.from_directory(model_dir).encode(TEXT))
    doc = _json(_invoke(model_dir, text_file, "--seq-len", 50, "-f", "json"))
    assert doc["tokens"] == tokens and doc["sequences"] == -(-tokens // 50)
    assert (doc["top_k"], doc["n_routed_experts"], doc["n_shared_experts"]) == (2, 8, 1)
    assert doc["devices"] == 4 and doc["max_devices_per_token"] == 2  # n_group = 4, topk_group = 2
    assert doc["drop_batches"] == {"tokens_per_batch": "sequence", "count": doc["sequences"]}
    assert [layer["layer"] for layer in doc["layers"]] == [1, 2]
    for layer in doc["layers"]:
        assert sum(layer["counts"]) == tokens * 2
        assert len(layer["load_fraction"]) == 8
        for key in ("max_over_mean", "min_over_mean", "cv", "normalized_entropy", "balancedness"):
            assert isinstance(layer[key], float)
        assert layer["expert_balance"] > 0 and layer["device_balance"] > 0 and layer["communication_balance"] > 0
        assert [(d["policy"], d["capacity_factor"]) for d in layer["drop"]] == [
            (p, cf) for p in ("device", "expert") for cf in (1.0, 1.25, 1.5, 2.0)
        ]
        for d in layer["drop"]:
            assert set(d) >= {"policy", "capacity_factor", "assignment_drop_rate", "token_drop_rate", "full_drop_rate"}
            assert 0.0 <= d["full_drop_rate"] <= d["token_drop_rate"] <= 1.0
    assert set(doc["summary"]["balancedness"]) == {"mean", "min", "p50", "p90", "max", "worst_layer"}
    assert doc["apply_drop"] is None and doc["plan"] is None


def test_text_report_both_views(model_dir, text_file):
    for view in ("bars", "heatmap"):
        result = _invoke(model_dir, text_file, "--view", view, "--top-tokens", 2, "--plan-devices", 2)
        assert result.exit_code == 0, result.output
        assert "L1" in result.stdout and "L2" in result.stdout
        assert "Token dropping" in result.stdout and "Placement on 2 devices" in result.stdout
        assert "tokens/s" in result.stderr


def test_directory_and_jsonl_inputs(model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.py").write_text(TEXT)
    (corpus / "sub" / "b.txt").write_text(TEXT)
    (corpus / "blob.bin").write_bytes(b"\x00\x01binary")
    tokens = len(TextTokenizer.from_directory(model_dir).encode(TEXT))
    assert 200 < tokens < 400
    doc = _json(_invoke(model_dir, corpus, "--seq-len", 200, "-f", "json"))
    # Each file is cut on its own (200 + rest, twice); packing both would give ceil(2 * tokens / 200) = 3 or 4.
    assert doc["tokens"] == 2 * tokens and doc["sequences"] == 4  # the binary file is skipped
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps({"text": "def add(a, b):"}) + "\n\n" + json.dumps({"prompt_token_ids": [0, 5, 6, 7]}) + "\n")
    doc = _json(_invoke(model_dir, lines, "-f", "json"))
    assert doc["sequences"] == 2 and doc["tokens"] == len(TextTokenizer.from_directory(model_dir).encode("def add(a, b):")) + 4


def test_max_tokens_bounds_the_work(model_dir, text_file):
    result = _invoke(model_dir, text_file, "--max-tokens", 37, "-f", "json")
    doc = _json(result)
    assert doc["tokens"] == 37 and doc["truncated"] is True
    assert "--max-tokens" in result.stderr


def test_csv_output_file_and_save_loads(model_dir, text_file, tmp_path):
    result = _invoke(model_dir, text_file, "-f", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2 * 8 and set(rows[0]) == {"layer", "expert", "count", "load_fraction"}
    report = tmp_path / "report.json"
    loads_json, loads_csv, loads_st = tmp_path / "loads.json", tmp_path / "loads.csv", tmp_path / "loads.safetensors"
    result = _invoke(model_dir, text_file, "-o", report, "--save-loads", loads_json)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    matrix = [layer["counts"] for layer in doc["layers"]]
    assert [int(r["count"]) for r in rows] == [c for layer in matrix for c in layer]
    saved = json.loads(loads_json.read_text())
    assert saved["loads"] == matrix and saved["layers"] == [1, 2] and saved["n_routed_experts"] == 8
    assert _invoke(model_dir, text_file, "--save-loads", loads_csv, "-f", "json").exit_code == 0
    header, *table = list(csv.reader(io.StringIO(loads_csv.read_text())))
    assert header[:2] == ["layer", "expert_0"] and [[int(v) for v in row[1:]] for row in table] == matrix
    assert _invoke(model_dir, text_file, "--save-loads", loads_st, "-f", "json").exit_code == 0
    from safetensors.torch import load_file

    assert load_file(loads_st)["loads"].tolist() == matrix
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_apply_drop_and_top_tokens(model_dir, text_file):
    doc = _json(_invoke(model_dir, text_file, "--apply-drop", 1e6, "--top-tokens", 3, "-f", "json"))
    apply = doc["apply_drop"]
    assert apply["loss_with_drop"] == apply["loss"] and apply["assignment_drop_rate"] == 0.0
    assert apply["perplexity"] == pytest.approx(torch.tensor(apply["loss"]).exp().item())
    tops = doc["layers"][0]["top_tokens"]
    assert len(tops) == 8 and all(len(t) <= 3 for t in tops)
    assert sum(t["count"] for t in tops[0]) <= doc["layers"][0]["counts"][0]
    assert all(isinstance(t["text"], str) for t in tops[0])
    doc = _json(_invoke(model_dir, text_file, "--apply-drop", 1.0, "--apply-policy", "expert", "-f", "json"))
    assert doc["apply_drop"]["assignment_drop_rate"] > 0 and doc["apply_drop"]["policy"] == "expert"


def test_plan_and_placement_round_trip(model_dir, text_file, tmp_path):
    report = tmp_path / "plan.json"
    assert _invoke(model_dir, text_file, "--plan-devices", 4, "-f", "json", "-o", report).exit_code == 0
    doc = json.loads(report.read_text())
    for layer in doc["plan"]["layers"]:
        assert layer["balancedness_after"] >= layer["balancedness_before"] - 1e-9
    again = _json(_invoke(model_dir, text_file, "--placement", report, "-f", "json"))
    assert again["placement"] == str(report)
    for layer, planned in zip(again["layers"], doc["plan"]["layers"], strict=True):
        assert layer["device_loads"] == pytest.approx(planned["loads_after"])
    redundant = _json(_invoke(model_dir, text_file, "--plan-devices", 2, "--redundant", 2, "-f", "json"))
    assert all(sum(len(g) for g in layer["devices"]) == 10 for layer in redundant["plan"]["layers"])


def test_plot(model_dir, text_file, tmp_path):
    path = tmp_path / "loads.png"
    result = _invoke(model_dir, text_file, "--plot", path, "-f", "json")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in one_error_line(result) and not path.exists()
        return
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bundled_sample_is_the_default_input(model_dir, tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    demo.mkdir()
    for item in model_dir.iterdir():
        (demo / item.name).write_bytes(item.read_bytes())
    (demo / "sample.txt").write_text(TEXT)
    monkeypatch.setattr(expert_stats_cli, "bundled_model_dir", lambda: demo)
    monkeypatch.setattr("dsv2cli.checkpoint.resolve.bundled_model_dir", lambda: demo)
    doc = _json(runner.invoke(app, ["expert-stats", "-f", "json", "--threads", "1"]))
    assert doc["model"] == "demo" and doc["tokens"] == len(TextTokenizer.from_directory(demo).encode(TEXT))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--capacity-factor", "0"], "must be a positive number"),
        (["--capacity-factor", "-1"], "must be a positive number"),
        (["--apply-drop", "0"], "must be a positive number"),
        (["--devices", "3"], "do not divide the 8 routed experts"),
        (["--plan-devices", "3"], "cannot be spread evenly"),
        (["--seq-len", "100000"], "longer than the model's context"),
        (["-o", "report.txt"], "choose --format json or csv"),
        (["--save-loads", "loads.pt"], "--save-loads writes"),
    ],
)
def test_bad_options_give_one_error_line(model_dir, text_file, args, message):
    assert message in one_error_line(_invoke(model_dir, text_file, *args))


def test_bad_inputs_give_one_error_line(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in one_error_line(_invoke(model_dir, empty))
    oov = tmp_path / "oov.jsonl"
    oov.write_text(json.dumps({"prompt_token_ids": [1, 2, 320]}) + "\n")
    assert "outside the vocabulary" in one_error_line(_invoke(model_dir, oov))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert "'text' or 'prompt_token_ids'" in one_error_line(_invoke(model_dir, bad))
    assert "not found" in one_error_line(_invoke(model_dir, tmp_path / "missing.txt"))
    assert "no input given" in one_error_line(_invoke(model_dir))
    text = tmp_path / "x.txt"
    text.write_text(TEXT)
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"devices": [[0, 1, 2, 3], [4, 5, 6, 6]]}))
    assert "exactly one device" in one_error_line(_invoke(model_dir, text, "--placement", placement))


def test_help_has_examples():
    result = runner.invoke(app, ["expert-stats", "--help"])
    assert result.exit_code == 0
    assert "--capacity-factor" in result.stdout and "dsv2 expert-stats" in result.stdout
