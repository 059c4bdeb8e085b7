"""Which slice of every parameter a rank holds: the one table shared by the transform and the sharded loader.

The split is the one DeepSeek's reference uses (spec §8.1), applied to dsv2's parameter names:

| parameters | split | why |
|---|---|---|
| ``embed_tokens``, ``lm_head`` | rows (vocabulary) | vocab-parallel lookup + all-reduce; logits all-gathered |
| ``q_proj`` / ``q_b_proj``, ``kv_b_proj`` | rows, whole heads | each rank attends with its own heads |
| ``o_proj`` | columns, whole heads | partial outputs, summed by an all-reduce |
| dense ``gate_proj``/``up_proj``, shared experts' too | rows | column-parallel SwiGLU |
| dense ``down_proj``, shared experts' too | columns | row-parallel, summed by an all-reduce |
| routed ``experts.gate_up_proj`` / ``down_proj`` | experts (dim 0) | expert parallelism: a contiguous block per rank |
| norms, ``q_a_proj``, ``kv_a_proj_with_mqa``, router ``gate`` | replicated | small, and the latent is shared by all heads |

An int8 weight's scale (``<module>.scale [O]``, experts' ``gate_up_proj_scale [E, 2I]`` / ``down_proj_scale
[E, D]``: one per output row) follows its weight: a split of the rows or experts slices it too, a split of
the input columns (``o_proj``, ``down_proj``) leaves every rank the whole scale.

An int4 checkpoint (``model/int4.py``; the plan's ``group_size`` is its) stores ``weight [..., O, I / 2]`` packed
two inputs a byte and ``scale [..., O, I / group_size]``: rows and experts split as above (the scale with them);
a split of the input columns is a slice of the packed bytes (half as many) and of the scale's groups, so each
rank's input columns must be whole groups (and so whole 32-input packed blocks) -- :meth:`ShardPlan.check`
names the first tensor whose columns are not.

Every split must be even; :meth:`ShardPlan.check` names the first size that does not divide.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dsv2cli.config import ModelConfig
from dsv2cli.errors import UnsupportedError
from dsv2cli.model.int4 import BLOCK, GROUP_SIZES


@dataclass(frozen=True)
class Split:
    """Elements ``[start, stop)`` of dimension ``dim`` of the full tensor."""

    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def index(self) -> tuple[slice, ...]:
        """An index selecting this split (for ``tensor[...]`` and safetensors ``get_slice``)."""
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


# (pattern on the dsv2 parameter name, split dimension, what the dimension counts)
_RULES: tuple[tuple[re.Pattern[str], int, str], ...] = (
    (re.compile(r"^(embed_tokens|lm_head)\.weight$"), 0, "vocab"),
    (re.compile(r"\.self_attn\.(q_proj|q_b_proj)\.weight$"), 0, "q_heads"),
    (re.compile(r"\.self_attn\.kv_b_proj\.weight$"), 0, "kv_heads"),
    (re.compile(r"\.self_attn\.o_proj\.weight$"), 1, "o_heads"),
    (re.compile(r"\.mlp\.shared_experts\.(gate_proj|up_proj)\.weight$"), 0, "shared"),
    (re.compile(r"\.mlp\.shared_experts\.down_proj\.weight$"), 1, "shared"),
    (re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$"), 0, "experts"),
    (re.compile(r"\.mlp\.(gate_proj|up_proj)\.weight$"), 0, "dense"),
    (re.compile(r"\.mlp\.down_proj\.weight$"), 1, "dense"),
)

_SCALE = re.compile(r"^(.*)(\.scale|_scale)$")


def _scaled_weight(name: str) -> str | None:
    """The weight an int8 or int4 scale belongs to (``o_proj.scale`` -> ``o_proj.weight``, ``experts.down_proj_scale`` ->
    ``experts.down_proj``), or None when ``name`` is not a scale."""
    match = _SCALE.match(name)
    if match is None:
        return None
    return match.group(1) + (".weight" if match.group(2) == ".scale" else "")


@dataclass(frozen=True)
class ShardPlan:
    """The slices rank ``rank`` of ``world_size`` holds for ``config``; ``group_size``: an int4 checkpoint's (None otherwise)."""

    config: ModelConfig
    rank: int
    world_size: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        self.check(self.config, self.world_size, self.group_size)

    @staticmethod
    def divided_sizes(config: ModelConfig) -> dict[str, int]:
        """Every size the plan divides by the world size, by config field."""
        sizes = {"vocab_size": config.vocab_size, "num_attention_heads": config.num_attention_heads}
        if config.moe_layer_indices:
            sizes["n_routed_experts"] = config.n_routed_experts or 0
            if config.shared_intermediate_size:
                sizes["moe_intermediate_size * n_shared_experts"] = config.shared_intermediate_size
        if len(config.moe_layer_indices) < config.num_hidden_layers:
            sizes["intermediate_size"] = config.intermediate_size
        return sizes

    @staticmethod
    def input_columns(config: ModelConfig) -> dict[str, int]:
        """The input width of the first tensor of each kind whose input columns are split (row-parallel), by name."""
        columns = {"layers.0.self_attn.o_proj.weight": config.num_attention_heads * config.v_head_dim}
        dense = [i for i in range(config.num_hidden_layers) if i not in config.moe_layer_indices]
        if dense:
            columns[f"layers.{dense[0]}.mlp.down_proj.weight"] = config.intermediate_size
        if config.moe_layer_indices and config.shared_intermediate_size:
            name = f"layers.{config.moe_layer_indices[0]}.mlp.shared_experts.down_proj.weight"
            columns[name] = config.shared_intermediate_size
        return columns

    @classmethod
    def world_sizes(cls, config: ModelConfig, limit: int = 64, group_size: int | None = None) -> list[int]:
        """World sizes up to ``limit`` that split this model evenly (and, for int4 groups of ``group_size``, on group boundaries)."""
        common = math.gcd(*cls.divided_sizes(config).values())
        sizes = [n for n in range(1, limit + 1) if common % n == 0]
        if group_size is None:
            return sizes
        columns = cls.input_columns(config).values()
        return [n for n in sizes if all(width // n % group_size == 0 for width in columns)]

    @classmethod
    def check(cls, config: ModelConfig, world_size: int, group_size: int | None = None) -> None:
        if world_size < 1:
            raise UnsupportedError(f"world size must be at least 1, got {world_size}")
        for field_name, size in cls.divided_sizes(config).items():
            if size % world_size:
                sizes = ", ".join(map(str, cls.world_sizes(config)))
                raise UnsupportedError(
                    f"cannot split {field_name} = {size} evenly across {world_size} ranks",
                    hint=f"world sizes that split this model evenly: {sizes}",
                )
        if group_size is None:
            return
        for name, width in cls.input_columns(config).items():
            share = width // world_size
            if share % group_size:
                blocks = "" if share % BLOCK == 0 else f" (nor of {BLOCK}-input packed blocks)"
                sizes = ", ".join(map(str, cls.world_sizes(config, group_size=group_size)))
                smaller = [g for g in GROUP_SIZES if g < group_size and world_size in cls.world_sizes(config, world_size, g)]
                regroup = f", or convert the float source again with `group_size` = {smaller[0]}" if smaller else ""
                raise UnsupportedError(
                    f"cannot split the int4 weight {name} across {world_size} ranks: each rank would hold {share} of its "
                    f"{width} input columns, not a whole number of groups of {group_size}{blocks}",
                    hint=f"world sizes that split this int4 checkpoint on group boundaries: {sizes}{regroup}",
                )

    def _range(self, total: int) -> tuple[int, int]:
        per_rank = total // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    @property
    def heads(self) -> tuple[int, int]:
        """This rank's attention heads ``[first, stop)``."""
        return self._range(self.config.num_attention_heads)

    @property
    def experts(self) -> tuple[int, int]:
        """This rank's routed experts ``[first, stop)`` (a contiguous block, as in DeepSeek's reference)."""
        return self._range(self.config.n_routed_experts or 0)

    @property
    def vocab(self) -> tuple[int, int]:
        """This rank's vocabulary rows ``[first, stop)``."""
        return self._range(self.config.vocab_size)

    def _unit_range(self, kind: str) -> tuple[int, int]:
        c = self.config
        first, stop = self.heads
        per_head = {"q_heads": c.qk_head_dim, "kv_heads": c.qk_nope_head_dim + c.v_head_dim, "o_heads": c.v_head_dim}
        if kind in per_head:
            return first * per_head[kind], stop * per_head[kind]
        if kind == "vocab":
            return self.vocab
        if kind == "experts":
            return self.experts
        if kind == "shared":
            return self._range(c.shared_intermediate_size)
        return self._range(c.intermediate_size)

    def split_for(self, name: str) -> Split | None:
        """The slice of the dsv2 tensor ``name`` this rank holds, or None when every rank holds all of it.

        In stored units: an int4 weight's input columns as packed bytes, its scale's as groups.
        """
        weight = _scaled_weight(name)
        split = self._element_split(weight or name)
        if split is None:
            return None
        input_dim = 1 if (weight or name).endswith(".weight") else 2  # linears [O, I], stacked experts [E, O, I]
        if split.dim < input_dim:
            return split  # rows or experts: a scale is split with its weight's rows
        if self.group_size is None:
            return None if weight is not None else split  # an int8 scale is per row: every rank holds it whole
        per = self.group_size if weight is not None else 2  # a scale's groups, or packed bytes (two inputs each)
        return Split(split.dim, split.start // per, split.stop // per)

    def _element_split(self, name: str) -> Split | None:
        """The slice of the (unpacked) parameter ``name`` by :data:`_RULES`, in elements."""
        for pattern, dim, kind in _RULES:
            if pattern.search(name):
                return Split(dim, *self._unit_range(kind))
        return None

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        split = self.split_for(name)
        if split is None:
            return tuple(shape)
        return tuple(split.size if d == split.dim else n for d, n in enumerate(shape))
