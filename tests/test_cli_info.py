import json

from typer.testing import CliRunner

from dsv2cli import __version__
from dsv2cli.cli.main import app
from tests.helpers import reference_model, save_reference

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_info_json_preset():
    result = runner.invoke(app, ["info", "deepseek-v2", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["total_params"] == 235_741_434_880
    assert doc["active_params"] == 21_375_800_320
    assert doc["kv_cache_elements_per_token"] == 34_560


def test_info_directory_text(tmp_path):
    save_reference(reference_model(), tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "MLA" in result.stdout and "KV cache" in result.stdout


def test_info_unknown_model_is_one_error_line():
    result = runner.invoke(app, ["info", "no-such-model"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Error: ") and "no-such-model" in lines[0]
    assert "Traceback" not in result.output


def test_info_bad_config_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2", "hidden_size": 8}))
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1
    assert "vocab_size" in result.stderr


def test_usage_error_exits_2():
    result = runner.invoke(app, ["info", "deepseek-v2", "--format", "yaml"])
    assert result.exit_code == 2


def test_info_says_what_fits_where():
    """V2-Lite on a 24 GiB machine: int8 fits, bfloat16 takes two machines; V2 (236B) in int8 fits in 512 GiB."""
    lite = json.loads(runner.invoke(app, ["info", "deepseek-v2-lite", "--format", "json"]).stdout)["fits"]
    rows = {row["precision"]: row for row in lite}
    routers = 26 * 64 * 2048  # float32, 2 bytes more than bfloat16 each
    assert rows["bfloat16"]["weight_bytes"] == 2 * 15_706_484_224 + 2 * routers
    assert rows["float32"]["weight_bytes"] == 4 * 15_706_484_224
    assert 16e9 < rows["int8"]["weight_bytes"] < 17e9  # one byte per weight, scales and floats for the rest
    assert rows["int8"]["machines"] == {"24": 1, "64": 1, "128": 1, "512": 1}
    assert rows["bfloat16"]["machines"]["24"] == 2 and rows["bfloat16"]["machines"]["64"] == 1
    v2 = {
        row["precision"]: row
        for row in json.loads(runner.invoke(app, ["info", "deepseek-v2", "--format", "json"]).stdout)["fits"]
    }
    assert v2["int8"]["machines"]["512"] == 1 and v2["bfloat16"]["machines"]["512"] == 1
    assert v2["int8"]["machines"]["128"] == 2
    text = runner.invoke(app, ["info", "deepseek-v2-lite"]).stdout
    assert "one process needs" in text and "2 machines" in text
