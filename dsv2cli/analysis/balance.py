"""DeepSeek-V2's balance quantities (spec §5, paper §2.2.3) as pure, differentiable torch functions.

Shape legend: T tokens of one reduction (a sequence, or a whole flattened batch), E routed experts,
K assignments per token, D devices (contiguous expert groups of ``E / D`` experts), M the most devices
a token may reach. Leading dimensions ``...`` are kept: pass ``scores [B, S, E]`` to get one value
per sequence (the paper's per-sequence form, HF ``seq_aux=True``), or ``[N, E]`` for one value over
the whole batch (``seq_aux=False``).

Each ``*_balance`` returns ``Σ f·P`` without its α; it is 1.0 when the load is perfectly uniform
and grows with imbalance (at most E, D and D/M respectively). ``f`` is a count (no gradient);
``P`` is a mean of the softmax affinities ``scores`` and carries the gradient, as in the paper.
Expert id -1 marks a dropped assignment: it counts nowhere.
"""

from __future__ import annotations

import torch


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How often each expert was chosen: ``expert_ids [..., T, K]`` -> float32 ``[..., E]`` (-1 ignored)."""
    valid = expert_ids >= 0
    counts = torch.zeros(*expert_ids.shape[:-2], num_experts, dtype=torch.float32, device=expert_ids.device)
    flat_ids = expert_ids.clamp(min=0).flatten(-2)  # [..., T*K]
    return counts.scatter_add_(-1, flat_ids, valid.flatten(-2).float())


def device_of_expert(expert_ids: torch.Tensor, num_experts: int, num_devices: int) -> torch.Tensor:
    """Device holding each expert (contiguous groups; -1 stays -1)."""
    _check_devices(num_experts, num_devices)
    per_device = num_experts // num_devices
    return torch.where(expert_ids >= 0, torch.div(expert_ids, per_device, rounding_mode="floor"), expert_ids)


def tokens_per_device(expert_ids: torch.Tensor, num_experts: int, num_devices: int) -> torch.Tensor:
    """How many tokens are sent to each device (a token counts once per device it reaches): ``[..., D]``."""
    devices = device_of_expert(expert_ids, num_experts, num_devices)  # [..., T, K]
    one_hot = torch.nn.functional.one_hot(devices.clamp(min=0), num_devices).bool() & (devices >= 0)[..., None]  # [..., T, K, D]
    reached = one_hot.any(dim=-2)  # [..., T, D]
    return reached.float().sum(dim=-2)


def expert_balance(scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert-level ``Σ_i f_i P_i`` with ``f_i = E/(K T) · count_i`` and ``P_i = mean_t s_{i,t}`` (paper eq. 23–25)."""
    tokens, num_experts = scores.shape[-2], scores.shape[-1]
    top_k = expert_ids.shape[-1]
    f = expert_counts(expert_ids, num_experts) * (num_experts / (top_k * tokens))  # [..., E]
    p = scores.float().mean(dim=-2)  # [..., E]
    return (f * p).sum(dim=-1)


def device_balance(scores: torch.Tensor, expert_ids: torch.Tensor, num_devices: int) -> torch.Tensor:
    """Device-level ``Σ_d f'_d P'_d``: ``f'_d`` = mean of the experts' ``f`` on device d, ``P'_d`` = sum of their ``P`` (eq. 26–28)."""
    tokens, num_experts = scores.shape[-2], scores.shape[-1]
    top_k = expert_ids.shape[-1]
    _check_devices(num_experts, num_devices)
    f = expert_counts(expert_ids, num_experts) * (num_experts / (top_k * tokens))
    p = scores.float().mean(dim=-2)
    grouped = (*f.shape[:-1], num_devices, num_experts // num_devices)
    return (f.view(grouped).mean(dim=-1) * p.view(grouped).sum(dim=-1)).sum(dim=-1)


def communication_balance(scores: torch.Tensor, expert_ids: torch.Tensor, num_devices: int, max_devices: int) -> torch.Tensor:
    """Communication ``Σ_d f''_d P''_d``: ``f''_d = D/(M T) · tokens sent to d``, ``P''_d`` = sum of its experts' ``P`` (eq. 29–31)."""
    tokens, num_experts = scores.shape[-2], scores.shape[-1]
    if not 1 <= max_devices <= num_devices:
        raise ValueError(f"max_devices={max_devices} must be between 1 and num_devices={num_devices}")
    f = tokens_per_device(expert_ids, num_experts, num_devices) * (num_devices / (max_devices * tokens))  # [..., D]
    p = scores.float().mean(dim=-2).view(*scores.shape[:-2], num_devices, num_experts // num_devices).sum(dim=-1)
    return (f * p).sum(dim=-1)


def max_over_mean(load: torch.Tensor) -> torch.Tensor:
    """``max / mean`` of a load vector ``[..., X]`` (1.0 = balanced; the vLLM/SGLang balancedness is its inverse)."""
    load = load.float()
    return load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-12)


def coefficient_of_variation(load: torch.Tensor) -> torch.Tensor:
    """Population ``std / mean`` of a load vector ``[..., X]`` (0.0 = balanced)."""
    load = load.float()
    return load.std(dim=-1, correction=0) / load.mean(dim=-1).clamp_min(1e-12)


def _check_devices(num_experts: int, num_devices: int) -> None:
    if num_devices < 1 or num_experts % num_devices:
        raise ValueError(f"{num_experts} experts cannot be split into {num_devices} equal device groups")
