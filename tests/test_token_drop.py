"""Token dropping: exact keep masks on hand-made routing, protected tokens, drop rates."""

import pytest
import torch

from dsv2cli.analysis.token_drop import (
    apply_keep,
    device_capacity,
    device_drop_mask,
    drop_rates,
    expert_capacity,
    expert_drop_mask,
    protected_sequences,
)

# 4 tokens, top-2, 4 experts on 2 devices ({0, 1}, {2, 3}). Device 0 receives 6 assignments,
# device 1 receives 2; capacity factor 1.0 gives each device ceil(4*2/2) = 4.
SCORES = torch.tensor(
    [
        [0.40, 0.30, 0.20, 0.10],
        [0.10, 0.50, 0.30, 0.10],
        [0.35, 0.25, 0.15, 0.25],
        [0.05, 0.15, 0.60, 0.20],
    ]
)
IDS = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
# Affinities on device 0: (t0,e0)=.40 (t0,e1)=.30 (t1,e1)=.50 (t2,e0)=.35 (t2,e1)=.25 (t3,e0)=.05


def test_device_capacity_formula():
    assert device_capacity(4, 2, 2, 1.0) == 4
    assert device_capacity(10, 6, 8, 1.0) == 8  # ceil(7.5)
    assert expert_capacity(10, 2, 8, 1.25) == 4  # ceil(3.125)


def test_device_level_drops_lowest_affinity_on_the_full_device():
    keep = device_drop_mask(SCORES, IDS, num_devices=2, capacity_factor=1.0)
    # Device 0 keeps .50, .40, .35, .30 and drops (t2,e1)=.25 and (t3,e0)=.05; device 1 keeps both.
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]


def test_protected_tokens_are_never_dropped_and_use_the_budget_first():
    protected = torch.tensor([False, False, False, True])
    keep = device_drop_mask(SCORES, IDS, num_devices=2, capacity_factor=1.0, protected=protected)
    # (t3,e0)=.05 is protected, so device 0 keeps it plus the best three others: .50, .40, .35.
    assert keep.tolist() == [[True, False], [True, True], [True, False], [True, True]]


def test_capacity_factor_above_load_keeps_everything():
    assert device_drop_mask(SCORES, IDS, num_devices=2, capacity_factor=1.5).all()


def test_already_dropped_assignments_stay_dropped_and_take_no_budget():
    ids = IDS.clone()
    ids[3, 1] = -1  # (t3, e0) gone: device 0 now has 5 assignments for its 4 slots
    keep = device_drop_mask(SCORES, ids, num_devices=2, capacity_factor=1.0)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]


def test_random_routing_respects_budget_and_protection():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 16, generator=g).softmax(-1)
    scores[:, :4] += 0.5  # overload device 0
    ids = torch.topk(scores, 4, dim=-1).indices
    protected = torch.zeros(64, dtype=torch.bool)
    protected[:6] = True
    keep = device_drop_mask(scores, ids, num_devices=4, capacity_factor=1.0, protected=protected)
    assert keep[protected].all()
    capacity = device_capacity(64, 4, 4, 1.0)
    device = ids // 4
    for d in range(4):
        on_d = device == d
        kept = int((keep & on_d).sum())
        assert kept <= max(capacity, int((on_d & protected[:, None]).sum()))
        if int(on_d.sum()) > capacity:
            assert kept == capacity
            # Every dropped unprotected assignment has lower affinity than every kept unprotected one.
            affinity = scores.gather(1, ids)
            free = on_d & ~protected[:, None]
            assert affinity[free & ~keep].max() <= affinity[free & keep].min()


def test_expert_level_probs_and_position():
    # Expert capacity ceil(1.0 * 4*2/4) = 2. Expert 0 has (t0 .40, t2 .35, t3 .05); expert 1 has (t0 .30, t1 .50, t2 .25).
    by_probs = expert_drop_mask(SCORES, IDS, capacity_factor=1.0, order="probs")
    assert by_probs.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    by_position = expert_drop_mask(SCORES, IDS, capacity_factor=1.0, order="position")
    assert by_position.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    # A case where the two orders differ: expert 0 chosen by t0 (.1), t1 (.2), t2 (.9) with capacity 2.
    scores = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.9, 0.1], [0.1, 0.9]])
    ids = torch.tensor([[0], [0], [0], [1]])
    assert expert_drop_mask(scores, ids, 1.0, "probs").flatten().tolist() == [False, True, True, True]
    assert expert_drop_mask(scores, ids, 1.0, "position").flatten().tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="drop order"):
        expert_drop_mask(scores, ids, 1.0, "random")


def test_drop_rates_and_apply_keep():
    keep = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    rates = drop_rates(keep, IDS)
    assert rates.dropped_assignments == 3 and rates.total_assignments == 8
    assert rates.assignments == pytest.approx(3 / 8)
    assert rates.tokens == pytest.approx(2 / 4)
    assert rates.full_tokens == pytest.approx(1 / 4)
    weights = torch.ones(4, 2)
    ids, w = apply_keep(IDS, weights, keep)
    assert ids.tolist() == [[0, 1], [1, -1], [-1, -1], [2, 0]]
    assert w.sum().item() == 5.0


def test_protected_sequences_fraction():
    g = torch.Generator().manual_seed(0)
    assert int(protected_sequences(20, 0.1, g).sum()) == 2
    total = sum(int(protected_sequences(8, 0.1, g).sum()) for _ in range(2000))
    assert total / (8 * 2000) == pytest.approx(0.1, abs=0.01)
    assert not protected_sequences(8, 0.0, g).any()
    with pytest.raises(ValueError):
        protected_sequences(8, 1.5, g)


def test_bad_capacity_factor():
    with pytest.raises(ValueError, match="capacity factor"):
        device_drop_mask(SCORES, IDS, num_devices=2, capacity_factor=0.0)
