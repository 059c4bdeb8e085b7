"""Expert statistics from real routing: counts, load metrics, the paper's balance quantities, drop rates, placement.

Shape legend: N recorded tokens (all sequences in input order), E routed experts, K experts per token,
D devices, B rows of a forward pass, S their (padded) length, V vocabulary.

The model runs each batch of sequences once with :class:`RoutingRecorder` as its routing hook (spec §4,
"routing hook"); the recorder keeps the chosen experts and their affinities of the real tokens of every
MoE layer, and the paper's per-sequence ``Σ f·P`` (spec §5). Everything else is computed afterwards
from that record: nothing here changes what the model computes unless ``apply_drop`` asks for it.
The record's types (:class:`ExpertStatsReport` and its parts) are in ``expert_report.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from dsv2cli.analysis.balance import (
    communication_balance,
    device_balance,
    expert_balance,
    expert_counts,
)
from dsv2cli.analysis.expert_drop import (
    DROP_POLICIES,
    DropCounts,
    DropHook,
    drop_batches,
    drops_of_loads,
    forward_groups,
    simulate_drops,
)
from dsv2cli.analysis.expert_loads import ExpertLoads
from dsv2cli.analysis.expert_report import (
    ApplyDropResult,
    ExpertStatsReport,
    LayerStats,
    TopToken,
    load_metrics,
    summarise_layers,
)
from dsv2cli.analysis.placement import (
    Placement,
    balancedness,
    contiguous_placement,
    device_loads,
    plan_placement,
    read_placement,
)
from dsv2cli.analysis.text_inputs import SequenceSet
from dsv2cli.analysis.token_drop import DROP_ORDERS
from dsv2cli.errors import InputError, UnsupportedError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2, ForwardOptions
from dsv2cli.model.moe import RoutingDecision

DEFAULT_CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class StatsOptions:
    batch_size: int = 8  # sequences per forward pass
    batch_tokens: int | None = None  # tokens per drop batch; None = one sequence
    capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS
    drop_order: str = "probs"
    devices: int | None = None  # None = the router's groups, else 8 as in the paper (when it divides E)
    placement_file: Path | None = None
    max_devices: int | None = None  # M of the communication balance; None = topk_group or min(K, D)
    apply_drop: float | None = None
    apply_policy: str = "device"
    top_tokens: int = 0
    plan_devices: int | None = None
    redundant: int = 0
    forward: ForwardOptions = ForwardOptions()  # the forwards' kernels (an int8 model's: ``LoadedModel.options``)


class RoutingRecorder:
    """Routing hook keeping, per MoE layer, the experts chosen for the real tokens and their affinities.

    Call :meth:`start` before each forward with the row lengths (right-padded rows). It also sums the
    paper's per-sequence expert, device and communication ``Σ f·P`` (spec §5) over the sequences.
    """

    def __init__(self, placement: Placement, max_devices: int) -> None:
        self.placement = placement
        self.max_devices = max_devices
        self.ids: dict[int, list[torch.Tensor]] = {}
        self.affinity: dict[int, list[torch.Tensor]] = {}
        self.balance: dict[int, torch.Tensor] = {}  # layer -> sums of (expert, device, communication) [3]
        self._real: torch.Tensor | None = None
        self._groups: list[tuple[torch.Tensor, int]] = []
        self._orders: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def start(self, row_lengths: list[int], width: int, device: torch.device) -> None:
        self._real = torch.cat([torch.arange(n) + row * width for row, n in enumerate(row_lengths)]).to(device)
        by_length: dict[int, list[int]] = {}
        for row, n in enumerate(row_lengths):
            by_length.setdefault(n, []).append(row)
        self._groups = [(torch.tensor(rows, device=device), n) for n, rows in by_length.items()]

    def __call__(self, decision: RoutingDecision) -> None:
        assert self._real is not None, "start() must be called before each forward"
        layer = decision.layer_idx
        scores, ids = decision.scores, decision.expert_ids  # [B*S, E], [B*S, K]
        real_ids = ids[self._real]
        small = real_ids.to(torch.int16) if scores.shape[1] <= torch.iinfo(torch.int16).max else real_ids.to(torch.int32)
        self.ids.setdefault(layer, []).append(small)
        self.affinity.setdefault(layer, []).append(scores.gather(1, ids)[self._real])
        rows, width = decision.batch_shape
        seq_scores, seq_ids = scores.view(rows, width, -1), ids.view(rows, width, -1)
        if layer not in self._orders:
            self._orders[layer] = _relabelling(self.placement.expert_order(layer), scores.device)
        relabel = self._orders[layer]
        sums = self.balance.get(layer)
        for group, n in self._groups:
            s, i = seq_scores[group, :n], seq_ids[group, :n]  # [g, n, E], [g, n, K]
            terms = [expert_balance(s, i).sum()]
            if relabel is not None:
                order, rank = relabel
                s, i = s[..., order], rank[i]
            devices = self.placement.num_devices
            terms.append(device_balance(s, i, devices).sum())
            terms.append(communication_balance(s, i, devices, self.max_devices).sum())
            step = torch.stack(terms).double()
            sums = step if sums is None else sums + step
        self.balance[layer] = sums

    def layer_routing(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_ids [N, K] int64, affinity [N, K] float32)`` of one layer, on the CPU."""
        return torch.cat(self.ids[layer]).long().cpu(), torch.cat(self.affinity[layer]).cpu()


def _relabelling(order: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(order, rank)``: column order making each device's experts contiguous, and each expert's new id."""
    if order is None:
        return None
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return order.to(device), rank.to(device)


ProgressFn = Callable[[str, int], None]  # (phase, tokens just processed)


def default_devices(n_group: int, num_experts: int) -> int:
    """The router's expert groups when it has them (the paper's D = 8 for V2), else 8 devices when 8 divides E."""
    if n_group > 1:
        return n_group
    return next(d for d in (8, 4, 2, 1) if num_experts % d == 0)


def collect_expert_stats(
    model: DeepseekV2,
    tokenizer: TextTokenizer | None,
    name: str,
    inputs: SequenceSet,
    options: StatsOptions,
    progress: ProgressFn | None = None,
) -> ExpertStatsReport:
    """Run the model over ``inputs`` recording routing, then compute every statistic ``options`` asks for."""
    config = model.config
    moe_layers = config.moe_layer_indices
    if not moe_layers or not config.n_routed_experts:
        raise UnsupportedError(f"{name} has no MoE layers, so there is no routing to analyse")
    num_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    placement, max_devices = _check_options(
        options, config.n_group, config.topk_method, config.topk_group, num_experts, top_k, moe_layers
    )
    factors = list(dict.fromkeys(options.capacity_factors))  # a repeated factor is simulated once
    lengths = inputs.lengths
    batches = drop_batches(lengths, options.batch_tokens)
    groups = forward_groups(lengths, batches, options.batch_size)

    began = time.perf_counter()
    recorder = RoutingRecorder(placement, max_devices)
    base_loss = _run(model, inputs, groups, recorder, options.apply_drop is not None, progress, "routing", options.forward)
    layers = []
    overall = {(p, cf): DropCounts(p, cf, options.drop_order if p == "expert" else None) for p in DROP_POLICIES for cf in factors}
    stream = torch.tensor([t for s in inputs.sequences for t in s.token_ids]) if options.top_tokens else None
    for layer in moe_layers:
        ids, affinity = recorder.layer_routing(layer)
        counts = expert_counts(ids, num_experts)  # [E]
        loads = device_loads(counts, placement.layout(layer))
        expert_sum, device_sum, comm_sum = (recorder.balance[layer] / len(lengths)).tolist()
        order = placement.expert_order(layer)
        drops = [
            counts_at
            for policy in DROP_POLICIES
            for counts_at in simulate_drops(
                ids, affinity, batches, policy, factors, num_experts, placement.num_devices, options.drop_order, order
            )
        ]
        for d in drops:
            overall[(d.policy, d.capacity_factor)].add(d)
        layers.append(
            LayerStats(
                layer=layer,
                counts=[int(c) for c in counts.tolist()],
                metrics=load_metrics(counts),
                expert_balance=expert_sum,
                device_balance=device_sum,
                communication_balance=comm_sum,
                device_loads=loads.tolist(),
                device_balancedness=balancedness(loads),
                drop=drops,
                top_tokens=None if stream is None else top_tokens(stream, ids, num_experts, options.top_tokens, tokenizer),
            )
        )
    seconds = time.perf_counter() - began

    report = ExpertStatsReport(
        model=name,
        sequences=len(lengths),
        tokens=inputs.tokens,
        truncated=inputs.truncated,
        top_k=top_k,
        n_routed_experts=num_experts,
        n_shared_experts=config.n_shared_experts or 0,
        devices=placement.num_devices,
        max_devices=max_devices,
        placement=placement.source,
        batch_tokens=options.batch_tokens,
        drop_batches=len(batches),
        capacity_factors=factors,
        drop_order=options.drop_order,
        layers=layers,
        drop_overall=list(overall.values()),
        seconds=seconds,
        n_group=config.n_group,
        topk_group=config.topk_group,
        topk_method=config.topk_method,
    )
    report.summary = summarise_layers(layers)
    if options.apply_drop is not None:
        assert base_loss is not None
        report.apply = _apply_drop(model, inputs, groups, batches, placement, options, base_loss, moe_layers, progress)
    if options.plan_devices is not None:
        report.plan = plan_placement(
            {layer.layer: torch.tensor(layer.counts) for layer in layers}, options.plan_devices, options.redundant
        )
    return report


def report_from_loads(loads: ExpertLoads, options: StatsOptions, source: str) -> ExpertStatsReport:
    """The report of recorded loads (a loads file, a server's dump) without running the model.

    Everything that counts alone determine is as :func:`collect_expert_stats` computes it: loads, their
    metrics, device loads, the plan, and the dropped assignments per capacity factor with all the
    recorded tokens as one drop batch (as ``batch_tokens`` ≥ the tokens gives on text). The paper's
    per-sequence ``Σ f·P`` and which tokens lose assignments need the routing token by token: None.
    """
    for field, unset in (("apply_drop", options.apply_drop is None), ("top_tokens", not options.top_tokens)):
        if not unset:
            raise InputError(f"`{field}` needs the model run on text; {source} holds expert counts only")
    if options.batch_tokens is not None:
        raise InputError(
            f"`batch_tokens` needs the routing token by token; {source} holds counts only",
            hint="with a loads file all its tokens form one drop batch",
        )
    experts, top_k, tokens = loads.n_routed_experts, loads.top_k, loads.tokens
    placement, max_devices = _check_options(
        options, loads.n_group, loads.topk_method, loads.topk_group, experts, top_k, loads.layers
    )
    factors = list(dict.fromkeys(options.capacity_factors))
    overall = {(p, cf): DropCounts(p, cf, options.drop_order if p == "expert" else None) for p in DROP_POLICIES for cf in factors}
    layers = []
    for layer, row in zip(loads.layers, loads.loads, strict=True):
        counts = torch.tensor(row, dtype=torch.int64)  # [E]
        per_device = device_loads(counts, placement.layout(layer))
        buckets = {"device": per_device, "expert": counts}
        drops = [d for p in DROP_POLICIES for d in drops_of_loads(buckets[p], tokens, top_k, p, factors, options.drop_order)]
        for d in drops:
            overall[(d.policy, d.capacity_factor)].add(d)
        layers.append(
            LayerStats(
                layer=layer,
                counts=list(row),
                metrics=load_metrics(counts),
                expert_balance=None,
                device_balance=None,
                communication_balance=None,
                device_loads=per_device.tolist(),
                device_balancedness=balancedness(per_device),
                drop=drops,
            )
        )
    report = ExpertStatsReport(
        model=loads.model,
        sequences=None,
        tokens=tokens,
        truncated=False,
        top_k=top_k,
        n_routed_experts=experts,
        n_shared_experts=loads.n_shared_experts,
        devices=placement.num_devices,
        max_devices=max_devices,
        placement=placement.source,
        batch_tokens=tokens,
        drop_batches=1,
        capacity_factors=factors,
        drop_order=options.drop_order,
        layers=layers,
        drop_overall=list(overall.values()),
        seconds=0.0,
        n_group=loads.n_group,
        topk_group=loads.topk_group,
        topk_method=loads.topk_method,
        loads_file=source,
    )
    report.summary = summarise_layers(layers)
    if options.plan_devices is not None:
        report.plan = plan_placement(
            {layer.layer: torch.tensor(layer.counts) for layer in layers}, options.plan_devices, options.redundant
        )
    return report


def _check_options(
    options: StatsOptions, n_group: int, topk_method: str, topk_group: int, num_experts: int, top_k: int, moe_layers: list[int]
) -> tuple[Placement, int]:
    """Validate everything before the model runs; returns the placement and M."""
    if options.batch_size < 1:
        raise InputError(f"`batch_size` must be at least 1, got {options.batch_size}")
    if options.batch_tokens is not None and options.batch_tokens < 1:
        raise InputError(f"`batch_tokens` must be at least 1, got {options.batch_tokens}")
    if not options.capacity_factors:
        raise InputError("give at least one `capacity_factors`")
    for factor in (*options.capacity_factors, *([] if options.apply_drop is None else [options.apply_drop])):
        if not (factor > 0 and math.isfinite(factor)):
            raise InputError(
                f"capacity factor {factor} must be a positive number", hint="1.0 = the average load per expert or device"
            )
    if options.drop_order not in DROP_ORDERS:
        raise InputError(f"unknown `drop_order` {options.drop_order!r}", hint=f"choose {' or '.join(DROP_ORDERS)}")
    if options.apply_policy not in DROP_POLICIES:
        raise InputError(f"unknown drop policy {options.apply_policy!r}", hint=f"choose {' or '.join(DROP_POLICIES)}")
    if options.top_tokens < 0:
        raise InputError(f"`top_tokens` must be 0 or more, got {options.top_tokens}")
    if options.plan_devices is not None:
        if options.plan_devices < 1 or options.redundant < 0:
            raise InputError("`plan_devices` must be at least 1 and `redundant` 0 or more")
        if (num_experts + options.redundant) % options.plan_devices:
            raise InputError(
                f"{num_experts} experts + {options.redundant} replicas cannot be spread evenly over {options.plan_devices} devices",
                hint="experts + `redundant` must be a multiple of `plan_devices`",
            )
    elif options.redundant:
        raise InputError("`redundant` needs `plan_devices`")
    if options.devices is not None and not 1 <= options.devices <= num_experts:
        raise InputError(f"`devices` must be between 1 and the {num_experts} routed experts, got {options.devices}")
    if options.placement_file is not None:
        if options.devices is not None:
            raise InputError("give either `devices` or `placement_file`, not both")
        placement = read_placement(options.placement_file, num_experts, moe_layers)
    else:
        placement = contiguous_placement(num_experts, options.devices or default_devices(n_group, num_experts))
    devices = placement.num_devices
    if options.max_devices is not None:
        max_devices = options.max_devices
        if not 1 <= max_devices <= devices:
            raise InputError(f"`max_devices` must be between 1 and the {devices} devices, got {max_devices}")
    elif topk_method == "group_limited_greedy" and n_group == devices and placement.source == "contiguous":
        max_devices = topk_group  # device-limited routing: each token reaches at most topk_group groups
    else:
        max_devices = min(top_k, devices)
    return placement, max_devices


def _run(
    model: DeepseekV2,
    inputs: SequenceSet,
    groups: list[list[int]],
    hook: RoutingRecorder | DropHook,
    need_loss: bool,
    progress: ProgressFn | None,
    phase: str,
    forward: ForwardOptions,
) -> tuple[float, int] | None:
    """One pass over all forward groups with ``hook``; ``(summed next-token loss, predicted tokens)`` when asked."""
    device = model.embed_tokens.weight.device
    total_loss, predicted, offset = 0.0, 0, 0
    with torch.inference_mode():
        for group in groups:
            rows = [inputs.sequences[i].token_ids for i in group]
            lengths = [len(r) for r in rows]
            width = max(lengths)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)
            for row, ids in enumerate(rows):
                tokens[row, : len(ids)] = torch.tensor(ids)
            tokens = tokens.to(device)
            if isinstance(hook, RoutingRecorder):
                hook.start(lengths, width, device)
            else:
                hook.start(lengths, width, offset)
            # Right padding is exact under causal attention: real tokens never see the padding after them.
            logits = model(tokens, routing_hook=hook, last_only=not need_loss, options=forward)
            if need_loss:
                loss, count = _next_token_loss(logits, tokens, lengths)
                total_loss += loss
                predicted += count
            offset += sum(lengths)
            if progress is not None:
                progress(phase, sum(lengths))
    return (total_loss, predicted) if need_loss else None


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: list[int]) -> tuple[float, int]:
    """Summed cross entropy of predicting token ``t+1`` from ``≤ t`` over the real positions of each row."""
    rows, width = tokens.shape
    if width < 2:
        return 0.0, 0
    mask = torch.arange(width - 1, device=tokens.device)[None, :] < (torch.tensor(lengths, device=tokens.device)[:, None] - 1)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return float(nll[mask.reshape(-1)].double().sum()), int(mask.sum())


def _apply_drop(
    model: DeepseekV2,
    inputs: SequenceSet,
    groups: list[list[int]],
    batches: list[tuple[int, int]],
    placement: Placement,
    options: StatsOptions,
    base: tuple[float, int],
    moe_layers: list[int],
    progress: ProgressFn | None,
) -> ApplyDropResult:
    assert options.apply_drop is not None
    hook = DropHook(
        options.apply_policy,
        options.apply_drop,
        batches,
        placement.num_devices,
        options.drop_order,
        {layer: placement.expert_order(layer) for layer in moe_layers},
    )
    dropped = _run(model, inputs, groups, hook, True, progress, "dropping", options.forward)
    assert dropped is not None
    base_loss, predicted = base
    if predicted == 0:
        raise InputError("`apply_drop` needs sequences of at least 2 tokens to measure a next-token loss")
    return ApplyDropResult(
        policy=options.apply_policy,
        capacity_factor=options.apply_drop,
        drop_order=options.drop_order if options.apply_policy == "expert" else None,
        loss=base_loss / predicted,
        loss_with_drop=dropped[0] / dropped[1],
        predicted_tokens=predicted,
        assignment_drop_rate=sum(hook.dropped.values()) / max(sum(hook.assignments.values()), 1),
        layer_drop_rates={layer: hook.dropped[layer] / max(hook.assignments[layer], 1) for layer in moe_layers},
    )


def top_tokens(
    tokens: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, k: int, tokenizer: TextTokenizer | None
) -> list[list[TopToken]]:
    """The ``k`` token ids most often routed to each expert (ties: lower id first), from ``tokens [N]`` and ``expert_ids [N, K]``."""
    vocab = int(tokens.max()) + 1
    keys = (expert_ids.long() * vocab + tokens[:, None]).reshape(-1)
    unique, counts = torch.unique(keys, return_counts=True)  # sorted by (expert, token)
    experts, token_ids = unique // vocab, unique % vocab
    order = torch.argsort(-counts, stable=True)  # keeps token order among equal counts
    order = order[torch.argsort(experts[order], stable=True)]
    per_expert = torch.bincount(experts, minlength=num_experts)
    starts = torch.cumsum(per_expert, 0) - per_expert
    chosen = order[(torch.arange(order.numel()) - starts[experts[order]]) < k]  # the first k of each expert
    result: list[list[TopToken]] = [[] for _ in range(num_experts)]
    for expert, token, count in zip(experts[chosen].tolist(), token_ids[chosen].tolist(), counts[chosen].tolist(), strict=True):
        text = tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else None
        result[expert].append(TopToken(token, text, count))
    return result
