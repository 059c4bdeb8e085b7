"""Model invariants: naive == absorbed, cached decode == full forward, batch == single, routing hook."""

import torch

from dsv2cli.model import DeepseekV2, RoutingDecision
from dsv2cli.presets import preset_config


def _random_model(name: str = "tiny", seed: int = 0) -> DeepseekV2:
    torch.manual_seed(seed)
    model = DeepseekV2(preset_config(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    return model


def test_naive_and_absorbed_agree():
    model = _random_model()
    tokens = torch.randint(0, 256, (3, 50))
    with torch.no_grad():
        a = model(tokens, attention="absorbed")
        b = model(tokens, attention="naive")
    assert (a - b).abs().max() < 1e-5 * a.abs().max() + 1e-6


def test_prefill_then_decode_equals_full_forward():
    model = _random_model("tiny-lite")
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        for impl in ("absorbed", "naive"):
            cache = model.new_cache(2, 30)
            # A first prefill (causal from an empty cache), a second one after it (T > S), then single steps.
            parts = [model(tokens[:, :11], cache=cache, attention=impl), model(tokens[:, 11:17], cache=cache, attention=impl)]
            parts += [model(tokens[:, i : i + 1], cache=cache, attention=impl) for i in range(17, 30)]
            stepped = torch.cat(parts, dim=1)
            assert (stepped - full).abs().max() < 1e-5 * full.abs().max()
    assert cache.length == 30


def test_left_padded_batch_equals_each_prompt_alone():
    model = _random_model()
    prompts = [torch.randint(2, 256, (n,)) for n in (5, 12, 9)]
    longest = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    pad = []
    for row, p in enumerate(prompts):
        batch[row, longest - len(p) :] = p
        pad.append(longest - len(p))
    with torch.no_grad():
        cache = model.new_cache(len(prompts), longest + 4, pad=pad)
        prefill = model(batch, cache=cache, last_only=True)
        step_tokens = torch.randint(2, 256, (len(prompts), 1))
        step = model(step_tokens, cache=cache)
        for row, p in enumerate(prompts):
            alone_cache = model.new_cache(1, len(p) + 4)
            alone = model(p[None], cache=alone_cache, last_only=True)
            assert (alone[0] - prefill[row]).abs().max() < 1e-5 * alone.abs().max()
            alone_step = model(step_tokens[row : row + 1], cache=alone_cache)
            assert (alone_step[0] - step[row]).abs().max() < 1e-5 * alone_step.abs().max()


def test_cache_stores_only_latent_and_rope_key():
    config = preset_config("deepseek-v2-lite")
    model = _random_model("tiny")
    cache = model.new_cache(2, 10)
    c = model.config
    assert cache.entries.shape == (c.num_hidden_layers, 2, 10, c.kv_lora_rank + c.qk_rope_head_dim)
    assert cache.nbytes() == c.num_hidden_layers * 2 * 10 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert config.kv_cache_elements_per_token_per_layer == 576


def test_routing_hook_observes_and_can_drop():
    model = _random_model()
    tokens = torch.randint(0, 256, (2, 7))
    seen: list[RoutingDecision] = []

    def observe(decision: RoutingDecision) -> None:
        seen.append(decision)

    with torch.no_grad():
        base = model(tokens, routing_hook=observe)
    assert [d.layer_idx for d in seen] == model.config.moe_layer_indices
    for d in seen:
        assert d.batch_shape == (2, 7)
        assert d.expert_ids.shape == (14, model.config.num_experts_per_tok)
        assert torch.allclose(d.scores.sum(-1), torch.ones(14))

    def drop_all(decision: RoutingDecision) -> RoutingDecision:
        return decision.with_assignments(torch.full_like(decision.expert_ids, -1), decision.weights)

    def zero_weights(decision: RoutingDecision) -> RoutingDecision:
        return decision.with_assignments(decision.expert_ids, torch.zeros_like(decision.weights))

    with torch.no_grad():
        dropped = model(tokens, routing_hook=drop_all)
        zeroed = model(tokens, routing_hook=zero_weights)
    assert not torch.allclose(base, dropped)
    assert torch.allclose(dropped, zeroed, atol=1e-6)


def test_group_limited_selection_stays_in_kept_groups():
    from dsv2cli.model.moe import select_experts

    scores = torch.rand(100, 16).softmax(-1)
    _, ids = select_experts(scores, 4, "group_limited_greedy", n_group=4, topk_group=2)
    assert all(torch.unique(row // 4).numel() <= 2 for row in ids)


def test_query_chunking_gives_the_same_logits(monkeypatch):
    from dsv2cli.model import attention

    model = _random_model()
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        whole = {impl: model(tokens, attention=impl) for impl in ("absorbed", "naive")}
        monkeypatch.setattr(attention, "_SCORE_BUDGET", 2 * 4 * 40 * 3)  # 3 queries per chunk
        for impl, expected in whole.items():
            assert (model(tokens, attention=impl) - expected).abs().max() < 1e-5 * expected.abs().max()


def test_fused_projections_give_the_same_logits_and_keep_the_state_dict(tmp_path):
    from dsv2cli.checkpoint.loader import load_hf_checkpoint
    from dsv2cli.model.quantized import quantize_int8
    from dsv2cli.model.transformer import fuse_projections
    from tests.helpers import reference_model, save_reference

    save_reference(reference_model(), tmp_path)
    tokens = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(11))
    for transform in (lambda m: m, quantize_int8):
        plain = transform(load_hf_checkpoint(tmp_path))
        fused = fuse_projections(transform(load_hf_checkpoint(tmp_path)))
        attention = fused.layers[1].self_attn
        assert attention.fused_input is not None and attention.fused_input.usable() is False  # grad mode is on
        assert sorted(plain.state_dict()) == sorted(fused.state_dict())
        with torch.inference_mode():
            assert attention.fused_input.usable()
            cache_plain, cache_fused = plain.new_cache(1, 12), fused.new_cache(1, 12)
            expected = [plain(tokens, cache=cache_plain)[:, -1]]
            got = [fused(tokens, cache=cache_fused)[:, -1]]
            for token in (3, 7):  # decode steps: one token, the int8 x int8 path for int8 weights
                step = torch.tensor([[token]])
                expected.append(plain(step, cache=cache_plain)[:, -1])
                got.append(fused(step, cache=cache_fused)[:, -1])
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        # The separate modules still view the stack: a weight changed in place reaches the fused path.
        with torch.no_grad():
            fused.layers[1].self_attn.kv_a_proj_with_mqa.weight.zero_()
        assert torch.count_nonzero(attention.fused_input.weight[-attention.kv_a_proj_with_mqa.weight.shape[0] :]) == 0
