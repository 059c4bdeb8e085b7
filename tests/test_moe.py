"""DeepSeekMoE (dsv2cli/model/moe.py): top-k and group-limited selection, router weights, experts and their sum.

Every expected number is worked out here with plain Python arithmetic (math.exp, sorted) on hand-set weights.
"""

import math

import pytest
import torch

from dsv2cli import kernels
from dsv2cli.config import ModelConfig
from dsv2cli.model.moe import MoE, Router, RoutingDecision, run_experts, select_experts
from tests.helpers import one_thread_per_module, skip_without_kernels  # noqa: F401 (autouse fixture)


def _config(**changes) -> ModelConfig:
    fields = dict(
        vocab_size=8,
        hidden_size=2,
        num_hidden_layers=2,
        num_attention_heads=1,
        kv_lora_rank=2,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
        intermediate_size=4,
        moe_intermediate_size=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.0,
    )
    return ModelConfig(**{**fields, **changes})


def _by_id(values: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    """Per row, ``{expert id: value}`` (selection is unsorted, so compare as mappings)."""
    return [dict(zip(i.tolist(), v.tolist(), strict=True)) for v, i in zip(values, ids, strict=True)]


def test_greedy_selection_takes_the_k_largest_scores():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.05, 0.05, 0.4]])
    values, ids = select_experts(scores, top_k=2)
    assert _by_id(values, ids) == [pytest.approx({1: 0.4, 3: 0.3}), pytest.approx({0: 0.5, 3: 0.4})]


# Eight experts in four groups of two. Row 0: greedy top-3 = {2, 4, 0}, but group 0 (max 0.20) loses to groups
# 1 (0.25) and 2 (0.22), so group-limited top-3 = {2, 4, 5}. Row 1: group 0 has the largest *sum* of its top two
# (0.35) but not the largest max (0.18 < 0.20, 0.19): DeepSeek-V2 ranks groups by max, so groups 1 and 2 win.
GROUPED = torch.tensor(
    [
        [0.20, 0.19, 0.25, 0.02, 0.22, 0.03, 0.05, 0.04],
        [0.18, 0.17, 0.20, 0.00, 0.19, 0.01, 0.10, 0.15],
    ]
)


def test_group_limited_greedy_picks_inside_the_best_groups_by_max():
    values, ids = select_experts(GROUPED, top_k=3, method="group_limited_greedy", n_group=4, topk_group=2)
    assert _by_id(values, ids) == [pytest.approx({2: 0.25, 4: 0.22, 5: 0.03}), pytest.approx({2: 0.20, 4: 0.19, 5: 0.01})]
    greedy_values, greedy_ids = select_experts(GROUPED, top_k=3)
    assert [sorted(row) for row in greedy_ids.tolist()] == [[0, 2, 4], [0, 2, 4]]


def test_group_limited_greedy_with_every_group_is_greedy():
    grouped = select_experts(GROUPED, top_k=3, method="group_limited_greedy", n_group=4, topk_group=4)
    greedy = select_experts(GROUPED, top_k=3)
    assert _by_id(*grouped) == _by_id(*greedy)


def _router(**changes) -> Router:
    router = Router(_config(hidden_size=4, **changes))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))  # logits = x
    return router


PROBS = [0.1, 0.2, 0.3, 0.4]
LOG_PROBS = torch.tensor([[math.log(p) for p in PROBS]])  # softmax(LOG_PROBS) == PROBS


def test_router_weights_are_softmax_times_the_routed_scaling_factor():
    logits, scores, ids, weights = _router()(LOG_PROBS)
    assert logits.dtype == scores.dtype == weights.dtype == torch.float32
    assert scores[0].tolist() == pytest.approx(PROBS, rel=1e-6)
    assert _by_id(weights, ids) == [pytest.approx({3: 0.8, 2: 0.6}, rel=1e-6)]  # 0.4 x 2, 0.3 x 2


def test_router_normalises_without_scaling_when_norm_topk_prob():
    _, _, ids, weights = _router(norm_topk_prob=True)(LOG_PROBS)
    assert _by_id(weights, ids) == [pytest.approx({3: 4 / 7, 2: 3 / 7}, rel=1e-6)]
    # One expert per token: the remote code's branch is "top_k > 1 and norm_topk_prob", so it is scaled instead.
    _, _, ids, weights = _router(norm_topk_prob=True, num_experts_per_tok=1)(LOG_PROBS)
    assert _by_id(weights, ids) == [pytest.approx({3: 0.8}, rel=1e-6)]


def test_router_computes_in_float32_from_bfloat16_inputs():
    logits, scores, _, weights = _router()(LOG_PROBS.bfloat16())
    assert logits.dtype == scores.dtype == weights.dtype == torch.float32
    expected = torch.softmax(LOG_PROBS.bfloat16().double(), dim=-1)[0].tolist()
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_router_group_limited_greedy():
    router = Router(
        _config(
            hidden_size=8, n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2
        )
    )
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))
    _, scores, ids, weights = router(GROUPED[:1].log())
    assert [sorted(row) for row in ids.tolist()] == [[2, 4, 5]]
    total = float(GROUPED[0].sum())
    assert _by_id(weights, ids) == [pytest.approx({2: 2 * 0.25 / total, 4: 2 * 0.22 / total, 5: 2 * 0.03 / total}, rel=1e-5)]


# Hand-set MoE with D = 2, I = 1, four experts: expert e computes down[e] * silu(gate[e] . x) * (up[e] . x).
GATE = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]
UP = [[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]]
DOWN = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]
ROUTER = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]  # logits = [x0, x1, -x0, -x1]
SHARED = {"gate": [0.5, 0.5], "up": [1.0, -1.0], "down": [1.0, 2.0]}
TOKENS = [[0.5, -1.0], [2.0, 1.0], [-1.5, 0.25]]


def _moe() -> MoE:
    moe = MoE(_config(), layer_idx=1)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor(ROUTER))
        moe.experts.gate_up_proj.copy_(torch.tensor([[g, u] for g, u in zip(GATE, UP, strict=True)]))  # [E, 2I, D]
        moe.experts.down_proj.copy_(torch.tensor(DOWN)[:, :, None])  # [E, D, I]
        moe.shared_experts.gate_proj.weight.copy_(torch.tensor([SHARED["gate"]]))
        moe.shared_experts.up_proj.weight.copy_(torch.tensor([SHARED["up"]]))
        moe.shared_experts.down_proj.weight.copy_(torch.tensor(SHARED["down"])[:, None])
    return moe


def _silu(z: float) -> float:
    return z / (1 + math.exp(-z))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b, strict=True))


def _swiglu(gate: list[float], up: list[float], down: list[float], x: list[float]) -> list[float]:
    hidden = _silu(_dot(gate, x)) * _dot(up, x)
    return [d * hidden for d in down]


def _routing(x: list[float]) -> list[tuple[int, float]]:
    """The two experts of token x and their weights (softmax probability x 2.0)."""
    logits = [_dot(row, x) for row in ROUTER]
    total = sum(math.exp(v) for v in logits)
    probs = [math.exp(v) / total for v in logits]
    best = sorted(range(4), key=lambda e: -probs[e])[:2]
    return [(e, 2.0 * probs[e]) for e in best]


def _expected(x: list[float], dropped: set[int] = frozenset()) -> list[float]:
    out = _swiglu(SHARED["gate"], SHARED["up"], SHARED["down"], x)
    for e, w in _routing(x):
        if e not in dropped:
            routed = _swiglu(GATE[e], UP[e], DOWN[e], x)
            out = [o + w * r for o, r in zip(out, routed, strict=True)]
    return out


def test_hand_set_routing_is_what_the_router_chooses():
    # Token 0 (0.5, -1): logits (0.5, -1, -0.5, 1) -> experts 3 and 0. Token 1 (2, 1): experts 0 and 1.
    assert [sorted(e for e, _ in _routing(x)) for x in TOKENS] == [[0, 3], [0, 1], [1, 2]]
    _, _, ids, _ = _moe().gate(torch.tensor(TOKENS))
    assert [sorted(row) for row in ids.tolist()] == [[0, 3], [0, 1], [1, 2]]


def test_moe_is_the_weighted_sum_of_its_experts_plus_the_shared_expert():
    moe = _moe()
    with torch.no_grad():
        several = moe(torch.tensor([TOKENS]))  # [1, 3, 2]: sorted by expert, one matmul per expert
        one_by_one = [moe(torch.tensor([[x]])) for x in TOKENS]  # [1, 1, 2]: the one-token path
    expected = [_expected(x) for x in TOKENS]
    assert several.shape == (1, 3, 2)
    torch.testing.assert_close(several[0], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(one_by_one, dim=1)[0], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_gathered_experts_give_the_same_sum():
    """The path compiled steps take (each row's experts gathered by id)."""
    moe = _moe()
    x = torch.tensor(TOKENS)
    with torch.no_grad():
        _, _, ids, weights = moe.gate(x)
        routed = moe.experts.gathered(x, ids, weights)
    shared = [_swiglu(SHARED["gate"], SHARED["up"], SHARED["down"], t) for t in TOKENS]
    expected = [[e - s for e, s in zip(_expected(t), sh, strict=True)] for t, sh in zip(TOKENS, shared, strict=True)]
    torch.testing.assert_close(routed, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_routing_hook_sees_the_decision_and_its_dropped_assignments_count_zero():
    moe = _moe()
    seen: list[RoutingDecision] = []

    def drop_expert_3(decision: RoutingDecision) -> RoutingDecision:
        seen.append(decision)
        ids = decision.expert_ids.masked_fill(decision.expert_ids == 3, -1)
        return decision.with_assignments(ids, decision.weights)

    expected = [_expected(x, dropped={3}) for x in TOKENS]
    assert expected[0] != _expected(TOKENS[0])  # token 0 routes to expert 3
    with torch.no_grad():
        several = moe(torch.tensor([TOKENS]), routing_hook=drop_expert_3)
        one = moe(torch.tensor([TOKENS[:1]]), routing_hook=drop_expert_3)
        x = torch.tensor(TOKENS)
        _, _, ids, weights = moe.gate(x)
        gathered = moe.experts.gathered(x, ids.masked_fill(ids == 3, -1), weights)
    decision = seen[0]
    assert decision.layer_idx == 1 and decision.batch_shape == (1, 3)
    assert decision.scores.sum(-1).tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-6)
    torch.testing.assert_close(several[0], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one[0], torch.tensor(expected[:1]), rtol=1e-6, atol=1e-6)
    shared = [_swiglu(SHARED["gate"], SHARED["up"], SHARED["down"], t) for t in TOKENS]
    routed = [[e - s for e, s in zip(ex, sh, strict=True)] for ex, sh in zip(expected, shared, strict=True)]
    torch.testing.assert_close(gathered, torch.tensor(routed), rtol=1e-6, atol=1e-6)


def test_a_token_with_every_assignment_dropped_gets_the_shared_expert_only():
    moe = _moe()
    drop_all = lambda d: d.with_assignments(torch.full_like(d.expert_ids, -1), d.weights)  # noqa: E731
    shared = [_swiglu(SHARED["gate"], SHARED["up"], SHARED["down"], x) for x in TOKENS]
    with torch.no_grad():
        torch.testing.assert_close(moe(torch.tensor([TOKENS]), drop_all)[0], torch.tensor(shared), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(moe(torch.tensor([TOKENS[1:2]]), drop_all)[0], torch.tensor(shared[1:2]), rtol=1e-6, atol=1e-6)


def test_run_experts_runs_each_chosen_expert_once_on_its_tokens():
    calls: list[tuple[int, list[float]]] = []

    def expert(index: int, rows: torch.Tensor) -> torch.Tensor:
        calls.append((index, rows[:, 0].tolist()))
        return rows * (index + 1)  # expert e multiplies by e + 1

    x = torch.tensor([[1.0], [10.0], [100.0]])
    ids = torch.tensor([[2, 0], [0, -1], [2, 0]])
    weights = torch.tensor([[0.5, 0.25], [1.0, 9.0], [2.0, 1.0]])
    out = run_experts(x, ids, weights, num_experts=4, expert=expert)
    assert calls == [(0, [1.0, 10.0, 100.0]), (2, [1.0, 100.0])]  # experts 1 and 3 untouched, -1 skipped
    # Token 0: 0.5 x 3 x 1 + 0.25 x 1 x 1; token 1: 1.0 x 10; token 2: 2 x 3 x 100 + 1 x 100.
    assert out[:, 0].tolist() == [1.75, 10.0, 700.0]


def test_router_of_a_decode_step_takes_the_float_kernel_and_chooses_the_same():
    """With dsv2's kernels, the router's rows go through ``float_matmul``; its choice is the one F.linear's
    logits give (the sums differ in order only)."""
    loaded = kernels.load()
    if not loaded.available:
        skip_without_kernels(f"dsv2's kernels do not build here ({loaded.error})")
    config = _config(hidden_size=256, n_routed_experts=64, num_experts_per_tok=6)
    router = Router(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(64, 256, generator=generator) / 16)
    x = torch.randn(16, 256, generator=generator)
    calls = []
    original = kernels.Kernels.float_matmul

    def counted(self, *args):
        calls.append(args[0].shape)
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.Kernels, "float_matmul", counted)
        logits, scores, ids, weights = router(x, loaded)
    expected_logits, _, expected_ids, expected_weights = router(x)
    assert calls == [torch.Size([16, 256])]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)
