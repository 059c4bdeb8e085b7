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
  :class:`LocalExperts` (a contiguous block), the shared experts are split like the dense MLP without their
  own reduction, and one all-reduce (a forward hook, as gpt-fast does) sums routed and shared parts;
* ``lm_head`` -> :class:`GatheredHead` (own vocabulary rows, logits all-gathered so every rank samples
  from the same full distribution).

Experts are combined with an all-reduce rather than an all-to-all: every rank already holds every token
(attention is tensor-parallel, so activations are replicated), so a rank can run its experts on the tokens
routed to them and contribute zero for the rest. That costs the one ``[N, D]`` all-reduce the shared experts
need anyway; an all-to-all dispatch and combine is two collectives and only pays off when ranks hold
different tokens (data-parallel attention, large batches).

Works on a meta-device model (shapes only, before sharded loading) and on a loaded one (slices copied).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from dsv2cli.errors import UnsupportedError
from dsv2cli.model import DeepseekV2
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.moe import MLP, MoE, RoutedExperts
from dsv2cli.parallel.group import ParallelGroup, all_gather_last_dim, all_reduce_sum
from dsv2cli.parallel.plan import ShardPlan, Split


def _local(param: torch.Tensor, split: Split | None) -> nn.Parameter:
    """This rank's slice as a new parameter (a copy, so the full tensor can be freed; meta stays meta)."""
    if split is None:
        return param if isinstance(param, nn.Parameter) else nn.Parameter(param, requires_grad=False)
    if param.is_meta:
        shape = list(param.shape)
        shape[split.dim] = split.size
        return nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"), requires_grad=param.requires_grad)
    return nn.Parameter(param.detach()[split.index()].clone(), requires_grad=param.requires_grad)


def _plain_linear(module: nn.Module, name: str) -> nn.Linear:
    if type(module) is not nn.Linear or module.bias is not None:
        raise UnsupportedError(
            f"cannot split {name}: it is a {type(module).__name__}, not a float nn.Linear without bias",
            hint="multi-process runs need float weights; load the checkpoint without quantization",
        )
    return module


def _narrowed(linear: nn.Linear, weight: nn.Parameter) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (its shape sets the features)."""
    with torch.device("meta"):
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    out.weight = weight
    return out


class RowParallelLinear(nn.Module):
    """A linear layer holding some input columns: ``y = all_reduce(x_local @ W_local^T)``."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = weight  # [O, I / W]
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(F.linear(x, self.weight), self.group)


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
    """``lm_head`` rows for this rank's vocabulary; the logits ``[B, S, V]`` are all-gathered."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup | None, world_size: int) -> None:
        super().__init__()
        self.weight = weight  # [V / W, D]
        self.group = group
        self.world_size = world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.linear(x, self.weight), self.group, self.world_size)


class LocalExperts(RoutedExperts):
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

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x ``[N, D]``, global expert_ids/weights ``[N, K]`` -> this rank's share of the weighted sum ``[N, D]``."""
        local = expert_ids - self.first
        local = local.masked_fill((local < 0) | (local >= self.num_experts), -1)
        return super().forward(x, local, weights)


def _all_reduce_output(module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(output, module.parallel_group)  # type: ignore[arg-type]


def _split_attention(attn: MultiHeadLatentAttention, prefix: str, plan: ShardPlan, group: ParallelGroup) -> None:
    q_name = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
    for name in (q_name, "kv_b_proj"):
        linear = _plain_linear(getattr(attn, name), prefix + name)
        setattr(attn, name, _narrowed(linear, _local(linear.weight, plan.split_for(f"{prefix}{name}.weight"))))
    o_proj = _plain_linear(attn.o_proj, prefix + "o_proj")
    attn.o_proj = RowParallelLinear(_local(o_proj.weight, plan.split_for(f"{prefix}o_proj.weight")), group.process_group)
    first, stop = plan.heads
    attn.num_heads = stop - first


def _split_mlp(mlp: MLP, prefix: str, plan: ShardPlan, group: ParallelGroup, reduce: bool) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        linear = _plain_linear(getattr(mlp, name), prefix + name)
        weight = _local(linear.weight, plan.split_for(f"{prefix}{name}.weight"))
        if name == "down_proj" and reduce:
            mlp.down_proj = RowParallelLinear(weight, group.process_group)  # type: ignore[assignment]
        else:
            setattr(mlp, name, _narrowed(linear, weight))


def _split_moe(moe: MoE, prefix: str, plan: ShardPlan, group: ParallelGroup) -> None:
    experts = moe.experts
    if type(experts) is not RoutedExperts:
        raise UnsupportedError(
            f"cannot split {prefix}experts: it is a {type(experts).__name__}",
            hint="multi-process runs need float weights; load the checkpoint without quantization",
        )
    split = plan.split_for(f"{prefix}experts.gate_up_proj")
    assert split is not None
    moe.experts = LocalExperts(_local(experts.gate_up_proj, split), _local(experts.down_proj, split), split.start)
    if moe.shared_experts is not None:
        _split_mlp(moe.shared_experts, f"{prefix}shared_experts.", plan, group, reduce=False)
    moe.parallel_group = group.process_group
    moe.register_forward_hook(_all_reduce_output)


def parallelize(model: DeepseekV2, group: ParallelGroup) -> DeepseekV2:
    """Shard ``model`` in place for rank ``group.rank`` of ``group.world_size``; returns it.

    Every rank then runs the same forward on the same tokens and gets the same full logits.
    """
    if getattr(model, "parallel_world_size", None) is not None:
        raise UnsupportedError("this model is already split across ranks")
    plan = ShardPlan(model.config, group.rank, group.world_size)
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
        head_weight = model.embed_tokens.weight
    else:
        head_weight = _local(_plain_linear(model.lm_head, "lm_head").weight, plan.split_for("lm_head.weight"))
    model.lm_head = GatheredHead(head_weight, group.process_group, group.world_size)  # type: ignore[assignment]
    model.parallel_world_size = group.world_size
    return model
