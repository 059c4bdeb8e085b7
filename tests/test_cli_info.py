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
