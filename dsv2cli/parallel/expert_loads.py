"""Expert counts of a multi-process run, gathered across ranks: the load each rank's experts carried.

The router is replicated, so every rank sees every routing decision and computes the same
``[moe_layers, E]`` count matrix. :func:`gather_expert_loads` all-gathers each rank's matrix, checks that
they are identical (a difference would mean the ranks computed different things, and the run's output
could not be trusted), and sums each rank's own block of experts: how many token-expert assignments
that rank's experts processed, the device balance of this very launch.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv2cli.config import ModelConfig
from dsv2cli.parallel.group import CollectiveFailure, ParallelGroup, gather_objects
from dsv2cli.parallel.plan import ShardPlan


@dataclass(frozen=True)
class RankLoad:
    rank: int
    first_expert: int
    stop_expert: int
    assignments: int  # token-expert pairs this rank's experts processed, over all MoE layers


@dataclass(frozen=True)
class ExpertLoads:
    counts: list[list[int]]  # [moe_layers, E], the same on every rank
    ranks: list[RankLoad]

    def lines(self) -> list[str]:
        total = sum(r.assignments for r in self.ranks) or 1
        return [
            f"rank {r.rank} (experts {r.first_expert}-{r.stop_expert - 1}): {r.assignments} assignments "
            f"({r.assignments / total:.1%}; an even split is {1 / len(self.ranks):.1%})"
            for r in self.ranks
        ]


def gather_expert_loads(group: ParallelGroup, config: ModelConfig, counts: list[list[int]]) -> ExpertLoads:
    """All-gather the count matrices (a collective), check they agree, and split the load by owning rank."""
    everyone = gather_objects(group, counts)
    differing = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
    if differing:  # every rank sees the same matrices, so every rank raises this same error
        verb = "differs" if len(differing) == 1 else "differ"
        raise CollectiveFailure(
            f"the ranks computed different expert counts ({_ranks(differing)} {verb} from rank 0)",
            hint="every rank must run the same torch version on the same kind of device",
        )
    loads = []
    for rank in range(group.world_size):
        first, stop = ShardPlan(config, rank, group.world_size).experts
        loads.append(RankLoad(rank, first, stop, sum(sum(layer[first:stop]) for layer in counts)))
    return ExpertLoads(counts, loads)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
