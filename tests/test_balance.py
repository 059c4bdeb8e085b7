"""Balance losses (spec §5) against hand computations on small routing examples."""

import pytest
import torch

from dsv2cli.analysis.balance import (
    coefficient_of_variation,
    communication_balance,
    device_balance,
    device_of_expert,
    expert_balance,
    expert_counts,
    max_over_mean,
    tokens_per_device,
)

# 4 tokens, 4 experts on 2 devices ({0, 1} and {2, 3}); column means P = [0.375, 0.275, 0.1, 0.25].
SCORES = torch.tensor(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.7, 0.1, 0.1],
        [0.6, 0.2, 0.1, 0.1],
        [0.1, 0.1, 0.1, 0.7],
    ]
)
TOP1 = torch.tensor([[0], [1], [0], [3]])
TOP2 = torch.tensor([[0, 1], [1, 2], [0, 3], [3, 2]])


def test_expert_balance_top1_by_hand():
    # counts [2, 1, 0, 1]; f = E/(K T) * counts = counts; sum f P = 2*.375 + .275 + 0 + .25
    assert expert_counts(TOP1, 4).tolist() == [2, 1, 0, 1]
    assert expert_balance(SCORES, TOP1).item() == pytest.approx(1.275)


def test_device_balance_top1_by_hand():
    # f' = [(2+1)/2, (0+1)/2] = [1.5, 0.5]; P' = [.65, .35]
    assert device_balance(SCORES, TOP1, num_devices=2).item() == pytest.approx(1.5 * 0.65 + 0.5 * 0.35)


def test_communication_balance_top2_by_hand():
    # Every expert chosen twice: expert-level f = 1 everywhere, so the loss is sum P = 1.
    assert expert_balance(SCORES, TOP2).item() == pytest.approx(1.0)
    # Device 0 receives tokens 0, 1, 2; device 1 receives tokens 1, 2, 3.
    assert tokens_per_device(TOP2, 4, 2).tolist() == [3, 3]
    # M = 2: f'' = D/(M T) * 3 = 0.75 on both devices, P'' = [.65, .35]
    assert communication_balance(SCORES, TOP2, num_devices=2, max_devices=2).item() == pytest.approx(0.75)
    # M = 1: f'' = 2/4 * 3 = 1.5
    assert communication_balance(SCORES, TOP2, num_devices=2, max_devices=1).item() == pytest.approx(1.5)


def test_perfect_balance_is_one():
    scores = torch.full((8, 8), 1 / 8)
    ids = torch.arange(16).view(8, 2) % 8  # each expert twice, each token on one device of 4
    assert expert_balance(scores, ids).item() == pytest.approx(1.0)
    assert device_balance(scores, ids, num_devices=4).item() == pytest.approx(1.0)
    assert communication_balance(scores, ids, num_devices=4, max_devices=1).item() == pytest.approx(1.0)


def test_collapse_reaches_the_maximum():
    scores = torch.zeros(6, 4)
    scores[:, 0] = 1.0
    ids = torch.zeros(6, 1, dtype=torch.long)
    assert expert_balance(scores, ids).item() == pytest.approx(4.0)  # E
    # f = [4, 0, 0, 0] -> f' = [2, 0], P' = [1, 0]: the device-level maximum D
    assert device_balance(scores, ids, num_devices=2).item() == pytest.approx(2.0)


def test_per_sequence_is_the_mean_of_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 5, 8, generator=g).softmax(-1)
    ids = torch.topk(scores, 2, dim=-1).indices
    per_seq = expert_balance(scores, ids)
    assert per_seq.shape == (3,)
    for b in range(3):
        assert per_seq[b].item() == pytest.approx(expert_balance(scores[b], ids[b]).item())
    # HF remote MoEGate with seq_aux=True: ce[b,i] = count/(T*K/E); loss = mean_b sum_i ce * mean_t s
    counts = torch.stack([torch.bincount(ids[b].flatten(), minlength=8).float() for b in range(3)])
    ce = counts / (5 * 2 / 8)
    assert per_seq.mean().item() == pytest.approx((ce * scores.mean(1)).sum(1).mean().item())


def test_gradient_flows_through_probabilities_only():
    scores = SCORES.clone().requires_grad_(True)
    expert_balance(scores, TOP1).backward()
    # d/ds_{t,i} = f_i / T
    assert torch.allclose(scores.grad, torch.tensor([2.0, 1.0, 0.0, 1.0]).expand(4, 4) / 4)


def test_dropped_assignments_count_nowhere():
    ids = torch.tensor([[0], [-1], [0], [3]])
    assert expert_counts(ids, 4).tolist() == [2, 0, 0, 1]
    assert device_of_expert(ids, 4, 2).flatten().tolist() == [0, -1, 0, 1]
    assert tokens_per_device(torch.tensor([[0, -1], [-1, -1], [2, 3]]), 4, 2).tolist() == [1, 1]


def test_load_metrics():
    load = torch.tensor([4.0, 2.0, 2.0, 0.0])
    assert max_over_mean(load).item() == pytest.approx(2.0)
    assert coefficient_of_variation(load).item() == pytest.approx((2.0**0.5) / 2.0)
    assert coefficient_of_variation(torch.ones(5)).item() == 0.0


def test_bad_device_split():
    with pytest.raises(ValueError, match="equal device groups"):
        device_balance(SCORES, TOP1, num_devices=3)
    with pytest.raises(ValueError, match="max_devices"):
        communication_balance(SCORES, TOP2, num_devices=2, max_devices=3)
