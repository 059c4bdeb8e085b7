"""The latent KV cache (dsv2cli/model/cache.py): sizes, positions, masks, slot writes, truncate and left padding.

A small cache throughout: 2 layers, 2 rows (row 1 left-padded by 2 slots), capacity 6, C = 3, R = 2.
"""

import pytest
import torch

from dsv2cli.config import ModelConfig
from dsv2cli.model.cache import LatentKVCache
from tests.helpers import one_thread_per_module  # noqa: F401 (autouse fixture)

T, F = True, False


def _cache(dtype: torch.dtype = torch.float32, pad: list[int] | None = None) -> LatentKVCache:
    return LatentKVCache(num_layers=2, batch_size=2, capacity=6, kv_lora_rank=3, rope_dim=2, dtype=dtype, pad=pad or [0, 2])


def test_sizes():
    cache = _cache()
    assert cache.entries.shape == (2, 2, 6, 5)
    assert cache.nbytes() == 2 * 2 * 6 * 5 * 4 == 480
    assert cache.bytes_per_token() == 2 * 5 * 4 == 40
    narrow = _cache(torch.bfloat16)
    assert (narrow.nbytes(), narrow.bytes_per_token()) == (240, 20)
    assert cache.has_padding and not _cache(pad=[0, 0]).has_padding


def test_for_model_takes_layers_latent_and_rope_sizes_from_the_config():
    # DeepSeek-V2-Lite's cache (spec §3.3): 27 layers x (512 + 64) = 15,552 values, 31,104 bytes per token in bfloat16.
    config = ModelConfig(
        vocab_size=8,
        hidden_size=8,
        num_hidden_layers=27,
        num_attention_heads=1,
        kv_lora_rank=512,
        qk_nope_head_dim=4,
        qk_rope_head_dim=64,
        v_head_dim=4,
        intermediate_size=8,
    )
    cache = LatentKVCache.for_model(config, batch_size=1, capacity=1, dtype=torch.bfloat16)
    assert cache.entries.shape == (27, 1, 1, 576)
    assert cache.bytes_per_token() == 31104


def test_positions_start_after_each_rows_padding():
    cache = _cache()
    assert cache.positions(3).tolist() == [[0, 1, 2], [0, 0, 0]]  # row 1's slots 0, 1 are padding
    cache.advance(3)
    assert cache.positions(2).tolist() == [[3, 4], [1, 2]]
    assert cache.positions(2, static=True).tolist() == [[3, 4], [1, 2]]


def test_prefill_mask_is_causal_and_pad_slots_see_only_themselves():
    mask = _cache().attention_mask(4)
    assert mask.shape == (2, 4, 4) and mask.dtype == torch.bool
    assert mask[0].tolist() == [[T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]
    assert mask[1].tolist() == [[T, F, F, F], [F, T, F, F], [F, F, T, F], [F, F, T, T]]


def test_step_masks_dynamic_and_static():
    cache = _cache()
    cache.advance(3)
    assert cache.attention_mask(1).tolist() == [[[T, T, T, T]], [[F, F, T, T]]]
    # Static shapes: the whole capacity, slots after the new one masked out.
    assert cache.attention_mask(1, static=True).tolist() == [[[T, T, T, T, F, F]], [[F, F, T, T, F, F]]]
    assert cache.attention_mask(2).tolist() == [
        [[T, T, T, T, F], [T, T, T, T, T]],
        [[F, F, T, T, F], [F, F, T, T, T]],
    ]


def test_layer_views_write_the_next_slots_of_their_own_layer():
    cache = _cache()
    first = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5) + 1
    views = cache.layer_views(3)
    assert len(views) == 2 and views[0].start == 0
    assert views[0].bounds.tolist() == [[0, 3], [2, 3]]  # [first attended slot, slots filled after the write]
    read = views[0].write(first)
    assert read.shape == (2, 3, 5) and torch.equal(read, first)
    assert torch.equal(cache.entries[0, :, :3], first)
    assert not cache.entries[1].any() and not cache.entries[0, :, 3:].any()  # layer 1 and later slots untouched
    cache.advance(3)

    second = -torch.ones(2, 2, 5, dtype=torch.float64)  # cast to the cache's dtype on write
    views = cache.layer_views(2)
    assert views[1].start == 3 and views[1].bounds.tolist() == [[0, 5], [2, 5]]
    read = views[1].write(second)
    assert read.shape == (2, 5, 5) and read.dtype == torch.float32
    assert cache.entries[1, :, 3:5].eq(-1).all() and not cache.entries[1, :, :3].any() and not cache.entries[1, :, 5].any()
    assert torch.equal(cache.entries[0, :, :3], first)


def test_static_views_write_at_the_tensor_slot_and_read_the_whole_capacity():
    cache = _cache(torch.bfloat16)
    cache.advance(4)
    views = cache.layer_views(1, static=True)
    assert views[0].slots.tolist() == [4] and views[0].bounds.tolist() == [[0, 5], [2, 5]]
    read = views[0].write(torch.full((2, 1, 5), 1.5))
    assert read.shape == (2, 6, 5) and read.dtype == torch.bfloat16
    assert cache.entries[0, :, 4].eq(1.5).all() and not cache.entries[0, :, :4].any() and not cache.entries[0, :, 5].any()
    # The caller advances static steps; next_slot follows length, so the same graph writes the next slot.
    cache.advance(1)
    assert cache.next_slot.tolist() == [5] and cache.layer_views(1, static=True)[0].slots.tolist() == [5]


def test_room_is_checked_before_a_write():
    cache = _cache()
    cache.advance(3)
    cache.layer_views(3)  # exactly fills the capacity
    with pytest.raises(ValueError, match="cache holds 6 tokens; 7 were asked for"):
        cache.layer_views(4)


def test_truncate_and_reset():
    cache = _cache()
    cache.advance(5)
    cache.truncate(3)
    assert cache.length == 3 and cache.next_slot.tolist() == [3]
    assert cache.positions(1).tolist() == [[3], [1]]
    assert cache.layer_views(1)[0].start == 3
    for bad in (4, -1):
        with pytest.raises(ValueError, match=f"cannot truncate a cache of 3 tokens to {bad}"):
            cache.truncate(bad)
    cache.truncate(0)
    assert cache.positions(2).tolist() == [[0, 1], [0, 0]]
    cache.advance(2)
    cache.reset(pad=[1, 0])
    assert cache.length == 0 and cache.next_slot.tolist() == [0] and cache.pad.tolist() == [1, 0]
    assert cache.positions(2).tolist() == [[0, 0], [0, 1]]
    cache.reset()
    assert cache.pad.tolist() == [0, 0] and not cache.has_padding
