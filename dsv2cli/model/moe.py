"""DeepSeekMoE (spec §4): fine-grained routed experts stacked per layer, shared experts, softmax router.

Shape legend: N tokens (B * S flattened), D hidden size, E routed experts, K experts per token,
I moe_intermediate_size, G expert groups.

Routing decisions pass through one explicit hook (:class:`RoutingHook`): expert statistics,
token dropping and training losses observe or alter them there, without touching this file.
A dropped assignment has expert id ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from dsv2cli.config import ModelConfig
from dsv2cli.kernels import NO_KERNELS, Kernels
from dsv2cli.model.dtypes import cast
from dsv2cli.model.fusion import FusedLinears, fused
from dsv2cli.model.options import project


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate x) * up x)``; the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused_gate_up: FusedLinears | None = None  # set by fuse_projections(): gate and up in one matmul

    def fuse_projections(self) -> None:
        """Stack ``gate_proj``'s and ``up_proj``'s weights (``fusion.py``) where they can be."""
        self.fused_gate_up = fused(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, kernels: Kernels = NO_KERNELS) -> torch.Tensor:
        """x ``[..., D]`` -> ``[..., D]``; ``kernels``: what int8 projections may use (``ForwardOptions``)."""
        if self.fused_gate_up is not None and self.fused_gate_up.usable():
            gate, up = self.fused_gate_up(x, kernels)
        else:
            gate, up = project(self.gate_proj, x, kernels), project(self.up_proj, x, kernels)
        return project(self.down_proj, F.silu(gate) * up, kernels)


@dataclass(frozen=True)
class RoutingDecision:
    """What the router chose for one MoE layer and one forward pass.

    ``scores`` are the float32 softmax affinities ``[N, E]``; ``expert_ids`` ``[N, K]`` (-1 =
    dropped) and ``weights`` ``[N, K]`` (float32) are what the experts will use.
    ``batch_shape`` is ``(B, S)`` so observers can tell sequences apart.
    """

    layer_idx: int
    batch_shape: tuple[int, int]
    logits: torch.Tensor
    scores: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor

    def with_assignments(self, expert_ids: torch.Tensor, weights: torch.Tensor) -> RoutingDecision:
        return replace(self, expert_ids=expert_ids, weights=weights)


# Called once per MoE layer per forward; returning a decision replaces the router's, None keeps it.
RoutingHook = Callable[[RoutingDecision], "RoutingDecision | None"]


def select_experts(
    scores: torch.Tensor,
    top_k: int,
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection on affinities ``scores [N, E]`` -> ``(values [N, K], ids [N, K])``.

    ``group_limited_greedy`` keeps the ``topk_group`` groups with the highest max score and
    picks the top-k inside them (spec §4.2); with groups = devices it is the paper's
    device-limited routing.
    """
    if method == "group_limited_greedy":
        tokens, experts = scores.shape
        group_scores = scores.view(tokens, n_group, experts // n_group).max(dim=-1).values  # [N, G]
        group_ids = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
        expert_mask = group_mask[:, :, None].expand(-1, -1, experts // n_group).reshape(tokens, experts)
        scores = scores.masked_fill(~expert_mask, 0.0)
    values, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return values, ids


class Router(nn.Module):
    """Softmax gate in float32 (``mlp.gate`` in HF checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor

    def forward(
        self, x: torch.Tensor, kernels: Kernels = NO_KERNELS
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[N, D]`` -> logits, scores ``[N, E]`` and ids, weights ``[N, K]`` (all float32 but ids).

        ``kernels``: the rows go through dsv2's float32 kernel: both threads read the weight (BLAS runs a
        decode step's product on one), and a row's logits do not depend on the rows beside it, so a sequence
        routes alike alone, in a decode batch or in a prefill."""
        x, weight = cast(x, torch.float32), cast(self.weight, torch.float32)
        logits = kernels.float_matmul(x, weight) if kernels.float_matmul_supported(x, weight) else F.linear(x, weight)
        return (logits, *self.choose(logits))

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``[N, E]`` float32 -> scores ``[N, E]``, ids and weights ``[N, K]``."""
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        values, ids = select_experts(scores, self.top_k, self.method, self.n_group, self.topk_group)
        if self.top_k > 1 and self.norm_topk_prob:
            # The V2 remote code normalises and does not scale in this branch (spec §4.2).
            weights = values / (values.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = values * self.routed_scaling_factor
        return scores, ids, weights


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: ``gate_up_proj [E, 2I, D]`` (gate rows first), ``down_proj [E, D, I]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, d, i = config.n_routed_experts or 0, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, kernels: Kernels = NO_KERNELS
    ) -> torch.Tensor:
        """x ``[N, D]``, expert_ids/weights ``[N, K]`` -> weighted sum over the K experts ``[N, D]`` (float32).

        ``kernels``: for experts with products of their own (int8); float experts run torch's.
        """
        if torch.compiler.is_compiling():
            return self.gathered(x, expert_ids, weights)
        if x.shape[0] == 1:
            return experts_on_one_token(x, expert_ids, weights, self.one_token)
        return run_experts(x, expert_ids, weights, self.num_experts, self.expert)

    def gathered(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each row's K experts gathered by id (``[N*K, 2I, D]``): no Python integers, so a compiled step has one graph.

        Used while compiling (a graph cannot branch on which experts were chosen). The gather copies each row's K
        experts before the products read them; int8 experts read theirs in place (dsv2's int8 kernel).
        """
        rows, top_k = expert_ids.shape
        kept = expert_ids >= 0
        ids = expert_ids.clamp(min=0).reshape(-1)  # a dropped assignment reads expert 0 with weight 0
        inputs = x.repeat_interleave(top_k, 0)[:, :, None]  # [N*K, D, 1]
        gate, up = torch.bmm(self.gate_up_proj[ids], inputs)[..., 0].chunk(2, dim=-1)  # [N*K, I]
        down = torch.bmm(self.down_proj[ids], (F.silu(gate) * up)[:, :, None])[..., 0]  # [N*K, D]
        scale = torch.where(kept, cast(weights, torch.float32), 0.0)
        return (cast(down, torch.float32).view(rows, top_k, -1) * scale[..., None]).sum(1)

    def one_token(self, x: torch.Tensor, ids: list[int], weights: torch.Tensor) -> torch.Tensor:
        """x ``[1, D]`` through experts ``ids`` (none dropped), weights ``[1, K]`` -> ``[1, D]`` float32."""
        return weighted_experts_of_one_token(
            x,
            ids,
            weights,
            lambda index: F.linear(x, self.gate_up_proj[index]),
            lambda indices, hidden: torch.cat([F.linear(hidden[k : k + 1], self.down_proj[i]) for k, i in enumerate(indices)]),
        )

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on its tokens ``x [n, D]`` -> ``[n, D]``."""
        gate, up = F.linear(x, self.gate_up_proj[index]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[index])


def experts_on_one_token(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    one_token: Callable[[torch.Tensor, list[int], torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The K experts of one token (a decode step): x ``[1, D]``, expert_ids/weights ``[1, K]`` (-1 = dropped).

    Drops the -1 assignments and calls ``one_token(x, ids, weights)`` (the experts' own
    ``one_token`` method) with the rest. Returns ``[1, D]`` float32.
    """
    ids = expert_ids[0].tolist()
    if -1 in ids:
        kept = [k for k, i in enumerate(ids) if i >= 0]
        ids, weights = [ids[k] for k in kept], weights[:, kept]
    if not ids:
        return torch.zeros(1, x.shape[1], dtype=torch.float32, device=x.device)
    return one_token(x, ids, weights)


def weighted_experts_of_one_token(
    x: torch.Tensor,
    ids: list[int],
    weights: torch.Tensor,
    gate_up: Callable[[int], torch.Tensor],
    down: Callable[[list[int], torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_k weights[0, k] * expert(ids[k], x)`` for one token, each step batched over the K experts.

    x ``[1, D]``; ``gate_up(index)`` -> ``[1, 2I]`` for one expert; ``down(indices, hidden [K, I])`` ->
    ``[K, D]``, row k through expert ``indices[k]``. SiLU, the product and the weighted sum run once
    over all K rows. Returns ``[1, D]`` float32.
    """
    gate, up = torch.cat([gate_up(i) for i in ids]).chunk(2, dim=-1)  # [K, I] each
    out = down(ids, F.silu(gate).mul_(up))  # [K, D]
    return torch.mm(cast(weights, torch.float32), cast(out, torch.float32))  # [1, D]


def run_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_k weights[:, k] * expert(expert_ids[:, k], x)`` -> ``[N, D]`` float32; ``expert(index, rows)`` runs one expert.

    Assignments are sorted by expert so each active expert runs one matmul over its tokens; experts
    nobody chose are never touched. (One token takes :func:`experts_on_one_token` instead.)
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    weight_of = weights.reshape(-1)[order]
    counts = torch.bincount(flat_ids[order] + 1, minlength=num_experts + 1).tolist()  # slot 0 = dropped (-1)
    start = counts[0]
    for index, count in enumerate(counts[1:]):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        out.index_add_(0, rows, expert(index, x[rows]).float() * weight_of[start : start + count, None])
        start += count
    return out


class MoE(nn.Module):
    """Routed experts plus shared experts: ``y = sum_k w_k E_k(x) + Shared(x)`` (spec §4.3)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        shared = config.shared_intermediate_size
        self.shared_experts = MLP(config.hidden_size, shared) if shared > 0 else None

    def forward(self, x: torch.Tensor, routing_hook: RoutingHook | None = None, kernels: Kernels = NO_KERNELS) -> torch.Tensor:
        """x ``[B, S, D]`` -> ``[B, S, D]``; ``kernels``: what int8 experts and projections may use."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        logits, scores, ids, weights = self.gate(flat, kernels)
        if routing_hook is not None:
            decision = RoutingDecision(self.layer_idx, (batch, seq), logits, scores, ids, weights)
            changed = routing_hook(decision)
            if changed is not None:
                ids, weights = changed.expert_ids, changed.weights
        out = cast(self.experts(flat, ids, weights, kernels), x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, kernels)
        return out.view(batch, seq, dim)
