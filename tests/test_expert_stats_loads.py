"""`dsv2 expert-stats --loads FILE`: the report of recorded loads (its own exports, a server's dump) without a model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dsv2cli.analysis.expert_drop import drops_of_loads, simulate_drops
from dsv2cli.analysis.placement import contiguous_placement, device_loads
from dsv2cli.cli.main import app
from dsv2cli.config import ModelConfig
from dsv2cli.model.moe import RoutingDecision
from dsv2cli.serve.experts import ExpertRecorder
from tests.helpers import CORPUS, one_error_line, reference_model, save_reference, save_tokenizer

runner = CliRunner()
TEXT = "".join(CORPUS[:5]) * 3
MEASURED = [
    "--seq-len",
    "50",
    "--batch-tokens",
    "1000000",
    "--plan-devices",
    "2",
    "--capacity-factor",
    "1",
    "--capacity-factor",
    "1.1",
]
FROM_LOADS = ["--plan-devices", "2", "--capacity-factor", "1", "--capacity-factor", "1.1"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A model run on text: its JSON report, its --save-loads JSON and the report's document."""
    directory = tmp_path_factory.mktemp("loads")
    model_dir = save_reference(reference_model(vocab_size=320), directory / "model")
    save_tokenizer(model_dir)
    text = directory / "code.py"
    text.write_text(TEXT)
    report, loads = directory / "report.json", directory / "loads.json"
    args = ["expert-stats", str(text), "-m", str(model_dir), "--threads", "1", *MEASURED]
    result = runner.invoke(app, [*args, "-f", "json", "-o", str(report), "--save-loads", str(loads)])
    assert result.exit_code == 0, result.output
    return directory, json.loads(report.read_text()), loads, report


def _from_loads(path, *args):
    result = runner.invoke(app, ["expert-stats", "--loads", str(path), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def _report(path, *args):
    return json.loads(_from_loads(path, "-f", "json", *FROM_LOADS, *args).stdout)


def test_save_loads_json_carries_what_a_report_needs(measured):
    _, doc, loads, _ = measured
    saved = json.loads(loads.read_text())
    assert saved["loads"] == [layer["counts"] for layer in doc["layers"]]
    assert saved["layers"] == [layer["layer"] for layer in doc["layers"]]
    for key in ("model", "tokens", "top_k", "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "topk_method"):
        assert saved[key] == doc[key], key
    assert (saved["n_group"], saved["topk_group"], saved["topk_method"]) == (4, 2, "group_limited_greedy")


def test_loads_give_the_measured_report_where_counts_determine_it(measured):
    """With one drop batch of all the tokens (--batch-tokens ≥ tokens), every count-determined number is the model run's."""
    _, doc, loads, _ = measured
    got = _report(loads)
    assert got["loads_file"] == "loads.json" and got["sequences"] is None
    same = ("model", "tokens", "top_k", "n_routed_experts", "n_shared_experts", "devices", "max_devices_per_token", "placement")
    assert {k: got[k] for k in same} == {k: doc[k] for k in same}
    assert got["plan"] == doc["plan"]
    metrics = ("counts", "load_fraction", "max_over_mean", "min_over_mean", "cv", "normalized_entropy", "balancedness")
    for mine, theirs in zip(got["layers"], doc["layers"], strict=True):
        assert {k: mine[k] for k in (*metrics, "device_loads", "device_balancedness")} == {
            k: theirs[k] for k in (*metrics, "device_loads", "device_balancedness")
        }
        assert mine["expert_balance"] is None and mine["device_balance"] is None and mine["communication_balance"] is None
    for mine_drops, theirs_drops in [(got["drop_overall"], doc["drop_overall"])] + [
        (a["drop"], b["drop"]) for a, b in zip(got["layers"], doc["layers"], strict=True)
    ]:
        assert len(mine_drops) == len(theirs_drops) == 4
        for mine, theirs in zip(mine_drops, theirs_drops, strict=True):
            keys = ("policy", "capacity_factor", "drop_order", "dropped_assignments", "assignments", "assignment_drop_rate")
            assert {k: mine[k] for k in keys} == {k: theirs[k] for k in keys}
            assert mine["token_drop_rate"] is None and mine["full_drop_rate"] is None
    assert any(d["dropped_assignments"] for d in doc["drop_overall"])  # the comparison covers real drops
    assert set(got["summary"]) == set(doc["summary"]) - {"expert_balance", "device_balance", "communication_balance"}
    for name, values in got["summary"].items():
        assert values == doc["summary"][name]


def test_report_json_loads_json_and_server_dump_give_one_report(measured):
    directory, doc, loads, report = measured
    config = _config(directory)
    recorder = ExpertRecorder(config, doc["model"])
    recorder.counts = torch.tensor([layer["counts"] for layer in doc["layers"]])
    recorder.tokens = doc["tokens"]
    dump = directory / "dump.json"
    dump.write_text(json.dumps(recorder.document()))
    reports = [_report(path) for path in (loads, report, dump)]
    for r in reports:
        r.pop("loads_file")
    assert reports[0] == reports[1] == reports[2]
    again = directory / "again.json"
    _from_loads(dump, "--save-loads", again)
    assert json.loads(again.read_text()) == json.loads(loads.read_text())


def test_text_report_views_and_placement(measured, tmp_path):
    _, _, loads, _ = measured
    for view in ("bars", "heatmap"):
        out = _from_loads(loads, "--view", view, "--plan-devices", "4").stdout
        assert "tokens recorded in loads.json" in out and "Across layers" in out and "Placement on 4 devices" in out
        assert "measured on the same loads" in out
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"devices": [[0, 2, 4, 6], [1, 3, 5, 7]]}))
    got = _report(loads, "--placement", placement)
    assert got["devices"] == 2 and got["placement"].endswith("p.json")
    csv = _from_loads(loads, "-f", "csv").stdout.splitlines()
    assert csv[0] == "layer,expert,count,load_fraction" and len(csv) == 1 + 2 * 8


def test_help_shows_loads():
    result = runner.invoke(app, ["expert-stats", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--loads" in result.stdout and "dsv2 expert-stats --loads dump.json" in result.stdout


def test_a_hand_written_document_needs_only_the_sglang_fields(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps({"layers": [1, 3], "n_routed_experts": 4, "tokens": 10, "top_k": 2, "loads": [[5, 5, 5, 5], [8, 4, 4, 4]]})
    )
    got = json.loads(_from_loads(path, "-f", "json").stdout)
    assert got["model"] == "mine" and got["n_shared_experts"] == 0 and got["devices"] == 4  # 8 does not divide 4 experts
    assert [layer["max_over_mean"] for layer in got["layers"]] == pytest.approx([1.0, 1.6])


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "must be a JSON object"),
        ({"hello": 1}, "no field 'loads'"),
        ({"loads": [[1]], "layers": [1], "top_k": 1, "tokens": 1}, "'n_routed_experts' is missing"),
        ({"loads": [[1, 1]], "layers": [1], "n_routed_experts": 2, "top_k": 3, "tokens": 1}, "'top_k' must be at most 2"),
        ({"loads": [[0, 0]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 0}, "no tokens were recorded"),
        ({"loads": [[1, 1]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": -2}, "'tokens' must be at least 1"),
        ({"loads": [[1, 1, 1]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "must be 2 counts"),
        ({"loads": [[1, 1]], "layers": [1, 2], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "1 rows of loads for 2 layers"),
        ({"loads": [[1, -1]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "whole numbers, 0 or more"),
        ({"loads": [[1, 1.5]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "whole numbers, 0 or more"),
        ({"loads": [[9, 9]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "more than tokens × top_k = 9"),
        ({"loads": [[1, 1], [1, 1]], "layers": [2, 2], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "distinct"),
        ({"loads": [[1, 1]], "layers": ["a"], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "layer indices"),
        ({"loads": "x", "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "'loads' must be a list"),
        ({"loads": [[1, 1]], "layers": [1], "n_routed_experts": 2, "top_k": 1, "tokens": 9, "n_group": 3}, "'n_group' must"),
        ({"layers": [{"layer": 1}], "n_routed_experts": 2, "top_k": 1, "tokens": 9}, "'layers[0].counts' is missing"),
    ],
)
def test_bad_loads_files_give_one_error_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    line = one_error_line(runner.invoke(app, ["expert-stats", "--loads", str(path)]))
    assert message in line, line


def test_huge_or_missing_loads_files_and_model_options_are_refused(measured, tmp_path):
    directory, _, loads, _ = measured
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(17 << 20)  # sparse: bounded reading stops after 16 MiB + 1 byte
    result = runner.invoke(app, ["expert-stats", "--loads", str(huge)])
    assert "larger than 16 MiB" in one_error_line(result) and "dump_expert_distribution_record" in result.stderr
    assert "cannot read it" in one_error_line(runner.invoke(app, ["expert-stats", "--loads", str(tmp_path / "none.json")]))
    for args, message in [
        ([str(directory / "code.py")], "leave out INPUT"),
        (["-m", "demo"], "leave out --model"),
        (["--seq-len", "8"], "leave out --seq-len"),
        (["--apply-drop", "1"], "--apply-drop needs the model run on text"),
        (["--top-tokens", "3"], "--top-tokens needs the model run on text"),
        (["--batch-tokens", "64"], "--batch-tokens needs the routing token by token"),
        (["--plan-devices", "3"], "cannot be spread evenly"),
    ]:
        line = one_error_line(runner.invoke(app, ["expert-stats", "--loads", str(loads), *args]))
        assert message in line, (args, line)


@pytest.mark.parametrize("policy", ["device", "expert"])
def test_drops_of_loads_equal_the_simulation_with_one_batch(policy):
    generator = torch.Generator().manual_seed(0)
    tokens, experts, k, devices = 300, 16, 4, 4
    skew = torch.linspace(0.5, 2.0, experts)
    ids = torch.stack([torch.multinomial(skew, k, generator=generator) for _ in range(tokens)])  # [N, K], distinct per token
    affinity = torch.rand(tokens, k, generator=generator)
    factors = [0.8, 1.0, 1.3, 4.0]
    simulated = simulate_drops(ids, affinity, [(0, tokens)], policy, factors, experts, devices)
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    buckets = device_loads(counts, contiguous_placement(experts, devices).layout(1)) if policy == "device" else counts
    from_loads = drops_of_loads(buckets, tokens, k, policy, factors)
    assert [(d.dropped, d.assignments) for d in from_loads] == [(d.dropped, d.assignments) for d in simulated]
    assert from_loads[0].dropped > 0 and from_loads[-1].dropped == 0


def _config(directory):
    return ModelConfig.from_hf(json.loads((directory / "model" / "config.json").read_text()))


def test_server_recorder_counts_routed_rows_only(measured):
    config = _config(measured[0])
    recorder = ExpertRecorder(config, "m")
    ids = torch.tensor([[0, 1], [2, 3], [1, -1]])  # 3 rows of one token; the last assignment dropped
    recorder.next_forward(torch.tensor([True, False, True]))
    for layer in config.moe_layer_indices:
        recorder(RoutingDecision(layer, (3, 1), torch.zeros(3, 8), torch.zeros(3, 8), ids, torch.ones(3, 2)))
    doc = recorder.document()
    assert doc["tokens"] == 2 and doc["loads"] == [[1, 2, 0, 0, 0, 0, 0, 0]] * len(config.moe_layer_indices)
    assert doc["model"] == "m" and doc["top_k"] == 2 and doc["n_routed_experts"] == 8
