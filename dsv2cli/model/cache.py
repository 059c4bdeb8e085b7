"""The latent KV cache of MLA (spec §3.3).

Per layer, per sequence and per slot it stores one vector ``[c_KV (C) | k_pe (R)]``:
the normalised latent and the rotated rope key, 576 values for every released
DeepSeek-V2 model. Nothing per head is ever stored.

Rows of a batch may hold prompts of different lengths: they are left-padded, so
all rows write the same slot at each step; ``pad[b]`` slots at the start of row ``b``
are never attended to and positions of row ``b`` start at slot ``pad[b]``.
"""

from __future__ import annotations

import torch

from dsv2cli.config import ModelConfig


class LatentKVCache:
    """Preallocated ``[L, B, capacity, C + R]`` latent cache sized to what the caller asks for."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        capacity: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | list[int] | None = None,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.capacity = capacity
        self.entries = torch.zeros(num_layers, batch_size, capacity, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        pad_tensor = torch.zeros(batch_size, dtype=torch.long) if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.pad = pad_tensor.to(device)
        self.length = 0

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | list[int] | None = None,
    ) -> LatentKVCache:
        return cls(
            config.num_hidden_layers, batch_size, capacity, config.kv_lora_rank, config.qk_rope_head_dim, dtype, device, pad
        )

    @property
    def batch_size(self) -> int:
        return self.entries.shape[1]

    @property
    def has_padding(self) -> bool:
        return bool((self.pad > 0).any())

    def nbytes(self) -> int:
        """Bytes held by the cache tensor (what was allocated, not what is filled)."""
        return self.entries.numel() * self.entries.element_size()

    def bytes_per_token(self) -> int:
        """Bytes of one token across all layers: ``L * (C + R) * element size``."""
        return self.entries.shape[0] * self.entries.shape[3] * self.entries.element_size()

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Rope positions ``[B, S]`` of the next ``new_tokens`` slots (pad slots get 0)."""
        slots = torch.arange(self.length, self.length + new_tokens, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def attention_mask(self, new_tokens: int) -> torch.Tensor:
        """Boolean ``[B, S, T]`` (True = attend) for the next ``new_tokens`` queries over ``T = length + S`` slots.

        A query sees the non-pad slots up to its own; a pad slot sees only itself, so its
        softmax stays finite.
        """
        total = self.length + new_tokens
        query = torch.arange(self.length, total, device=self.pad.device)[:, None]
        key = torch.arange(total, device=self.pad.device)[None, :]
        causal = key <= query
        not_pad = key[None] >= self.pad[:, None, None]
        return (causal[None] & not_pad) | (key == query)[None]

    def write(self, layer_idx: int, entries: torch.Tensor) -> torch.Tensor:
        """Store ``entries [B, S, C + R]`` at the next slots; return all filled slots ``[B, length + S, C + R]``."""
        self.check_room(entries.shape[1])
        end = self.length + entries.shape[1]
        self.entries[layer_idx, :, self.length : end] = entries
        return self.entries[layer_idx, :, :end]

    def check_room(self, new_tokens: int) -> None:
        """Raise unless ``new_tokens`` more slots fit in the capacity."""
        if self.length + new_tokens > self.capacity:
            raise ValueError(f"cache holds {self.capacity} tokens; {self.length + new_tokens} were asked for")

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` slots as filled (called once per forward, after every layer wrote)."""
        self.length += new_tokens

    def reset(self, pad: torch.Tensor | list[int] | None = None) -> None:
        self.length = 0
        if pad is not None:
            self.pad = torch.as_tensor(pad, dtype=torch.long, device=self.pad.device)
        else:
            self.pad.zero_()
