"""Expert statistics: counts against transformers' router, metrics on hand-made loads, recorder, top tokens, apply-drop."""

import math

import pytest
import torch

from dsv2cli.analysis.expert_report import load_metrics, summarise
from dsv2cli.analysis.expert_stats import RoutingRecorder, StatsOptions, collect_expert_stats, default_devices, top_tokens
from dsv2cli.analysis.placement import contiguous_placement
from dsv2cli.analysis.text_inputs import SequenceSet, TokenSequence
from dsv2cli.errors import InputError
from dsv2cli.inference.session import load_for_generation
from dsv2cli.model.moe import RoutingDecision
from tests.helpers import reference_model, save_reference

LENGTHS = [40, 23, 40, 7, 31]


def _sequences(lengths: list[int], vocab: int, seed: int = 1) -> SequenceSet:
    generator = torch.Generator().manual_seed(seed)
    seqs = [TokenSequence(torch.randint(0, vocab, (n,), generator=generator).tolist(), f"seq{i}") for i, n in enumerate(lengths)]
    return SequenceSet(seqs, files=len(seqs), skipped_files=0, truncated=False)


def _hf_counts(hf_model, sequences: SequenceSet) -> dict[int, torch.Tensor]:
    """Expert counts from transformers' own router, each sequence run on its own (no padding)."""
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(hf_model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "topk_method"):
            continue

        def record(module, args, output, index=index):
            topk_indices = output[2]
            num = hf_model.config.n_routed_experts
            counts[index] = counts.get(index, torch.zeros(num, dtype=torch.long)) + torch.bincount(
                topk_indices.reshape(-1), minlength=num
            )

        hooks.append(gate.register_forward_hook(record))
    with torch.no_grad():
        for seq in sequences.sequences:
            ids = torch.tensor([seq.token_ids])
            hf_model(ids, attention_mask=torch.ones_like(ids))
    for hook in hooks:
        hook.remove()
    return counts


@pytest.fixture(scope="module", params=["group_limited_greedy", "greedy"])
def checkpoint(request, tmp_path_factory):
    overrides = {"topk_method": request.param}
    if request.param == "greedy":
        overrides.update(n_group=1, topk_group=1)
    hf_model = reference_model(vocab_size=320, num_hidden_layers=4, **overrides)
    directory = save_reference(hf_model, tmp_path_factory.mktemp(request.param))
    loaded = load_for_generation(str(directory), "cpu")
    return hf_model, loaded


def test_counts_equal_transformers_router_and_sum_to_tokens_times_k(checkpoint):
    hf_model, loaded = checkpoint
    sequences = _sequences(LENGTHS, 320)
    report = collect_expert_stats(loaded.model, None, "ref", sequences, StatsOptions(batch_size=3))
    reference = _hf_counts(hf_model, sequences)
    assert [layer.layer for layer in report.layers] == sorted(reference) == [1, 2, 3]
    for layer in report.layers:
        assert layer.counts == reference[layer.layer].tolist()
        assert sum(layer.counts) == sum(LENGTHS) * report.top_k
        assert math.isclose(sum(layer.load_fraction), 1.0)
    assert report.tokens == sum(LENGTHS) and report.sequences == len(LENGTHS)


def test_forward_batching_does_not_change_the_statistics(checkpoint):
    _, loaded = checkpoint
    sequences = _sequences(LENGTHS, 320, seed=3)
    one = collect_expert_stats(loaded.model, None, "ref", sequences, StatsOptions(batch_size=1))
    many = collect_expert_stats(loaded.model, None, "ref", sequences, StatsOptions(batch_size=8))
    for a, b in zip(one.layers, many.layers, strict=True):
        assert a.counts == b.counts
        assert [d.dropped for d in a.drop] == [d.dropped for d in b.drop]
        assert a.expert_balance == pytest.approx(b.expert_balance, rel=1e-5)
        assert a.communication_balance == pytest.approx(b.communication_balance, rel=1e-5)


def test_apply_drop_with_huge_capacity_leaves_the_loss_unchanged(checkpoint):
    _, loaded = checkpoint
    sequences = _sequences(LENGTHS, 320, seed=4)
    for policy in ("device", "expert"):
        report = collect_expert_stats(
            loaded.model, None, "ref", sequences, StatsOptions(batch_size=2, apply_drop=1000.0, apply_policy=policy)
        )
        assert report.apply is not None
        assert report.apply.loss_with_drop == report.apply.loss
        assert report.apply.assignment_drop_rate == 0.0
        assert report.apply.predicted_tokens == sum(n - 1 for n in LENGTHS)


def test_applied_drop_in_the_first_moe_layer_equals_the_simulation(checkpoint):
    """The first MoE layer sees undisturbed hidden states, so the real drop there is exactly the simulated one."""
    _, loaded = checkpoint
    sequences = _sequences(LENGTHS, 320, seed=5)
    for policy, order in (("device", "probs"), ("expert", "probs"), ("expert", "position")):
        options = StatsOptions(
            batch_size=2, batch_tokens=50, capacity_factors=(1.0,), apply_drop=1.0, apply_policy=policy, drop_order=order
        )
        report = collect_expert_stats(loaded.model, None, "ref", sequences, options)
        first = report.layers[0]
        simulated = next(d for d in first.drop if d.policy == policy)
        assert simulated.dropped > 0
        assert report.apply is not None
        assert report.apply.layer_drop_rates[first.layer] == pytest.approx(simulated.assignment_drop_rate)
        assert report.apply.loss_with_drop != report.apply.loss


def test_bad_options_are_input_errors(checkpoint):
    _, loaded = checkpoint
    sequences = _sequences([5], 320)
    for options in (
        StatsOptions(capacity_factors=(0.0,)),
        StatsOptions(capacity_factors=(-1.0,)),
        StatsOptions(apply_drop=0.0),
        StatsOptions(devices=3),
        StatsOptions(plan_devices=3),
        StatsOptions(redundant=2),
        StatsOptions(max_devices=9),
        StatsOptions(batch_tokens=0),
    ):
        with pytest.raises(InputError):
            collect_expert_stats(loaded.model, None, "ref", sequences, options)


def test_load_metrics_on_hand_made_loads():
    even = load_metrics(torch.tensor([4, 4, 4, 4]))
    assert (even.max_over_mean, even.min_over_mean, even.cv, even.normalized_entropy, even.balancedness) == (1, 1, 0, 1, 1)
    one_hot = load_metrics(torch.tensor([8, 0, 0, 0]))
    assert one_hot.max_over_mean == 4.0 and one_hot.min_over_mean == 0.0
    assert one_hot.cv == pytest.approx(math.sqrt(3))  # mean 2, population std sqrt(12)
    assert one_hot.normalized_entropy == 0.0 and one_hot.balancedness == 0.25
    skewed = load_metrics(torch.tensor([2, 1, 1, 0]))
    assert skewed.max_over_mean == 2.0 and skewed.min_over_mean == 0.0
    assert skewed.cv == pytest.approx(math.sqrt(0.5))
    assert skewed.normalized_entropy == pytest.approx(0.75)  # (0.5 ln 2 + 2 * 0.25 ln 4) / ln 4
    assert skewed.balancedness == 0.5


def test_summary_across_layers():
    s = summarise([1.0, 3.0, 2.0], [1, 2, 3], higher_is_worse=True)
    assert (s.mean, s.min, s.p50, s.max, s.worst_layer) == (2.0, 1.0, 2.0, 3.0, 2)
    assert s.p90 == pytest.approx(2.8)
    assert summarise([1.0, 3.0, 2.0], [1, 2, 3], higher_is_worse=False).worst_layer == 1


def test_default_devices():
    assert default_devices(8, 160) == 8  # DeepSeek-V2: the router's groups are the devices
    assert default_devices(1, 64) == 8  # V2-Lite: 8 devices as in the paper
    assert default_devices(1, 6) == 2


def test_recorder_paper_balance_per_sequence_ignores_padding():
    """Two sequences (lengths 2 and 3, padded to 3), top-1 over 2 experts on 2 devices, M = 1.

    Sequence 0: both tokens choose expert 0 with s = (.75, .25): f = (2, 0), P = (.75, .25), Σ f·P = 1.5.
    Sequence 1: experts 0, 1, 1 with s = (.5, .5) each: f = (2/3, 4/3), P = (.5, .5), Σ f·P = 1.0.
    With one expert per device the device and communication quantities equal the expert one.
    """
    scores = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.01, 0.99], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    ids = torch.tensor([[0], [0], [1], [0], [1], [1]])
    recorder = RoutingRecorder(contiguous_placement(2, 2), max_devices=1)
    recorder.start([2, 3], width=3, device=torch.device("cpu"))
    recorder(RoutingDecision(1, (2, 3), scores.log(), scores, ids, scores.gather(1, ids)))
    assert recorder.balance[1].tolist() == pytest.approx([2.5, 2.5, 2.5])
    recorded_ids, affinity = recorder.layer_routing(1)
    assert recorded_ids.tolist() == [[0], [0], [0], [1], [1]]  # the padding row [1] is gone
    assert affinity.flatten().tolist() == [0.75, 0.75, 0.5, 0.5, 0.5]


def test_top_tokens_per_expert():
    tokens = torch.tensor([5, 5, 7, 5, 7, 9])
    ids = torch.tensor([[0], [0], [0], [1], [1], [1]])
    result = top_tokens(tokens, ids, num_experts=3, k=2, tokenizer=None)
    assert [(t.token_id, t.count) for t in result[0]] == [(5, 2), (7, 1)]
    assert [(t.token_id, t.count) for t in result[1]] == [(5, 1), (7, 1)]  # ties: lower id first
    assert result[2] == []
