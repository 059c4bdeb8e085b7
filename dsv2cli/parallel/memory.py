"""Per-rank memory: computed from a config (:func:`rank_memory`) and measured on a loaded rank (:func:`measure_rank`).

Both walk the same :class:`ShardPlan`, so the computed parameter bytes of a rank equal what
:func:`measure_rank` counts after sharded loading. The latent KV cache is not split (every rank caches
the full ``[c_KV | k_pe]`` latent for its own heads) and is not included here; ``dsv2 cache-report``
sizes it.

Print the table for the released models::

    python -m dsv2cli.parallel.memory deepseek-v2 deepseek-v2-lite --world-sizes 1 2 4 8
"""

from __future__ import annotations

import argparse
import resource
import sys
from dataclasses import asdict, dataclass

import torch

from dsv2cli.checkpoint.fit import default_working, load_need, native_weights
from dsv2cli.checkpoint.hf_keys import ROUTER_SUFFIX, native_shapes
from dsv2cli.config import ModelConfig
from dsv2cli.model.dtypes import DTYPES
from dsv2cli.parallel.group import ParallelGroup, gather_objects
from dsv2cli.parallel.plan import ShardPlan
from dsv2cli.presets import preset_config

# Parameter groups of the table, by the first matching fragment of the dsv2 name.
_PARTS = (
    ("routed_experts", ".mlp.experts."),
    ("shared_experts", ".mlp.shared_experts."),
    ("attention", ".self_attn."),
    ("embedding_and_head", "embed_tokens."),
    ("embedding_and_head", "lm_head."),
    ("dense_mlp", ".mlp.gate_proj"),
    ("dense_mlp", ".mlp.up_proj"),
    ("dense_mlp", ".mlp.down_proj"),
)


def _part(name: str) -> str:
    return next((part for part, fragment in _PARTS if fragment in name), "other")


@dataclass(frozen=True)
class RankMemory:
    """Parameter bytes one rank holds, by part of the model (``other``: norms and routers)."""

    world_size: int
    dtype: str
    routed_experts: int
    shared_experts: int
    attention: int
    dense_mlp: int
    embedding_and_head: int
    other: int

    @property
    def total(self) -> int:
        return self.routed_experts + self.shared_experts + self.attention + self.dense_mlp + self.embedding_and_head + self.other

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "total": self.total}


def rank_memory(config: ModelConfig, world_size: int, dtype: torch.dtype = torch.bfloat16) -> RankMemory:
    """Bytes of parameters on each rank when ``config`` is split across ``world_size`` ranks.

    Every rank holds the same amount (splits are even): ``sum over parameters of local elements x bytes``,
    local elements = full / world_size for split tensors, full for replicated ones.
    """
    plan = ShardPlan(config, 0, world_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    parts = dict.fromkeys(("routed_experts", "shared_experts", "attention", "dense_mlp", "embedding_and_head", "other"), 0)
    for name, shape in native_shapes(config).items():
        elements = 1
        for n in plan.local_shape(name, shape):
            elements *= n
        parts[_part(name)] += elements * (4 if name.endswith(ROUTER_SUFFIX) else itemsize)  # the router is float32
    return RankMemory(world_size, str(dtype).removeprefix("torch."), **parts)


@dataclass(frozen=True)
class MeasuredRank:
    """What one rank holds after loading: parameter bytes (total and routed experts) and its resident memory."""

    rank: int
    parameter_bytes: int
    expert_bytes: int
    rss_bytes: int
    peak_rss_bytes: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes; current from /proc where there is one."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024, peak
    except OSError:
        pass
    return peak, peak


def measure_rank(model: torch.nn.Module, rank: int) -> MeasuredRank:
    """Count the weight bytes ``model`` holds on this rank (shared tensors once) and read the RSS.

    Weights are every tensor of the state dict: parameters, and the buffers int8 modules keep their
    weights and scales in.
    """
    seen: set[int] = set()
    total = experts = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes
        if ".mlp.experts." in name:
            experts += nbytes
    current, peak = _rss()
    return MeasuredRank(rank, total, experts, current, max(current, peak))


@dataclass(frozen=True)
class ShardReport:
    """Every rank's measurement after sharded loading, and the full model's routed-expert bytes for scale."""

    backend: str
    ranks: list[MeasuredRank]
    full_expert_bytes: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def lines(self) -> list[str]:
        """One line per rank, for people (stderr)."""
        head = f"{self.world_size} ranks ({self.backend}); routed experts in the checkpoint: {_human(self.full_expert_bytes)}"
        rows = [
            f"rank {r.rank}: parameters {_human(r.parameter_bytes)}, routed experts {_human(r.expert_bytes)}"
            f" ({r.expert_bytes / self.full_expert_bytes:.1%} of all), RSS {_human(r.rss_bytes)} (peak {_human(r.peak_rss_bytes)})"
            if self.full_expert_bytes
            else f"rank {r.rank}: parameters {_human(r.parameter_bytes)}, RSS {_human(r.rss_bytes)} (peak {_human(r.peak_rss_bytes)})"
            for r in self.ranks
        ]
        return [head, *rows]

    def to_json(self) -> dict[str, object]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "full_expert_bytes": self.full_expert_bytes,
            "ranks": [r.to_json() for r in self.ranks],
        }


def gather_report(group: ParallelGroup, model: torch.nn.Module, dtype: torch.dtype) -> ShardReport:
    """Measure this rank and collect every rank's numbers (a collective: every rank calls it)."""
    measured = gather_objects(group, measure_rank(model, group.rank))
    full = sum(rank.expert_bytes for rank in measured)  # type: ignore[union-attr]  # experts are split, never replicated
    return ShardReport(group.backend, measured, full)  # type: ignore[arg-type]


# Machine sizes `dsv2 info` and docs/performance.md answer for, in GiB of RAM (or of one GPU).
MACHINE_GIB = (24, 64, 128, 512)
# Share of a machine's RAM a run can use: the OS, other programs and the page cache's own needs keep the rest.
USABLE_SHARE = 0.9
PRECISIONS = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class FitRow:
    """One precision of a model: what one process needs to run it at speed, and machines needed per machine size.

    ``need_bytes``: weights (copied and mapped: mapped weights must stay in the page cache, or every
    step reads them from disk) + a 4096-token cache and working memory. ``machines[gib]``: the fewest
    processes, one per machine, whose share fits in :data:`USABLE_SHARE` of ``gib`` (None: more than 64).
    """

    precision: str
    weight_bytes: int
    need_bytes: int
    machines: dict[int, int | None]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "machines": {str(k): v for k, v in self.machines.items()}}


def fit_table(config: ModelConfig, machine_gib: tuple[int, ...] = MACHINE_GIB) -> list[FitRow]:
    """What fits where: for float32, bfloat16 and int8, the memory one process needs and machines needed per size.

    Each precision is a native copy loaded as ``dsv2 generate`` loads it (int8: int8 weights with float32
    activations, the CPU default); a rank of ``n`` holds its :class:`ShardPlan` share.
    """
    world_sizes = ShardPlan.world_sizes(config)
    rows = []
    for precision in PRECISIONS:
        dtype = torch.float32 if precision == "int8" else DTYPES[precision]
        weights = native_weights(config, "int8") if precision == "int8" else native_weights(config, None, dtype)
        working = default_working(config, dtype)

        needs: dict[int, int] = {}

        def need(world_size: int, weights=weights, dtype=dtype, working=working, needs=needs) -> int:
            if world_size not in needs:  # each machine size asks again for the same world sizes
                plan = ShardPlan(config, 0, world_size) if world_size > 1 else None
                needs[world_size] = load_need(weights, dtype, "cpu", plan).total + working
            return needs[world_size]

        machines = {gib: next((n for n in world_sizes if need(n) <= USABLE_SHARE * gib * 2**30), None) for gib in machine_gib}
        rows.append(FitRow(precision, need(1) - working, need(1), machines))
    return rows


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1000 or unit == "TiB":  # 1000 MiB reads better as 0.98 GiB
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def markdown_table(names: list[str], world_sizes: list[int], dtype: torch.dtype = torch.bfloat16) -> str:
    """Per-rank parameter memory of presets ``names`` at each world size, as a Markdown table."""
    lines = [
        "| model | ranks | routed experts | attention | dense + shared MLP | embedding + head | other | total per rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        config = preset_config(name)
        for n in world_sizes:
            m = rank_memory(config, n, dtype)
            cells = [m.routed_experts, m.attention, m.dense_mlp + m.shared_experts, m.embedding_and_head, m.other, m.total]
            lines.append(f"| {name} | {n} | " + " | ".join(_human(c) for c in cells) + " |")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsv2cli.parallel.memory", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+", help="preset names, e.g. deepseek-v2 deepseek-v2-lite")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = parser.parse_args(argv)
    print(markdown_table(args.presets, args.world_sizes, DTYPES[args.dtype]))


if __name__ == "__main__":
    _main()
