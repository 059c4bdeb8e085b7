"""Shared options (one format enum, each command's subset) and core errors shown with flag names."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dsv2cli.cli.common import flag_text
from dsv2cli.cli.main import app
from dsv2cli.errors import InputError

runner = CliRunner()


def test_core_fields_become_flags():
    assert flag_text("`max_new_tokens` must be at least 1, got 0") == "--max-new-tokens must be at least 1, got 0"
    assert flag_text("decode eagerly (`compile=False`)") == "decode eagerly (--no-compile)"
    assert flag_text("use `device=cpu`") == "use --device cpu"
    assert flag_text("`attention_kernel=True` asked") == "--attention-kernel asked"
    assert flag_text("give either `devices` or `placement_file`") == "give either --devices or --placement"
    assert flag_text("see `dsv2 info --help`") == "see `dsv2 info --help`"  # not a field: left alone


def test_errors_list_the_fields_they_name():
    error = InputError("`redundant` needs `plan_devices`", hint="set `plan_devices=8`")
    assert error.fields == ("redundant", "plan_devices")


def test_a_command_takes_only_its_formats():
    result = runner.invoke(app, ["info", "tiny", "--format", "csv"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "'csv' is not one of 'text', 'json'" in result.output
    doc = json.loads(runner.invoke(app, ["info", "tiny", "-f", "json"]).stdout)
    assert doc["model"] == "tiny"


def test_help_keeps_examples_and_choices():
    for command, formats in (("info", "<text|json>"), ("cache-report", "<text|json|csv|markdown>")):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Examples:" in result.output and formats in result.output
