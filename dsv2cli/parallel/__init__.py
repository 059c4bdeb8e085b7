"""Multi-process runs with torch.distributed: sharding applied to a built model, never inside it.

Read order: ``group`` (process group, collectives, rank agreement) -> ``plan`` (which slice each rank
holds) -> ``layers`` (``parallelize``: the sharded modules) -> ``loading`` (each rank reads only its
slices) -> ``memory`` (per-rank bytes, computed and measured) -> ``launch`` (running a command under
torchrun).
"""

from dsv2cli.parallel.group import ParallelGroup, from_main_rank, launched_by_torchrun, shared_seed
from dsv2cli.parallel.launch import distributed_run
from dsv2cli.parallel.layers import parallelize
from dsv2cli.parallel.loading import load_sharded
from dsv2cli.parallel.plan import ShardPlan

__all__ = [
    "ParallelGroup",
    "ShardPlan",
    "distributed_run",
    "from_main_rank",
    "launched_by_torchrun",
    "load_sharded",
    "parallelize",
    "shared_seed",
]
