"""`torchrun -m dsv2cli cache-report --measure`: the cache of a model split across ranks, measured per rank."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dsv2cli.cli.main import app
from tests.test_parallel_cli import run_cli

runner = CliRunner()
ARGS = ["cache-report", "tiny", "--measure", "--dtype", "float32", "--measure-context", "32", "--decode-steps", "4", "-f", "json"]


def _rows(doc: dict) -> dict[str, dict]:
    return {row["scheme"]: row for row in doc["measured"]["rows"]}


def test_measure_on_two_ranks(tmp_path):
    single = runner.invoke(app, ARGS)
    assert single.exit_code == 0, single.output
    alone = _rows(json.loads(single.stdout))

    (code0, out0, err0), (code1, out1, err1) = run_cli(2, ARGS, tmp_path)
    assert code0 == code1 == 0, err0 + err1
    assert out1 == ""  # only rank 0 prints
    doc = json.loads(out0)
    assert doc["measured"]["ranks"] == 2
    split = _rows(doc)
    # the latent is shared by all heads, so every rank caches all of it ...
    assert split["mla"]["measured_bytes"] == alone["mla"]["measured_bytes"] == split["mla"]["predicted_bytes"]
    # ... while an expanded cache would hold only the rank's heads
    assert split["mla-expanded"]["measured_bytes"] * 2 == alone["mla-expanded"]["measured_bytes"]
    assert all(row["matches"] for row in split.values())
    assert doc["measured"]["logit_difference"] < 1e-5
    assert "rank 1: mla" in err0
