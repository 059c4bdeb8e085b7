"""Per-rank memory computed from configs (the table in docs/distributed.md)."""

import torch

from dsv2cli.analysis.params import count_params
from dsv2cli.parallel.memory import _main, markdown_table, rank_memory
from dsv2cli.presets import preset_config


def test_one_rank_holds_every_parameter():
    config = preset_config("deepseek-v2")
    counts = count_params(config)
    routers = len(config.moe_layer_indices) * config.n_routed_experts * config.hidden_size
    m = rank_memory(config, 1, torch.bfloat16)
    assert m.total == 2 * (counts.total - routers) + 4 * routers  # routers stay float32
    assert m.routed_experts == 2 * counts.routed_experts


def test_split_parts_shrink_by_the_world_size_and_replicated_parts_do_not():
    config = preset_config("deepseek-v2-lite")
    one, eight = rank_memory(config, 1), rank_memory(config, 8)
    assert eight.routed_experts * 8 == one.routed_experts
    assert eight.shared_experts * 8 == one.shared_experts
    assert eight.dense_mlp * 8 == one.dense_mlp
    assert eight.embedding_and_head * 8 == one.embedding_and_head
    assert eight.other == one.other  # norms and routers are on every rank
    # q_proj / kv_b_proj / o_proj split by heads; kv_a_proj_with_mqa (the shared latent) is replicated
    d, layers = config.hidden_size, config.num_hidden_layers
    replicated_attention = layers * ((config.kv_lora_rank + config.qk_rope_head_dim) * d + config.kv_lora_rank) * 2
    assert eight.attention - replicated_attention == (one.attention - replicated_attention) // 8
    # V2-Lite in bfloat16: 15.7B parameters, about 29.3 GiB on one rank and 3.7 GiB on each of eight
    assert round(one.total / 2**30, 1) == 29.3 and round(eight.total / 2**30, 1) == 3.7


def test_table_and_command(capsys):
    table = markdown_table(["deepseek-v2"], [1, 8])
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| deepseek-v2 | 1 |") and rows[3].endswith("| 56.1 GiB |")
    _main(["deepseek-v2-lite", "--world-sizes", "2"])
    assert capsys.readouterr().out.splitlines()[2].startswith("| deepseek-v2-lite | 2 |")
