"""The latent KV cache of MLA (spec §3.3).

Per layer, per sequence and per slot it stores one vector ``[c_KV (C) | k_pe (R)]``:
the normalised latent and the rotated rope key, 576 values for every released
DeepSeek-V2 model. Nothing per head is ever stored.

Rows of a batch may hold prompts of different lengths: they are left-padded, so
all rows write the same slot at each step; ``pad[b]`` slots at the start of row ``b``
are never attended to and positions of row ``b`` start at slot ``pad[b]``.

A forward reads and writes the cache in one of two ways (:meth:`LatentKVCache.layer_views`):

* dynamic shapes (prefills, eager steps): it writes the next slots and attends over the filled ones;
* static shapes (compiled decode steps): the slot written is a tensor (:attr:`LatentKVCache.next_slot`)
  and attention reads the whole capacity under a mask, so every step has the same shapes and a compiled
  graph serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2cli.config import ModelConfig
from dsv2cli.model.dtypes import cast


@dataclass(frozen=True)
class LayerKV:
    """One layer's part of the cache, as one forward writes and reads it.

    ``entries [B, T, C + R]`` is the layer's whole cache. Dynamic shapes: the forward writes slots
    ``start..start+S-1`` and attends over slots ``0..start+S-1``. Static shapes: it writes ``slots``
    (``[S]`` int64) and attends over all T slots under the forward's mask. ``bounds [B, 2]`` (int64):
    each row's first attended slot (after its padding) and the number of slots filled after the write,
    for one-token steps through the attention kernel.
    """

    entries: torch.Tensor
    start: int
    bounds: torch.Tensor
    slots: torch.Tensor | None = None

    def write(self, new: torch.Tensor) -> torch.Tensor:
        """Store ``new [B, S, C + R]``; return the slots attention reads ``[B, T', C + R]``."""
        new = cast(new, self.entries.dtype)
        if self.slots is not None:
            self.entries.index_copy_(1, self.slots, new)
            return self.entries
        end = self.start + new.shape[1]
        self.entries[:, self.start : end] = new
        return self.entries[:, :end]


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
        self.next_slot = torch.zeros(1, dtype=torch.long, device=device)  # ``length`` as a tensor, for static shapes

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

    def _new_slots(self, new_tokens: int, static: bool) -> torch.Tensor:
        """The slots ``[S]`` of the next ``new_tokens`` tokens: from :attr:`next_slot` with static shapes."""
        offsets = torch.arange(new_tokens, device=self.pad.device)
        return self.next_slot + offsets if static else offsets + self.length

    def positions(self, new_tokens: int, static: bool = False) -> torch.Tensor:
        """Rope positions ``[B, S]`` of the next ``new_tokens`` slots (pad slots get 0)."""
        return (self._new_slots(new_tokens, static)[None, :] - self.pad[:, None]).clamp(min=0)

    def attention_mask(self, new_tokens: int, static: bool = False) -> torch.Tensor:
        """Boolean ``[B, S, T]`` (True = attend) for the next ``new_tokens`` queries.

        ``T = length + S`` slots; with static shapes, the whole capacity. A query sees the non-pad
        slots up to its own; a pad slot sees only itself, so its softmax stays finite.
        """
        query = self._new_slots(new_tokens, static)[:, None]
        key = torch.arange(self.capacity if static else self.length + new_tokens, device=self.pad.device)[None, :]
        causal = key <= query
        not_pad = key[None] >= self.pad[:, None, None]
        return (causal[None] & not_pad) | (key == query)[None]

    def layer_views(self, new_tokens: int, static: bool = False) -> list[LayerKV]:
        """Each layer's :class:`LayerKV` for a forward of ``new_tokens`` tokens.

        Dynamic shapes check that the tokens fit; static shapes read no Python state that changes from step
        to step (the caller checks the room and advances the cache), so one compiled graph serves every step.
        """
        if static:
            end, start = self.next_slot + new_tokens, 0
        else:
            self.check_room(new_tokens)
            end, start = torch.full_like(self.next_slot, self.length + new_tokens), self.length
        bounds = torch.stack((self.pad, end.expand_as(self.pad)), dim=-1)  # [B, 2]
        slots = self._new_slots(new_tokens, static) if static else None
        return [LayerKV(self.entries[i], start, bounds, slots) for i in range(self.entries.shape[0])]

    def check_room(self, new_tokens: int) -> None:
        """Raise unless ``new_tokens`` more slots fit in the capacity."""
        if self.length + new_tokens > self.capacity:
            raise ValueError(f"cache holds {self.capacity} tokens; {self.length + new_tokens} were asked for")

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` slots as filled (called once per forward, after every layer wrote)."""
        self.length += new_tokens
        self.next_slot.fill_(self.length)

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (they are written again by the next forward)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        self.next_slot.fill_(length)

    def reset(self, pad: torch.Tensor | list[int] | None = None) -> None:
        self.length = 0
        self.next_slot.zero_()
        if pad is not None:
            self.pad = torch.as_tensor(pad, dtype=torch.long, device=self.pad.device)
        else:
            self.pad.zero_()
