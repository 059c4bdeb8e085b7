"""Token dropping as pure torch functions: which routed assignments survive a capacity limit.

Shape legend: N tokens (a flattened batch), E routed experts, K assignments per token, D devices
(contiguous expert groups of ``E / D`` experts), B sequences.

Two conventions (spec §5, peers A8):

* **device-level** (DeepSeek-V2, paper §2.2.4): each device may process ``capacity_factor`` times its
  average load of ``N·K / D`` assignments; beyond that the lowest-affinity assignments on the device
  are dropped. Assignments of protected tokens (the paper keeps ~10% of sequences whole) are never
  dropped and use the budget first.
* **expert-level** (GShard / Switch / Megatron ``--moe-expert-capacity-factor``): each expert takes at
  most ``ceil(capacity_factor · N·K / E)`` assignments, keeping the highest-probability ones
  (``order="probs"``) or the earliest tokens (``order="position"``).

Every function returns a keep mask ``[N, K]`` (False also where the id was already -1); the model's
routing hook applies it as expert id -1 (see :mod:`dsv2cli.model.moe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv2cli.analysis.balance import device_of_expert

DROP_ORDERS = ("probs", "position")


@dataclass(frozen=True)
class DropRates:
    """Fractions dropped: of valid assignments, of tokens that lost at least one, of tokens that lost all."""

    assignments: float
    tokens: float
    full_tokens: float
    dropped_assignments: int
    total_assignments: int


def device_capacity(num_tokens: int, top_k: int, num_devices: int, capacity_factor: float) -> int:
    """Assignments one device may process: ``ceil(capacity_factor · N·K / D)`` (1.0 = the average load)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_devices)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may process: ``ceil(capacity_factor · N·K / E)`` (Megatron's formula)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def device_drop_mask(
    scores: torch.Tensor,
    expert_ids: torch.Tensor,
    num_devices: int,
    capacity_factor: float = 1.0,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V2 device-level dropping: ``scores [N, E]``, ``expert_ids [N, K]`` -> keep ``[N, K]``.

    ``protected [N]`` (bool) marks tokens that are never dropped. Their assignments count against
    the device budget; the remaining budget goes to the other assignments by descending affinity
    ``scores[n, expert]``. Ties keep the earlier token.
    """
    _check_factor(capacity_factor)
    num_tokens, num_experts = scores.shape
    devices = device_of_expert(expert_ids, num_experts, num_devices)  # [N, K]
    affinity = scores.detach().float().gather(1, expert_ids.clamp(min=0))  # [N, K]
    capacity = device_capacity(num_tokens, expert_ids.shape[1], num_devices, capacity_factor)
    always = _expand_protected(protected, expert_ids)
    return _keep_within_capacity(devices, num_devices, affinity, capacity, always)


def expert_drop_mask(
    scores: torch.Tensor,
    expert_ids: torch.Tensor,
    capacity_factor: float = 1.0,
    order: str = "probs",
) -> torch.Tensor:
    """GShard/Switch expert-level capacity dropping -> keep ``[N, K]``.

    ``order="probs"`` keeps each expert's highest-affinity assignments; ``order="position"`` keeps
    its earliest tokens (Megatron's ``--moe-token-drop-policy position``).
    """
    _check_factor(capacity_factor)
    if order not in DROP_ORDERS:
        raise ValueError(f"unknown drop order {order!r}; expected one of {', '.join(DROP_ORDERS)}")
    num_tokens, num_experts = scores.shape
    if order == "probs":
        priority = scores.detach().float().gather(1, expert_ids.clamp(min=0))
    else:
        priority = -torch.arange(num_tokens, dtype=torch.float32, device=scores.device)[:, None].expand_as(expert_ids)
    capacity = expert_capacity(num_tokens, expert_ids.shape[1], num_experts, capacity_factor)
    return _keep_within_capacity(expert_ids, num_experts, priority, capacity, None)


def protected_sequences(batch_size: int, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``[B]`` bool mask with ``fraction`` of the sequences protected (the remainder drawn at random).

    With ``B·fraction`` not whole, one more sequence is protected with probability equal to the
    fractional part, so the protected share is ``fraction`` on average over many batches.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"protect fraction {fraction} must be between 0 and 1")
    exact = batch_size * fraction
    count = int(exact) + int(torch.rand((), generator=generator).item() < exact - int(exact))
    mask = torch.zeros(batch_size, dtype=torch.bool)
    mask[torch.randperm(batch_size, generator=generator)[:count]] = True
    return mask


def drop_rates(keep: torch.Tensor, expert_ids: torch.Tensor) -> DropRates:
    """Rates of a keep mask ``[N, K]`` over the assignments that were valid (id >= 0) before it."""
    valid = expert_ids >= 0
    dropped = valid & ~keep
    lost_any = dropped.any(dim=-1)
    lost_all = valid.any(dim=-1) & ~(keep & valid).any(dim=-1)
    total = int(valid.sum())
    tokens = max(int(expert_ids.shape[0]), 1)
    return DropRates(
        assignments=int(dropped.sum()) / max(total, 1),
        tokens=int(lost_any.sum()) / tokens,
        full_tokens=int(lost_all.sum()) / tokens,
        dropped_assignments=int(dropped.sum()),
        total_assignments=total,
    )


def apply_keep(expert_ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropped assignments become id -1 with weight 0 (what :class:`RoutingDecision` expects)."""
    return expert_ids.masked_fill(~keep, -1), weights.masked_fill(~keep, 0.0)


def _keep_within_capacity(
    bucket: torch.Tensor, num_buckets: int, priority: torch.Tensor, capacity: int, always: torch.Tensor | None
) -> torch.Tensor:
    """Keep, per bucket (device or expert), ``always`` assignments plus the highest-priority others up to ``capacity``.

    ``bucket [N, K]`` (-1 = not routed), ``priority [N, K]`` (higher is kept first).
    """
    flat_bucket = bucket.reshape(-1)
    valid = flat_bucket >= 0
    flat_priority = priority.reshape(-1).float()
    if always is not None:
        # Protected assignments sort first in their bucket, so they take the budget before the others.
        flat_priority = torch.where(always.reshape(-1), torch.full_like(flat_priority, math.inf), flat_priority)
    # Order by bucket, then by descending priority; stable sorts keep token order among ties.
    order = torch.argsort(-flat_priority, stable=True)
    order = order[torch.argsort(flat_bucket[order].clamp(min=0) + (~valid[order]).long() * num_buckets, stable=True)]
    sorted_bucket = torch.where(valid[order], flat_bucket[order], torch.full_like(flat_bucket[order], num_buckets))
    counts = torch.bincount(sorted_bucket, minlength=num_buckets + 1)
    starts = torch.cumsum(counts, 0) - counts  # [num_buckets + 1]
    rank = torch.arange(flat_bucket.numel(), device=bucket.device) - starts[sorted_bucket]
    keep_sorted = (rank < capacity) & (sorted_bucket < num_buckets)
    if always is not None:
        keep_sorted |= always.reshape(-1)[order] & valid[order]
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep.view_as(bucket)


def _expand_protected(protected: torch.Tensor | None, expert_ids: torch.Tensor) -> torch.Tensor | None:
    if protected is None:
        return None
    if protected.shape != expert_ids.shape[:1]:
        raise ValueError(f"protected mask has shape {tuple(protected.shape)}, expected ({expert_ids.shape[0]},)")
    return protected.bool()[:, None].expand_as(expert_ids)


def _check_factor(capacity_factor: float) -> None:
    if not capacity_factor > 0:
        raise ValueError(f"capacity factor {capacity_factor} must be positive")
