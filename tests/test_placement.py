"""Expert placement: contiguous groups, placement files, device loads with replicas, the balanced plan."""

import json

import pytest
import torch

from dsv2cli.analysis.placement import (
    balancedness,
    contiguous_placement,
    device_loads,
    even_layout,
    plan_layout,
    plan_placement,
    read_placement,
)
from dsv2cli.errors import InputError


def test_contiguous_placement_and_its_errors():
    p = contiguous_placement(8, 4)
    assert p.devices == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert p.expert_order(1) is None and p.num_devices == 4
    with pytest.raises(InputError, match="do not divide"):
        contiguous_placement(8, 3)
    with pytest.raises(InputError):
        contiguous_placement(8, 0)


def test_read_placement_formats(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"devices": [[3, 0], [1, 2]]}))
    p = read_placement(path, 4, [1, 2])
    assert p.layout(2) == ((3, 0), (1, 2)) and p.expert_order(1).tolist() == [3, 0, 1, 2]
    path.write_text(json.dumps([[0, 1], [2, 3]]))
    assert read_placement(path, 4, [1]).expert_order(1) is None
    plan = {"layers": [{"layer": 1, "devices": [[0, 3], [1, 2]]}, {"layer": 2, "devices": [[0, 1], [2, 3]]}]}
    path.write_text(json.dumps(plan))
    p = read_placement(path, 4, [1, 2])
    assert p.layout(1) == ((0, 3), (1, 2)) and p.layout(2) == ((0, 1), (2, 3))
    path.write_text(json.dumps({"plan": plan}))  # a whole `--format json` report
    assert read_placement(path, 4, [1, 2]).layout(1) == ((0, 3), (1, 2))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"devices": [[0, 1], [1, 2]]}, "exactly one device"),
        ({"devices": [[0, 1], [2, 9]]}, "integers in 0..3"),
        ({"devices": [[0, 1, 2], [3]]}, "same number"),
        ({"devices": "0,1"}, "list of lists"),
        ({"layers": [{"layer": 1, "devices": [[0, 1], [2, 3]]}]}, "no placement for MoE layer"),
    ],
)
def test_read_placement_errors(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=message):
        read_placement(path, 4, [1, 2])


def test_unreadable_placement(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_placement(path, 4, [1])
    with pytest.raises(InputError, match="cannot read"):
        read_placement(tmp_path / "missing.json", 4, [1])


def test_device_loads_split_replicas_evenly():
    counts = torch.tensor([6, 2, 2, 2])
    assert device_loads(counts, ((0, 1), (2, 3))).tolist() == [8, 4]
    assert device_loads(counts, ((0, 1), (0, 2, 3))).tolist() == [5, 7]  # expert 0 on two devices: 3 each
    assert balancedness(torch.tensor([8.0, 4.0])) == 0.75
    assert balancedness(torch.tensor([0.0, 0.0])) == 1.0


def test_even_layout_for_any_split():
    assert even_layout(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert [len(g) for g in even_layout(10, 4)] == [2, 3, 2, 3]
    assert sorted(e for g in even_layout(10, 4) for e in g) == list(range(10))


def test_greedy_plan_by_hand():
    # Heaviest first to the lightest device with a free slot: e0 -> d0, e1 -> d1, e2 -> d1, e3 -> d0 (d1 full).
    assert plan_layout(torch.tensor([10, 8, 1, 1]), 2) == ((0, 3), (1, 2))


def test_replicas_go_to_the_heaviest_per_replica_and_to_different_devices():
    # Replicas: e0 (10 -> 5 + 5), then e1 (8 -> 4 + 4); then packing: 5, 5, 4, 4, 1, 1 over 3 slots each.
    layout = plan_layout(torch.tensor([10, 8, 1, 1]), 2, redundant=2)
    assert layout == ((0, 1, 2), (0, 1, 3))
    assert device_loads(torch.tensor([10, 8, 1, 1]), layout).tolist() == [10, 10]


def test_plan_improves_balance_and_reports_before_and_after():
    counts = {1: torch.tensor([10, 8, 1, 1]), 2: torch.tensor([5, 5, 5, 5])}
    plan = plan_placement(counts, 2)
    first, second = plan.layers
    assert first.balancedness_before == pytest.approx(10 / 18) and first.balancedness_after == pytest.approx(10 / 11)
    assert second.balancedness_before == second.balancedness_after == 1.0
    assert plan.mean_after > plan.mean_before
    doc = plan.to_json()
    assert doc["layers"][0]["devices"] == [[0, 3], [1, 2]] and doc["devices"] == 2


def test_plan_needs_an_even_fill():
    with pytest.raises(InputError, match="cannot fill"):
        plan_layout(torch.tensor([1, 2, 3, 4]), 3)
    assert len(plan_layout(torch.tensor([1, 2, 3, 4]), 3, redundant=2)) == 3
