"""Expert loads recorded on the live server, in SGLang's endpoints' shape.

``POST /start_expert_distribution_record`` installs :class:`ExpertRecorder` as the routing hook of every
forward (prefills and decode steps; steps then run eagerly, since a compiled step serves no hook);
``/stop_expert_distribution_record`` removes it; ``/dump_expert_distribution_record`` answers the counts as
the document ``dsv2 expert-stats --save-loads FILE.json`` writes and ``dsv2 expert-stats --loads FILE`` reads
(:class:`dsv2cli.analysis.expert_loads.ExpertLoads`): ``{"model", "layers", "n_routed_experts",
"n_shared_experts", "top_k", "n_group", "topk_group", "topk_method", "tokens", "loads"}`` with ``loads[i][e]``
the tokens of MoE layer ``layers[i]`` routed to expert ``e``. Idle rows of the batch are not counted.
"""

from __future__ import annotations

from threading import Lock
from typing import Any

import torch

from dsv2cli.analysis.expert_loads import ExpertLoads
from dsv2cli.config import ModelConfig
from dsv2cli.model.moe import RoutingDecision


class ExpertRecorder:
    """A routing hook counting, per MoE layer, the tokens routed to each expert (dropped assignments, id -1, are not)."""

    def __init__(self, config: ModelConfig, model: str = "") -> None:
        self.config = config
        self.model = model
        self.layers = config.moe_layer_indices
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.experts = config.n_routed_experts or 0
        self.top_k = config.num_experts_per_tok or 0
        self.counts = torch.zeros(len(self.layers), self.experts, dtype=torch.int64)  # [moe layers, E]
        self.tokens = 0
        self.rows: torch.Tensor | None = None  # [B] bool: the rows of the next forward that are requests
        self.lock = Lock()

    def next_forward(self, rows: torch.Tensor | None) -> None:
        """Before each forward: which rows count (None: all)."""
        self.rows = rows

    def __call__(self, decision: RoutingDecision) -> None:
        ids = decision.expert_ids  # [B*S, K]
        batch, seq = decision.batch_shape
        if self.rows is not None:
            ids = ids.view(batch, seq, -1)[self.rows.to(ids.device)].reshape(-1, ids.shape[-1])
        chosen = ids[ids >= 0].cpu()
        with self.lock:
            self.counts[self.index[decision.layer_idx]] += torch.bincount(chosen, minlength=self.experts)
            if decision.layer_idx == self.layers[0]:
                self.tokens += ids.shape[0]

    def document(self) -> dict[str, Any]:
        with self.lock:
            loads, tokens = self.counts.tolist(), self.tokens
        config = self.config
        return ExpertLoads(
            model=self.model,
            layers=list(self.layers),
            loads=loads,
            tokens=tokens,
            top_k=self.top_k,
            n_routed_experts=self.experts,
            n_shared_experts=config.n_shared_experts or 0,
            n_group=config.n_group,
            topk_group=config.topk_group,
            topk_method=config.topk_method,
        ).to_json()
