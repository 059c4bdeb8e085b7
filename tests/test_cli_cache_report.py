"""`dsv2 cache-report` through the real CLI: JSON contract, csv/markdown, budget, baseline, measure, errors."""

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from dsv2cli.cli.main import app
from tests.helpers import TINY_HF, reference_model, save_reference

runner = CliRunner()


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["cache-report", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_error_line(args: list[str], *needles: str) -> None:
    result = runner.invoke(app, ["cache-report", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Error: "), result.stderr
    assert sum(line.startswith("Error") for line in lines) == 1
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_json_contract_default_model():
    doc = run_json()
    assert doc["model"] == "deepseek-v2" and doc["precision"]["name"] == "bfloat16"
    schemes = [r["scheme"] for r in doc["rows"]]
    assert schemes == ["mla", "mla-expanded", "mha", "gqa:8", "gqa:4", "gqa:2", "mqa"]
    for r in doc["rows"]:
        assert {"scheme", "elements_per_token_per_layer", "elements_per_token", "bytes_per_token", "grid"} <= set(r)
        assert r["elements_per_token"] == r["elements_per_token_per_layer"] * 60
        assert r["bytes_per_token"] == r["elements_per_token"] * 2
        assert r["grid"] == [{"batch_size": 1, "context": c, "bytes": r["bytes_per_token"] * c} for c in (4096, 32768, 131072)]
    mla = doc["rows"][0]
    assert (mla["elements_per_token_per_layer"], mla["elements_per_token"], mla["equivalent_gqa_groups"]) == (576, 34_560, 2.25)
    assert doc["reduction"] is None and doc["baseline"] is None and doc["measured"] is None


def test_paper_headline_93_3_percent():
    args = ["deepseek-v2", "--kv-bits", "6", "--baseline", "deepseek-67b", "--baseline-dtype", "bfloat16"]
    doc = run_json(*args)
    assert round(doc["reduction"], 3) == 0.933 and round(doc["architecture_reduction"], 3) == 0.822
    assert doc["rows"][0]["bytes_per_token"] == 25_920 and doc["baseline"]["bytes_per_token"] == 389_120
    assert doc["rows"][0]["reduction"] == doc["reduction"]
    text = runner.invoke(app, ["cache-report", *args])
    assert text.exit_code == 0, text.output
    flat = " ".join(text.stdout.split())
    assert "93.3 %" in flat and "82.2 %" in flat and "389,120" in flat and "25,920" in flat


def test_without_quantisation_82_2_percent():
    doc = run_json("deepseek-v2", "--baseline", "deepseek-67b")
    assert round(doc["reduction"], 3) == 0.822


def test_schemes_dtype_grid():
    doc = run_json("deepseek-v2-lite", "-s", "mla,gqa:2,4", "-s", "mqa", "--dtype", "fp8", "-b", "1", "-b", "4", "-c", "32k")
    assert [r["scheme"] for r in doc["rows"]] == ["mla", "gqa:2", "gqa:4", "mqa"]
    assert doc["rows"][0]["bytes_per_token"] == 15_552
    assert doc["rows"][0]["grid"] == [{"batch_size": b, "context": 32768, "bytes": 15_552 * b * 32768} for b in (1, 4)]


def test_budget_through_the_cli():
    doc = run_json("deepseek-v2-lite", "--memory", "80GiB", "--minus-weights", "-c", "4096")
    available = 80 * 2**30 - 15_706_484_224 * 2
    assert doc["budget"]["available_bytes"] == available
    assert doc["rows"][0]["max_tokens"] == available // 31_104
    assert doc["rows"][0]["max_sequences"] == [{"context": 4096, "sequences": available // 31_104 // 4096}]


def test_csv_output():
    result = runner.invoke(
        app, ["cache-report", "deepseek-v2", "-c", "4k", "-c", "8k", "--baseline", "deepseek-67b", "-f", "csv"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == (7 + 1) * 2  # 7 schemes and the baseline, 2 contexts
    mla = rows[0]
    assert (mla["scheme"], mla["elements_per_token"], mla["context"], mla["bytes"]) == (
        "mla",
        "34560",
        "4096",
        str(69_120 * 4096),
    )
    assert round(float(mla["reduction"]), 3) == 0.822
    assert rows[-1]["scheme"] == "baseline:deepseek-67b" and rows[-1]["bytes"] == str(389_120 * 8192)


def test_markdown_output():
    result = runner.invoke(app, ["cache-report", "deepseek-v2-lite", "-f", "markdown", "--memory", "24GB"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| scheme") and lines[1].startswith("|---")
    assert any(line.startswith("| mla ") and "15,552" in line for line in lines)
    assert "max tokens" in result.stdout and "caches d_c + d_R = 512 + 64" in result.stdout


def test_checkpoint_directory_and_measure(tmp_path):
    save_reference(reference_model(), tmp_path)
    doc = run_json(str(tmp_path), "--measure", "--measure-context", "16", "--decode-steps", "2", "--dtype", "float32")
    per_layer = TINY_HF["kv_lora_rank"] + TINY_HF["qk_rope_head_dim"]
    assert doc["source"] == "directory" and doc["rows"][0]["elements_per_token_per_layer"] == per_layer
    measured = doc["measured"]
    assert measured["weights"] == "checkpoint" and measured["layers"] == TINY_HF["num_hidden_layers"]
    for r in measured["rows"]:
        assert r["measured_bytes"] == r["predicted_bytes"] and r["matches"]
    assert measured["rows"][0]["measured_bytes"] == TINY_HF["num_hidden_layers"] * 16 * per_layer * 4


def test_measure_text_on_a_preset():
    result = runner.invoke(app, ["cache-report", "tiny-lite", "--measure", "--measure-context", "12", "--decode-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.stdout and "predicted" in result.stdout and "yes" in result.stdout


def test_hub_repo_id_fetches_only_the_config(tmp_path, monkeypatch):
    save_reference(reference_model(), tmp_path)
    fetched = []

    def fake_fetch(repo_id, revision=None):
        fetched.append(repo_id)
        return tmp_path / "config.json"

    monkeypatch.setattr("dsv2cli.checkpoint.hub.fetch_config", fake_fetch)
    doc = run_json("someone/tiny-v2", "--baseline", "someone/tiny-v2")
    assert doc["source"] == "hub" and fetched == ["someone/tiny-v2", "someone/tiny-v2"]
    assert doc["reduction"] == 0.0


def test_llama_config_as_baseline(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "hidden_size": 8192,
            }
        )
    )
    doc = run_json("deepseek-v2", "--baseline", str(tmp_path))
    assert doc["baseline"]["scheme"] == "gqa:8" and doc["baseline"]["elements_per_token"] == 2 * 8 * 128 * 80


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no-such-model"], "no-such-model"),
        (["deepseek-v2", "--batch-size", "0"], "--batch-size"),
        (["deepseek-v2", "--context", "-4096"], "--context"),
        (["deepseek-v2", "--schemes", "mla,gqa-ish"], "gqa-ish"),
        (["deepseek-v2", "--schemes", "gqa:0"], "GQA"),
        (["deepseek-67b"], "baseline"),
        (["deepseek-v2", "--dtype", "bfloat16", "--kv-bits", "6"], "not both"),
        (["deepseek-v2", "--dtype", "float64"], "float64"),
        (["deepseek-v2", "--minus-weights"], "--memory"),
        (["deepseek-v2", "--memory", "80GiB", "--minus-weights"], "weights"),
        (["deepseek-v2", "--memory", "a lot"], "memory"),
        (["deepseek-v2", "--baseline", "no-such-baseline"], "no-such-baseline"),
        (["tiny", "--measure", "--dtype", "fp8"], "--measure"),
        (["tiny", "--measure", "-f", "csv"], "CSV"),
        (["deepseek-v2", "--plot", "out.txt"], "--plot"),
    ],
)
def test_bad_input_is_one_error_line(args, needle):
    assert_one_error_line(args, needle)


def test_non_deepseek_config_as_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64}))
    assert_one_error_line([str(tmp_path)], "model_type")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}))
    assert_one_error_line([str(tmp_path)], "config.json")


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert_one_error_line(["tiny", "--plot", str(tmp_path / "cache.png")], "matplotlib")
    assert list(tmp_path.iterdir()) == []


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "cache.png"
    result = runner.invoke(app, ["cache-report", "deepseek-v2-lite", "--baseline", "deepseek-67b", "--plot", str(path)])
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.png"]  # no temporary file left
