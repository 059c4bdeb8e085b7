"""Tensor and expert parallelism as a transform of a built :class:`DeepseekV2` (the model classes never know).

Shape legend: B batch, S new tokens, D hidden size, V vocabulary, N tokens (B * S), K experts per token,
W world size.

``parallelize(model, group)`` swaps modules for their sharded forms (slices from :class:`ShardPlan`):

* ``embed_tokens`` -> :class:`VocabParallelEmbedding` (own rows looked up, others zero, all-reduce);
* attention: ``q_proj``/``q_b_proj`` and ``kv_b_proj`` keep this rank's heads, ``o_proj`` becomes a
  :class:`RowParallelLinear` (all-reduce), ``num_heads`` is the local count. ``kv_a_proj_with_mqa`` stays
  whole: MLA's latent is shared by every head, so each rank computes and caches the full latent
  (``[c_KV | k_pe]``, 576 values per token and layer) and the latent cache is replicated, not split;
* dense MLP: ``gate_proj``/``up_proj`` keep rows, ``down_proj`` becomes a :class:`RowParallelLinear`;
* MoE: the router stays whole (every rank routes every token identically), ``experts`` becomes
  :class:`LocalExperts`, :class:`LocalInt8Experts` or :class:`LocalInt4Experts` (a contiguous block), the shared
  experts are split like the dense MLP without their own reduction, and one all-reduce (a forward hook, as gpt-fast
  does) sums routed and shared parts;
* ``lm_head`` -> :class:`GatheredHead` (own vocabulary rows, logits all-gathered so every rank samples
  from the same full distribution).

Experts are combined with an all-reduce rather than an all-to-all: every rank already holds every token
(attention is tensor-parallel, so activations are replicated), so a rank can run its experts on the tokens
routed to them and contribute zero for the rest. That costs the one ``[N, D]`` all-reduce the shared experts
need anyway; an all-to-all dispatch and combine is two collectives and only pays off when ranks hold
different tokens (data-parallel attention, large batches).

Float, int8 and int4 models alike (``dsv2cli/model/quantized.py``, ``int4.py``): a split ``Int8Linear`` stays an
``Int8Linear`` whose per-output-row scale is sliced with its rows, or kept whole when its input columns are split;
a split ``Int4Linear`` stays an ``Int4Linear`` whose packed rows and group scales are sliced together, its input
columns only on group boundaries (:class:`ShardPlan` gives the slices in stored units: bytes, groups).
Works on a meta-device model (shapes only, before sharded loading) and on a loaded one (slices copied).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from dsv2cli.errors import UnsupportedError
from dsv2cli.kernels import NO_KERNELS, Kernels
from dsv2cli.model import DeepseekV2
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.int4 import Int4Linear, Int4RoutedExperts, int4_linear
from dsv2cli.model.moe import MLP, MoE, RoutedExperts
from dsv2cli.model.quantized import Int8Linear, Int8RoutedExperts, int8_linear, int8_rows, row_amax
from dsv2cli.parallel.group import ParallelGroup, all_gather_last_dim, all_reduce_sum
from dsv2cli.parallel.plan import ShardPlan, Split


def _local(tensor: torch.Tensor, split: Split | None) -> torch.Tensor:
    """This rank's slice of ``tensor``: a copy, so the full tensor can be freed (meta stays meta; no split: itself).

    A float tensor comes back as a parameter (it was one); an int8 or packed int4 weight or a scale as a plain
    tensor (a buffer).
    """
    if split is None:
        local = tensor
    elif tensor.is_meta:
        shape = list(tensor.shape)
        shape[split.dim] = split.size
        local = torch.empty(shape, dtype=tensor.dtype, device="meta")
    else:
        local = tensor.detach()[split.index()].clone()
    if isinstance(tensor, nn.Parameter) and not isinstance(local, nn.Parameter):
        return nn.Parameter(local, requires_grad=tensor.requires_grad)
    return local


def _hold(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Register ``tensor`` on ``module``: a parameter as a parameter, an int8 or int4 weight or a scale as a buffer."""
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


_SPLIT_KINDS = "multi-process runs split float, int8 and int4 (dsv2 native) checkpoints"


def _weight_and_scale(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear's weight ``[O, I]`` and, for int8, its per-output-row scale ``[O]``, for int4 its packed weight
    ``[O, I / 2]`` and group scales ``[O, G]`` (None for a float one)."""
    if type(module) is nn.Linear and module.bias is None:
        return module.weight, None
    if type(module) in (Int8Linear, Int4Linear):
        return module.weight, module.scale
    raise UnsupportedError(
        f"cannot split {name}: it is a {type(module).__name__}, not a bias-free nn.Linear, an Int8Linear or an Int4Linear",
        hint=_SPLIT_KINDS,
    )


def _split(module: nn.Module, name: str, plan: ShardPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's slice of the linear ``name``: its weight and, if quantized, the scale that goes with it (:class:`ShardPlan`)."""
    weight, scale = _weight_and_scale(module, name)
    local_scale = None if scale is None else _local(scale, plan.split_for(f"{name}.scale"))
    return _local(weight, plan.split_for(f"{name}.weight")), local_scale


def _is_int4(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is packed int4 (uint8, two inputs a byte) rather than float or int8."""
    return weight.dtype == torch.uint8


def _product(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kernels: Kernels, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W^T`` for a float, int8 or packed int4 ``weight`` held by a sharded module (``amax`` as in ``int8_linear``)."""
    if scale is None:
        return F.linear(x, weight)
    if _is_int4(weight):
        return int4_linear(x, weight, scale, kernels, amax)
    return int8_linear(x, weight, scale, kernels, amax)


def _linear_module(weight: torch.Tensor, scale: torch.Tensor | None) -> nn.Module:
    """An ``nn.Linear`` (float), :class:`Int8Linear` or :class:`Int4Linear` holding ``weight`` (and ``scale``)."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        if scale is None:
            module: nn.Module = nn.Linear(in_features, out_features, bias=False)
        elif _is_int4(weight):
            inputs = 2 * in_features  # two a byte; the scale has one column per group
            module = Int4Linear(inputs, out_features, inputs // scale.shape[-1])
        else:
            module = Int8Linear(in_features, out_features)
    _hold(module, "weight", weight)
    if scale is not None:
        _hold(module, "scale", scale)
    return module


class RowParallelLinear(nn.Module):
    """A linear layer holding some input columns: ``y = all_reduce(x_local @ W_local^T)``.

    Float, int8 with the whole per-output-row scale (a row's scale multiplies every rank's partial sum
    alike), or packed int4 with the scales of this rank's groups of input columns. Rows that are quantized (on
    CPU, :func:`int8_rows`) take the step of the whole row, its largest ``|x|`` gathered from every rank (one
    ``[N, W]`` all-gather), so each rank's int8 values are those one process computes and the result differs
    from one process only in the order of the sums. ``reduce=False`` leaves the sum to the caller (the shared
    experts: the MoE's one all-reduce).
    """

    takes_kernels = True  # called with the forward's kernels (``model/options.py``)

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, group: ParallelGroup, reduce: bool = True) -> None:
        super().__init__()
        _hold(self, "weight", weight)  # [O, I / W]; int4: [O, I / W / 2] packed
        _hold(self, "scale", scale)  # [O] for int8, [O, G / W] for int4, else None
        self.group = group.process_group
        self.world_size = group.world_size
        self.reduce = reduce

    def forward(self, x: torch.Tensor, kernels: Kernels = NO_KERNELS) -> torch.Tensor:
        amax = None
        if self.scale is not None and int8_rows(x):
            shares = all_gather_last_dim(row_amax(x.reshape(-1, x.shape[-1])), self.group, self.world_size)  # [N, W]
            amax = shares.amax(dim=-1, keepdim=True)
        out = _product(x, self.weight, self.scale, kernels, amax)
        return all_reduce_sum(out, self.group) if self.reduce else out


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V/W)`` of the embedding; ids elsewhere look up zero, an all-reduce fills them in."""

    def __init__(self, weight: nn.Parameter, start: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = weight  # [V / W, D]
        self.start = start
        self.group = group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, S]`` -> ``[B, S, D]``."""
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce_sum(x.masked_fill(outside[..., None], 0), self.group)


class GatheredHead(nn.Module):
    """``lm_head`` rows for this rank's vocabulary (float, or int8 or int4 with their scales); the logits ``[B, S, V]`` are all-gathered."""

    takes_kernels = True

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor | None, group: dist.ProcessGroup | None, world_size: int
    ) -> None:
        super().__init__()
        _hold(self, "weight", weight)  # [V / W, D]
        _hold(self, "scale", scale)  # [V / W] for int8, [V / W, G] for int4, else None
        self.group = group
        self.world_size = world_size

    def forward(self, x: torch.Tensor, kernels: Kernels = NO_KERNELS) -> torch.Tensor:
        logits = _product(x, self.weight, self.scale, kernels)
        return all_gather_last_dim(logits, self.group, self.world_size)


def _local_ids(expert_ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Global expert ids ``[N, K]`` -> ids into the block ``[first, first + count)``; other ranks' experts become drops (-1)."""
    local = expert_ids - first
    return local.masked_fill((local < 0) | (local >= count), -1)


class _LocalBlock:
    """What the blocks of experts below share: ``forward`` takes global expert ids and runs this rank's
    ``[first, first + num_experts)`` through the stack's own forward (float, int8 or int4)."""

    first: int
    num_experts: int

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, kernels: Kernels = NO_KERNELS
    ) -> torch.Tensor:
        """x ``[N, D]``, global expert_ids/weights ``[N, K]`` -> this rank's share of the weighted sum ``[N, D]``."""
        return super().forward(x, _local_ids(expert_ids, self.first, self.num_experts), weights, kernels)  # type: ignore[misc]


class LocalExperts(_LocalBlock, RoutedExperts):
    """Routed experts ``[first, first + E/W)`` of a layer, stacked like :class:`RoutedExperts`.

    Assignments to other ranks' experts are turned into drops (id -1), so they contribute zero here;
    the MoE's all-reduce adds what the owning rank computed.
    """

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, first: int) -> None:
        nn.Module.__init__(self)  # the parent's __init__ would allocate all E experts
        self.num_experts = gate_up_proj.shape[0]
        self.first = first
        self.gate_up_proj = gate_up_proj  # [E / W, 2I, D]
        self.down_proj = down_proj  # [E / W, D, I]


# A quantized stack's tensors, int8 or int4: each split by experts (dim 0)
_EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale")


class _LocalQuantizedBlock(_LocalBlock):
    """A block of whole quantized experts (int8 or int4), its :data:`_EXPERT_TENSORS` as one rank's parts of them.

    Each expert is whole on its rank, so its products (and, on CPU, the quantized token) are exactly one
    process's.
    """

    def __init__(self, parts: dict[str, torch.Tensor], first: int) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]  # the stack's __init__ would allocate all E experts
        self.num_experts = parts["gate_up_proj"].shape[0]
        self.first = first
        for name in _EXPERT_TENSORS:
            self.register_buffer(name, parts[name])  # type: ignore[attr-defined]


class LocalInt8Experts(_LocalQuantizedBlock, Int8RoutedExperts):
    """:class:`LocalExperts` for int8 experts: ``[E / W, 2I, D]``, ``[E / W, 2I]``, ``[E / W, D, I]``, ``[E / W, D]``
    with their per-row scales."""


class LocalInt4Experts(_LocalQuantizedBlock, Int4RoutedExperts):
    """:class:`LocalExperts` for int4 experts: packed rows with their group scales, ``[E / W, 2M, D / 2]``,
    ``[E / W, 2M, D / g]``, ``[E / W, D, M / 2]``, ``[E / W, D, M / g]``."""

    def __init__(self, parts: dict[str, torch.Tensor], first: int) -> None:
        super().__init__(parts, first)
        self.group_size = 2 * parts["gate_up_proj"].shape[-1] // parts["gate_up_proj_scale"].shape[-1]


def _all_reduce_output(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(output, module.parallel_group)  # type: ignore[arg-type]


def _split_attention(attn: MultiHeadLatentAttention, prefix: str, plan: ShardPlan, group: ParallelGroup) -> None:
    q_name = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
    for name in (q_name, "kv_b_proj"):
        setattr(attn, name, _linear_module(*_split(getattr(attn, name), prefix + name, plan)))
    attn.o_proj = RowParallelLinear(*_split(attn.o_proj, prefix + "o_proj", plan), group)
    first, stop = plan.heads
    attn.num_heads = stop - first


def _split_mlp(mlp: MLP, prefix: str, plan: ShardPlan, group: ParallelGroup, reduce: bool) -> None:
    for name in ("gate_proj", "up_proj"):
        setattr(mlp, name, _linear_module(*_split(getattr(mlp, name), prefix + name, plan)))
    # the shared experts (reduce=False) are summed by the MoE's one all-reduce, with the routed experts
    mlp.down_proj = RowParallelLinear(*_split(mlp.down_proj, prefix + "down_proj", plan), group, reduce)  # type: ignore[assignment]


def _split_moe(moe: MoE, prefix: str, plan: ShardPlan, group: ParallelGroup) -> None:
    experts = moe.experts
    split = plan.split_for(f"{prefix}experts.gate_up_proj")
    assert split is not None
    if type(experts) is RoutedExperts:
        moe.experts = LocalExperts(_local(experts.gate_up_proj, split), _local(experts.down_proj, split), split.start)
    elif type(experts) in (Int8RoutedExperts, Int4RoutedExperts):
        local = LocalInt8Experts if type(experts) is Int8RoutedExperts else LocalInt4Experts
        moe.experts = local({name: _local(getattr(experts, name), split) for name in _EXPERT_TENSORS}, split.start)
    else:
        raise UnsupportedError(f"cannot split {prefix}experts: it is a {type(experts).__name__}", hint=_SPLIT_KINDS)
    if moe.shared_experts is not None:
        _split_mlp(moe.shared_experts, f"{prefix}shared_experts.", plan, group, reduce=False)
    moe.parallel_group = group.process_group
    moe.register_forward_hook(_all_reduce_output)


def int4_group_size(model: nn.Module) -> int | None:
    """The group size of ``model``'s int4 modules (one per checkpoint), or None when it has none."""
    return next((m.group_size for m in model.modules() if isinstance(m, (Int4Linear, Int4RoutedExperts))), None)


def parallelize(model: DeepseekV2, group: ParallelGroup) -> DeepseekV2:
    """Shard ``model`` in place for rank ``group.rank`` of ``group.world_size``; returns it.

    Every rank then runs the same forward on the same tokens and gets the same full logits.
    """
    if getattr(model, "parallel_world_size", None) is not None:
        raise UnsupportedError("this model is already split across ranks")
    plan = ShardPlan(model.config, group.rank, group.world_size, int4_group_size(model))
    embed = model.embed_tokens
    model.embed_tokens = VocabParallelEmbedding(  # type: ignore[assignment]
        _local(embed.weight, plan.split_for("embed_tokens.weight")), plan.vocab[0], group.process_group
    )
    for index, block in enumerate(model.layers):
        prefix = f"layers.{index}."
        _split_attention(block.self_attn, prefix + "self_attn.", plan, group)
        if isinstance(block.mlp, MoE):
            _split_moe(block.mlp, prefix + "mlp.", plan, group)
        else:
            _split_mlp(block.mlp, prefix + "mlp.", plan, group, reduce=True)
    if model.config.tie_word_embeddings:
        head: tuple[torch.Tensor, torch.Tensor | None] = (model.embed_tokens.weight, None)
    else:
        head = _split(model.lm_head, "lm_head", plan)
    model.lm_head = GatheredHead(*head, group.process_group, group.world_size)  # type: ignore[assignment]
    model.parallel_world_size = group.world_size
    return model
