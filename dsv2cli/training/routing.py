"""The training-time routing hook: balance losses, device-level token dropping, expert-load bookkeeping.

It plugs into the model through :class:`~dsv2cli.model.moe.RoutingHook`, so the model code knows nothing
about training. One hook object is made per forward pass; it sums the α-weighted losses of all MoE layers
(as the paper adds one term per layer) and records what each layer did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv2cli.analysis.balance import communication_balance, device_balance, expert_balance, expert_counts
from dsv2cli.analysis.token_drop import apply_keep, device_drop_mask
from dsv2cli.model.moe import RoutingDecision


@dataclass(frozen=True)
class BalanceSettings:
    """Weights of the three balance losses (0 = off) and the device-level routing/dropping setup (spec §5)."""

    expert_alpha: float = 0.0
    device_alpha: float = 0.0
    comm_alpha: float = 0.0
    devices: int = 1
    max_devices_per_token: int = 1
    capacity_factor: float | None = None  # None = no token dropping
    per_sequence: bool = True  # the paper's per-sequence f and P (HF seq_aux=True)


@dataclass
class RoutingRecord:
    """What one forward pass routed: loss terms (with gradients) and detached statistics."""

    aux_loss: torch.Tensor | None = None
    expert_terms: list[float] = field(default_factory=list)
    device_terms: list[float] = field(default_factory=list)
    comm_terms: list[float] = field(default_factory=list)
    load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> assignments per expert [E]
    dropped: int = 0
    assignments: int = 0


class TrainingRoutingHook:
    """Adds the balance losses and (optionally) drops tokens per device beyond the capacity budget.

    ``protected`` ``[N]`` marks tokens of sequences that are never dropped. Losses use the routing as
    chosen (before dropping), as in the paper and the HF remote ``MoEGate``.
    """

    def __init__(self, settings: BalanceSettings, protected: torch.Tensor | None = None, drop: bool = False) -> None:
        self.settings = settings
        self.protected = protected
        self.drop = drop and settings.capacity_factor is not None
        self.record = RoutingRecord()

    def __call__(self, decision: RoutingDecision) -> RoutingDecision | None:
        s = self.settings
        scores, ids = decision.scores, decision.expert_ids  # [N, E], [N, K]
        num_experts = scores.shape[-1]
        if s.per_sequence:
            batch, seq = decision.batch_shape
            seq_scores, seq_ids = scores.view(batch, seq, -1), ids.view(batch, seq, -1)
        else:
            seq_scores, seq_ids = scores, ids
        terms = []
        expert = expert_balance(seq_scores, seq_ids).mean()
        self.record.expert_terms.append(float(expert.detach()))
        terms.append(s.expert_alpha * expert if s.expert_alpha else None)
        if s.devices > 1:
            device = device_balance(seq_scores, seq_ids, s.devices).mean()
            comm = communication_balance(seq_scores, seq_ids, s.devices, s.max_devices_per_token).mean()
            self.record.device_terms.append(float(device.detach()))
            self.record.comm_terms.append(float(comm.detach()))
            terms.append(s.device_alpha * device if s.device_alpha else None)
            terms.append(s.comm_alpha * comm if s.comm_alpha else None)
        for term in terms:
            if term is not None:
                self.record.aux_loss = term if self.record.aux_loss is None else self.record.aux_loss + term
        self.record.load[decision.layer_idx] = expert_counts(ids.detach(), num_experts)
        if not self.drop:
            return None
        assert s.capacity_factor is not None
        keep = device_drop_mask(scores, ids, s.devices, s.capacity_factor, self.protected)
        valid = ids >= 0
        self.record.dropped += int((valid & ~keep).sum())
        self.record.assignments += int(valid.sum())
        return decision.with_assignments(*apply_keep(ids, decision.weights, keep))
