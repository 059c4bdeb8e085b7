"""Latent entries of earlier prompts, kept by blocks of tokens for prompts that start the same way.

Shape legend: L layers, K tokens, C + R one latent entry.

MLA caches one ``C + R`` vector (576 values) per token and layer, so a prefix's entries are small and
independent of the heads: a block of :data:`BLOCK_TOKENS` tokens is kept under the whole token sequence up to
its end (a block is only valid after the same earlier tokens). A lookup takes the longest run of stored blocks
that a new prompt starts with; the prompt's prefill then starts after them. Blocks are evicted least recently
used first within ``max_bytes``; a hit touches a prefix's blocks from the last to the first, so a prefix's
first blocks (shared by more prompts) are evicted after its later ones.
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock

import torch

BLOCK_TOKENS = 16


class PrefixCache:
    """LRU blocks of latent entries ``[L, BLOCK_TOKENS, C + R]``, keyed by the tokens up to each block's end."""

    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.blocks: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.lookups = 0
        self.hit_tokens = 0
        self.lock = Lock()  # the scheduler writes; /metrics reads

    def lookup(self, tokens: list[int]) -> torch.Tensor | None:
        """Entries ``[L, K, C + R]`` of the longest stored prefix of ``tokens`` that leaves at least one token to run."""
        with self.lock:
            self.lookups += 1
            found: list[tuple[tuple[int, ...], torch.Tensor]] = []
            end = self.block_tokens
            while end < len(tokens):
                key = tuple(tokens[:end])
                block = self.blocks.get(key)
                if block is None:
                    break
                found.append((key, block))
                end += self.block_tokens
            if not found:
                return None
            for key, _ in reversed(found):
                self.blocks.move_to_end(key)
            self.hit_tokens += len(found) * self.block_tokens
            return torch.cat([block for _, block in found], dim=1)

    def insert(self, tokens: list[int], entries: torch.Tensor) -> None:
        """Keep the whole blocks of ``tokens`` whose ``entries [L, K, C + R]`` are given (K >= len(tokens))."""
        if self.max_bytes <= 0:
            return
        with self.lock:
            keys = []
            for end in range(self.block_tokens, len(tokens) + 1, self.block_tokens):
                key = tuple(tokens[:end])
                if key not in self.blocks:
                    block = entries[:, end - self.block_tokens : end].clone()
                    if block.numel() * block.element_size() > self.max_bytes:
                        return
                    self.blocks[key] = block
                    self.bytes += block.numel() * block.element_size()
                keys.append(key)
            for key in reversed(keys):
                self.blocks.move_to_end(key)
            while self.bytes > self.max_bytes and self.blocks:
                _, block = self.blocks.popitem(last=False)
                self.bytes -= block.numel() * block.element_size()
