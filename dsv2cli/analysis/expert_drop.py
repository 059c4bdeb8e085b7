"""Token dropping on recorded routing (what-if rates per capacity factor) and applied for real through the hook.

Shape legend: N recorded tokens (all sequences in input order), E routed experts, K experts per token,
D devices, B drop batches.

Budgets apply per *drop batch*: one sequence each, or consecutive cuts of ``batch_tokens`` tokens of
the token stream. The rules are those of :mod:`dsv2cli.analysis.token_drop` (capacities
``ceil(cf·T·K/E)`` per expert and ``ceil(cf·T·K/D)`` per device, lowest affinity or latest position
dropped first, ties keep the earlier token). The simulation applies them to every batch at once: it
ranks each assignment inside its (batch, expert or device) bucket once per policy, and each capacity
factor is then one comparison. The tests check it against ``token_drop`` batch by batch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from dsv2cli.analysis.token_drop import (
    DROP_ORDERS,
    apply_keep,
    device_capacity,
    device_drop_mask,
    expert_capacity,
    expert_drop_mask,
)
from dsv2cli.model.moe import RoutingDecision

DROP_POLICIES = ("device", "expert")


@dataclass
class DropCounts:
    """Dropped routed assignments and the tokens they belong to (summed over batches, and layers when merged)."""

    policy: str
    capacity_factor: float
    order: str | None  # "probs" or "position" for the expert policy; the device policy drops by affinity
    dropped: int = 0
    assignments: int = 0
    tokens_hit: int | None = 0  # tokens with at least one routed assignment dropped (None: unknown, from loads alone)
    tokens_lost: int | None = 0  # tokens with all routed assignments dropped (None: unknown)
    tokens: int = 0

    @property
    def assignment_drop_rate(self) -> float:
        return self.dropped / max(self.assignments, 1)

    @property
    def token_drop_rate(self) -> float | None:
        return None if self.tokens_hit is None else self.tokens_hit / max(self.tokens, 1)

    @property
    def full_drop_rate(self) -> float | None:
        return None if self.tokens_lost is None else self.tokens_lost / max(self.tokens, 1)

    def add(self, other: DropCounts) -> None:
        self.dropped += other.dropped
        self.assignments += other.assignments
        self.tokens_hit = None if self.tokens_hit is None or other.tokens_hit is None else self.tokens_hit + other.tokens_hit
        self.tokens_lost = None if self.tokens_lost is None or other.tokens_lost is None else self.tokens_lost + other.tokens_lost
        self.tokens += other.tokens

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "capacity_factor": self.capacity_factor,
            "drop_order": self.order,
            "assignment_drop_rate": self.assignment_drop_rate,
            "token_drop_rate": self.token_drop_rate,
            "full_drop_rate": self.full_drop_rate,
            "dropped_assignments": self.dropped,
            "assignments": self.assignments,
        }


def drop_batches(lengths: list[int], batch_tokens: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` stream ranges of the drop batches: one per sequence, or cuts of ``batch_tokens`` tokens."""
    total = sum(lengths)
    if batch_tokens is None:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        return list(zip(bounds[:-1], bounds[1:], strict=True))
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
    return [(start, min(start + batch_tokens, total)) for start in range(0, total, batch_tokens)]


def forward_groups(lengths: list[int], batches: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Sequence indices of each forward pass: every drop batch lies inside one pass (so dropping can be
    applied for real), and a pass holds at most ``batch_size`` sequences unless one drop batch spans more."""
    cuts = {end for _, end in batches}
    units: list[list[int]] = []  # runs of sequences that drop batches tie together
    offset = 0
    for index, n in enumerate(lengths):
        if units and offset not in cuts:
            units[-1].append(index)
        else:
            units.append([index])
        offset += n
    groups: list[list[int]] = []
    for unit in units:
        if groups and len(groups[-1]) + len(unit) <= batch_size:
            groups[-1].extend(unit)
        else:
            groups.append(list(unit))
    return groups


def batch_index(batches: list[tuple[int, int]], num_tokens: int) -> torch.Tensor:
    """Drop batch of every token ``[N]``."""
    starts = torch.tensor([start for start, _ in batches])
    return torch.searchsorted(starts, torch.arange(num_tokens), right=True) - 1


def simulate_drops(
    expert_ids: torch.Tensor,
    affinity: torch.Tensor,
    batches: list[tuple[int, int]],
    policy: str,
    capacity_factors: list[float],
    num_experts: int,
    num_devices: int = 1,
    order: str = "probs",
    expert_order: torch.Tensor | None = None,
) -> list[DropCounts]:
    """Drop counts of one layer for each capacity factor.

    ``expert_ids [N, K]`` (all valid) and ``affinity [N, K]`` (the softmax score of each chosen expert)
    are the recorded routing; ``expert_order`` (from :meth:`Placement.expert_order`) lists the experts
    device by device when the placement is not contiguous.
    """
    num_tokens, top_k = expert_ids.shape
    ids = expert_ids.long()
    batch_of = batch_index(batches, num_tokens).to(ids.device)  # [N]
    lengths = [end - start for start, end in batches]
    if policy == "device":
        if expert_order is not None:
            rank = torch.empty_like(expert_order)
            rank[expert_order] = torch.arange(num_experts)
            ids = rank.to(ids.device)[ids]
        bucket, buckets, by_priority = ids // (num_experts // num_devices), num_devices, _by_affinity(affinity)
    elif policy == "expert":
        if order not in DROP_ORDERS:
            raise ValueError(f"unknown drop order {order!r}")
        bucket, buckets = ids, num_experts
        # Position order is the flattened order itself (token by token), which is what token_drop's stable sort gives.
        by_priority = _by_affinity(affinity) if order == "probs" else None
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    rank = _rank_in_bucket(bucket, buckets, by_priority, batch_of, len(batches))
    if policy == "device":
        capacity = [[device_capacity(n, top_k, num_devices, f) for n in lengths] for f in capacity_factors]
    else:
        capacity = [[expert_capacity(n, top_k, num_experts, f) for n in lengths] for f in capacity_factors]
    limit = torch.tensor(capacity, device=ids.device)[:, batch_of]  # [C, N]
    dropped = rank[None] >= limit[:, :, None]  # [C, N, K]
    totals = torch.stack([dropped.sum(dim=(1, 2)), dropped.any(dim=-1).sum(dim=-1), dropped.all(dim=-1).sum(dim=-1)])
    return [
        DropCounts(
            policy,
            factor,
            order if policy == "expert" else None,
            dropped=n_dropped,
            assignments=num_tokens * top_k,
            tokens_hit=hit,
            tokens_lost=lost,
            tokens=num_tokens,
        )
        for factor, (n_dropped, hit, lost) in zip(capacity_factors, totals.T.tolist(), strict=True)
    ]


def drops_of_loads(
    loads: torch.Tensor, tokens: int, top_k: int, policy: str, capacity_factors: list[float], order: str = "probs"
) -> list[DropCounts]:
    """Drop counts of one layer from its loads alone, all ``tokens`` being one drop batch.

    ``loads`` are the assignments per expert ``[E]`` (policy ``expert``) or per device ``[D]`` (``device``).
    Each expert or device drops what exceeds its capacity, whichever assignments those are, so the
    dropped count is exact (that of :func:`simulate_drops` with one batch); which tokens lose them is
    not known (``tokens_hit`` and ``tokens_lost`` are None).
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown drop policy {policy!r}")
    capacity_of = device_capacity if policy == "device" else expert_capacity
    assignments = round(float(loads.double().sum()))
    result = []
    for factor in capacity_factors:
        capacity = capacity_of(tokens, top_k, loads.numel(), factor)
        dropped = round(float((loads.double() - capacity).clamp_min(0).sum()))
        result.append(
            DropCounts(
                policy,
                factor,
                order if policy == "expert" else None,
                dropped=dropped,
                assignments=assignments,
                tokens_hit=None,
                tokens_lost=None,
                tokens=tokens,
            )
        )
    return result


def _by_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """Flat indices of the assignments by descending affinity, ties in token order (token_drop's stable sort)."""
    return torch.argsort(-affinity.float().reshape(-1), stable=True)


def _rank_in_bucket(
    bucket: torch.Tensor, num_buckets: int, by_priority: torch.Tensor | None, batch_of: torch.Tensor, num_batches: int
) -> torch.Tensor:
    """Position ``[N, K]`` of each assignment among those of its (batch, bucket), highest priority first.

    ``by_priority`` lists the flat assignment indices from the highest priority down (None: the flat
    order). token_drop sorts one batch by priority, then stably by bucket; here the batch joins the
    bucket key, and (key, place in the priority order) is one unique integer, so a plain sort does
    every batch at once (stable sorts of integers are slow on some CPUs).
    """
    key = (batch_of[:, None] * num_buckets + bucket).reshape(-1)
    total = key.numel()
    place = torch.arange(total, device=key.device)
    if by_priority is not None:
        place = torch.empty_like(place).scatter_(0, by_priority, place)
    order = torch.argsort(key * total + place)
    counts = torch.bincount(key, minlength=num_batches * num_buckets)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(key)
    rank[order] = torch.arange(total, device=key.device) - starts[key[order]]
    return rank.view_as(bucket)


class DropHook:
    """Routing hook that drops assignments for real with ``token_drop``'s functions, one drop batch at a time.

    Call :meth:`start` before each forward with the row lengths (rows are right-padded sequences in
    input order) and the stream offset of the first token; padding tokens are never dropped (they
    cannot influence real tokens under causal attention).
    """

    def __init__(
        self,
        policy: str,
        capacity_factor: float,
        batches: list[tuple[int, int]],
        num_devices: int = 1,
        order: str = "probs",
        expert_orders: dict[int, torch.Tensor | None] | None = None,
    ) -> None:
        if policy not in DROP_POLICIES:
            raise ValueError(f"unknown drop policy {policy!r}")
        self.policy = policy
        self.capacity_factor = capacity_factor
        self.starts = [start for start, _ in batches]
        self.num_devices = num_devices
        self.order = order
        self.expert_orders = expert_orders or {}
        self.dropped: dict[int, int] = {}
        self.assignments: dict[int, int] = {}
        self._pieces: list[torch.Tensor] = []

    def start(self, row_lengths: list[int], width: int, offset: int) -> None:
        """Flat row indices of the real tokens of each drop batch in the coming forward ``[B, width]``."""
        real = torch.cat([torch.arange(n) + row * width for row, n in enumerate(row_lengths)])
        first = bisect.bisect_right(self.starts, offset) - 1
        bounds = [*self.starts[first + 1 :], offset + len(real)]
        self._pieces = []
        begin = 0
        for end in bounds:
            end = min(end - offset, len(real))
            if end > begin:
                self._pieces.append(real[begin:end])
            begin = end
            if begin >= len(real):
                break

    def __call__(self, decision: RoutingDecision) -> RoutingDecision:
        scores, ids = decision.scores, decision.expert_ids  # [N, E], [N, K]
        keep = torch.ones_like(ids, dtype=torch.bool)
        expert_order = self.expert_orders.get(decision.layer_idx)
        for rows in self._pieces:
            rows = rows.to(ids.device)
            batch_scores, batch_ids = scores[rows], ids[rows]
            if self.policy == "device":
                if expert_order is not None:
                    rank = torch.empty_like(expert_order)
                    rank[expert_order] = torch.arange(expert_order.numel())
                    batch_scores, batch_ids = batch_scores[:, expert_order.to(ids.device)], rank.to(ids.device)[batch_ids]
                kept = device_drop_mask(batch_scores, batch_ids, self.num_devices, self.capacity_factor)
            else:
                kept = expert_drop_mask(batch_scores, batch_ids, self.capacity_factor, self.order)
            keep[rows] = kept
            layer = decision.layer_idx
            self.dropped[layer] = self.dropped.get(layer, 0) + int((~kept).sum())
            self.assignments[layer] = self.assignments.get(layer, 0) + kept.numel()
        return decision.with_assignments(*apply_keep(ids, decision.weights, keep))
