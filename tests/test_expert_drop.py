"""Drop simulation on recorded routing: hand-made cases, batch boundaries, agreement with token_drop batch by batch."""

import pytest
import torch

from dsv2cli.analysis.expert_drop import DropHook, drop_batches, forward_groups, simulate_drops
from dsv2cli.analysis.token_drop import device_drop_mask, drop_rates, expert_drop_mask
from dsv2cli.model.moe import RoutingDecision
from tests.test_token_drop import IDS, SCORES  # the hand-made case: 4 tokens, top-2, 4 experts on 2 devices

AFFINITY = SCORES.gather(1, IDS)


def _one(policy, factor, ids=IDS, affinity=AFFINITY, batches=None, **kw):
    batches = batches or [(0, ids.shape[0])]
    (counts,) = simulate_drops(ids, affinity, batches, policy, [factor], kw.pop("num_experts", 4), **kw)
    return counts


def test_device_policy_hand_made():
    # Device 0 gets 6 assignments for ceil(1.0*4*2/2) = 4 slots: (t2,e1)=.25 and (t3,e0)=.05 go.
    c = _one("device", 1.0, num_devices=2)
    assert (c.dropped, c.assignments, c.tokens_hit, c.tokens_lost, c.tokens) == (2, 8, 2, 0, 4)
    assert c.assignment_drop_rate == 0.25 and c.token_drop_rate == 0.5 and c.full_drop_rate == 0.0


def test_expert_policy_hand_made_both_orders():
    # 3 tokens, top-1, all on expert 0 (2 experts): capacity ceil(1.0*3*1/2) = 2 keeps two of three.
    ids = torch.tensor([[0], [0], [0]])
    affinity = torch.tensor([[0.2], [0.9], [0.6]])
    probs = _one("expert", 1.0, ids, affinity, num_experts=2, order="probs")
    position = _one("expert", 1.0, ids, affinity, num_experts=2, order="position")
    assert probs.dropped == position.dropped == 1
    assert probs.tokens_lost == position.tokens_lost == 1
    # Which token goes differs; the hook shows it on the same routing.
    for order, kept in (("probs", [False, True, True]), ("position", [True, True, False])):
        assert expert_drop_mask(torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4]]), ids, 1.0, order).flatten().tolist() == kept


def test_expert_policy_rounds_capacity_up():
    # 5 tokens top-1 on 2 experts, all on expert 1: capacity ceil(1.25*5/2) = 4 keeps four.
    ids = torch.ones(5, 1, dtype=torch.long)
    c = _one("expert", 1.25, ids, torch.rand(5, 1), num_experts=2)
    assert c.dropped == 1


def test_batch_boundaries_change_the_budget():
    # Sequence A: 3 tokens on expert 0; sequence B: 3 tokens on expert 1 (top-1, 2 experts).
    ids = torch.tensor([[0], [0], [0], [1], [1], [1]])
    affinity = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    whole = _one("expert", 1.0, ids, affinity, batches=drop_batches([6]), num_experts=2)
    assert whole.dropped == 0  # one batch of 6: 3 slots each
    per_sequence = _one("expert", 1.0, ids, affinity, batches=drop_batches([3, 3]), num_experts=2)
    assert per_sequence.dropped == 2  # ceil(3/2) = 2 slots per expert per sequence
    cut = drop_batches([3, 3], batch_tokens=4)
    assert cut == [(0, 4), (4, 6)]
    # [0, 4): expert 0 has 3 for 2 slots, expert 1 has 1; [4, 6): expert 1 has 2 for 1 slot.
    assert _one("expert", 1.0, ids, affinity, batches=cut, num_experts=2).dropped == 2


def test_drop_batches_and_forward_groups():
    assert drop_batches([3, 2, 4]) == [(0, 3), (3, 5), (5, 9)]
    assert drop_batches([3, 2, 4], batch_tokens=4) == [(0, 4), (4, 8), (8, 9)]
    assert forward_groups([3, 2, 4], drop_batches([3, 2, 4]), batch_size=2) == [[0, 1], [2]]
    # A drop batch spanning sequences keeps them in one forward pass, even past batch_size.
    assert forward_groups([3, 2, 4], drop_batches([3, 2, 4], 4), batch_size=1) == [[0, 1, 2]]
    assert forward_groups([2, 2, 2, 2], drop_batches([2, 2, 2, 2], 4), batch_size=1) == [[0, 1], [2, 3]]


def _random_routing(tokens: int, experts: int, top_k: int, seed: int, ties: bool):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=generator)
    if ties:
        scores = (scores * 4).round() / 4 + 0.01  # many equal affinities: tie-breaking must agree too
    scores = scores / scores.sum(dim=-1, keepdim=True)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    return scores, ids


@pytest.mark.parametrize("ties", [False, True])
def test_simulation_equals_token_drop_batch_by_batch(ties):
    scores, ids = _random_routing(90, 8, 3, seed=7, ties=ties)
    lengths = [17, 30, 5, 38]
    permutation = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])  # devices {3,6}, {0,5}, {1,7}, {2,4}
    rank = torch.empty_like(permutation)
    rank[permutation] = torch.arange(8)
    for batch_tokens in (None, 25):
        batches = drop_batches(lengths, batch_tokens)
        factors = [0.5, 1.0, 1.3]
        cases = [
            ("device", {"num_devices": 4}, lambda s, i, f: device_drop_mask(s, i, 4, f)),
            (
                "device",
                {"num_devices": 4, "expert_order": permutation},
                lambda s, i, f: device_drop_mask(s[:, permutation], rank[i], 4, f),
            ),
            ("expert", {"order": "probs"}, lambda s, i, f: expert_drop_mask(s, i, f, "probs")),
            ("expert", {"order": "position"}, lambda s, i, f: expert_drop_mask(s, i, f, "position")),
        ]
        for policy, kwargs, reference in cases:
            simulated = simulate_drops(ids, scores.gather(1, ids), batches, policy, factors, 8, **kwargs)
            for factor, counts in zip(factors, simulated, strict=True):
                dropped = tokens_hit = tokens_lost = 0
                for start, end in batches:
                    keep = reference(scores[start:end], ids[start:end], factor)
                    rates = drop_rates(keep, ids[start:end])
                    dropped += rates.dropped_assignments
                    tokens_hit += int((~keep).any(dim=-1).sum())
                    tokens_lost += int((~keep).all(dim=-1).sum())
                assert (counts.dropped, counts.tokens_hit, counts.tokens_lost) == (dropped, tokens_hit, tokens_lost)


def test_rates_fall_with_capacity_and_reach_zero():
    scores, ids = _random_routing(200, 16, 4, seed=3, ties=False)
    affinity = scores.gather(1, ids)
    batches = drop_batches([50, 70, 80])
    factors = [0.5, 1.0, 1.25, 1.5, 2.0, 3.0]
    for policy, kwargs, enough in (("device", {"num_devices": 4}, 4.0), ("expert", {"order": "probs"}, 16 / 4)):
        rates = [c.assignment_drop_rate for c in simulate_drops(ids, affinity, batches, policy, factors + [enough], 16, **kwargs)]
        assert rates[0] > 0
        assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
        # A device (expert) never gets more than T*K (T) assignments: cf = D (E/K) always fits.
        assert rates[-1] == 0.0


def test_drop_hook_applies_token_drop_per_batch_and_leaves_padding():
    # Two rows padded to width 3: lengths 2 and 3 -> drop batches (0, 2) and (2, 5).
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    ids = torch.tensor([[0], [0], [1], [1], [1], [1]])
    hook = DropHook("expert", 1.0, drop_batches([2, 3]), order="probs")
    hook.start([2, 3], width=3, offset=0)
    decision = hook(RoutingDecision(1, (2, 3), scores.log(), scores, ids, torch.ones(6, 1)))
    # Row 0 puts both real tokens on expert 0 for ceil(2/2) = 1 slot: .9 stays, .6 goes; its padding slot is untouched.
    # Row 1 puts three tokens on expert 1 (affinities .8, .3, .6) for ceil(3/2) = 2 slots: .3 goes.
    assert decision.expert_ids.flatten().tolist() == [0, -1, 1, 1, -1, 1]
    assert decision.weights.flatten().tolist() == [1, 0, 1, 1, 0, 1]
    assert hook.dropped == {1: 2} and hook.assignments == {1: 5}
