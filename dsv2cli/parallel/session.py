"""Loading this rank's shard of a model for a command run under torchrun (one process loads with ``inference.session``)."""

from __future__ import annotations

from dsv2cli.checkpoint.resolve import resolve_checkpoint
from dsv2cli.inference.session import LoadedModel, choose_dtype, configure_cpu, int8_options
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model.int4 import absorb_int4
from dsv2cli.model.quantized import absorb_int8
from dsv2cli.model.transformer import fuse_projections
from dsv2cli.parallel.group import ParallelGroup, agree, from_main_rank
from dsv2cli.parallel.loading import load_sharded
from dsv2cli.parallel.memory import ShardReport, gather_report


def load_model(
    spec: str | None,
    group: ParallelGroup,
    dtype: str = "auto",
    threads: int | None = None,
) -> tuple[LoadedModel, ShardReport]:
    """This rank's shard (on the group's device) and every rank's memory numbers.

    Every rank loads, then all check together (:func:`agree`): a rank that failed (a missing file,
    no memory) makes every rank raise the same error instead of leaving the others waiting in their
    first collective.
    """
    # Every rank must compute in one dtype, and "auto" may depend on the memory free at that moment: rank 0 decides.
    torch_dtype = from_main_rank(group, lambda: choose_dtype(dtype, group.device, resolve_checkpoint(spec)[1]))

    def load_shard() -> LoadedModel:
        configure_cpu(threads)
        name, directory = resolve_checkpoint(spec)
        model = fuse_projections(load_sharded(directory, group, torch_dtype))
        options = int8_options(model)
        absorb_int8(model, options.kernels)
        absorb_int4(model, options.kernels)
        return LoadedModel(name, directory, model, TextTokenizer.from_directory(directory), group.device, torch_dtype, options)

    loaded = agree(group, load_shard)
    return loaded, gather_report(group, loaded.model, loaded.dtype)
