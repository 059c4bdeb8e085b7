"""KV-cache arithmetic against the paper's numbers (Table 1, Table 9, §3.2.3) and the spec's worked examples."""

import json
import math

import pytest

from dsv2cli.analysis.kv_cache import AttentionShape, Scheme, cache_row, parse_memory, parse_schemes, parse_tokens, precision
from dsv2cli.analysis.kv_report import build_cache_report, resolve_baseline
from dsv2cli.analysis.params import count_params
from dsv2cli.errors import ConfigError, InputError
from dsv2cli.presets import preset_config

BF16 = precision("bfloat16")


def shape(preset: str) -> AttentionShape:
    return AttentionShape.from_config(preset_config(preset), preset)


def row(preset: str, scheme: str, prec=BF16):
    return cache_row(parse_schemes([scheme], shape(preset).num_heads)[0], shape(preset), prec)


def report(preset: str = "deepseek-v2", **kwargs):
    config = preset_config(preset)
    defaults = dict(schemes=parse_schemes(None, config.num_attention_heads), prec=BF16, batch_sizes=[1], contexts=[4096])
    return build_cache_report(config, preset, "preset", **{**defaults, **kwargs})


def kilo(n: int) -> str:
    return f"{n / 1000:.1f}K"


def test_mla_per_layer_and_per_token_match_the_paper():
    # Table 1: MLA caches (d_c + d_h^R)·l; Table 9: 34.6K (large MoE, 60 layers) and 15.6K (small MoE, 27 layers).
    v2, lite = row("deepseek-v2", "mla"), row("deepseek-v2-lite", "mla")
    assert v2.elements_per_token_per_layer == lite.elements_per_token_per_layer == 576
    assert (v2.elements_per_token, kilo(v2.elements_per_token)) == (34_560, "34.6K")
    assert (lite.elements_per_token, kilo(lite.elements_per_token)) == (15_552, "15.6K")
    assert (v2.bytes_per_token, lite.bytes_per_token) == (69_120, 31_104)  # spec §3.3, bfloat16


def test_mha_equivalent_of_the_small_model_matches_table_9():
    # 2·n_h·d_h·l = 2·16·128·27 = 110,592 ≈ 110.6K. (Table 9's large MHA model, 860.2K, is an ablation model whose
    # shape differs from DeepSeek-V2's; on V2's own shape the formula gives 2·128·128·60.)
    assert kilo(row("deepseek-v2-lite", "mha").elements_per_token) == "110.6K"
    assert row("deepseek-v2", "mha").elements_per_token == 2 * 128 * 128 * 60


def test_mla_is_gqa_with_2_25_groups_and_1_76_percent_of_mha():
    v2 = row("deepseek-v2", "mla")
    assert v2.equivalent_gqa_groups == 2.25  # (9/2)·d_h = 2·2.25·d_h
    assert round(100 * v2.fraction_of_mha, 2) == 1.76  # spec §11: 576 / 32,768
    assert row("deepseek-v2-lite", "mla").equivalent_gqa_groups == 2.25


def test_expanded_cache_of_the_hf_remote_code():
    # spec §11: 128·(192 + 128) = 40,960 per layer; peers §0: V2-Lite 16·320 = 5,120, 276,480 vs 31,104 B per token (bf16).
    assert row("deepseek-v2", "mla-expanded").elements_per_token_per_layer == 40_960
    lite = row("deepseek-v2-lite", "mla-expanded")
    assert lite.elements_per_token_per_layer == 5_120
    assert lite.bytes_per_token == 276_480


def test_gqa_and_mqa_formulas():
    assert row("deepseek-v2", "gqa:8").elements_per_token_per_layer == 2 * 8 * 128
    assert row("deepseek-v2", "gqa:8").equivalent_gqa_groups == 8
    assert row("deepseek-v2", "mqa").elements_per_token_per_layer == 2 * 128
    assert row("deepseek-v2", "mha").equivalent_gqa_groups == 128


def test_93_3_percent_comes_from_architecture_and_6_bit_cache():
    r = report(prec=precision(bits=6), baseline=resolve_baseline("deepseek-67b"), baseline_precision=BF16)
    assert r.baseline.elements_per_token == 2 * 8 * 128 * 95 == 194_560
    assert r.baseline.bytes_per_token == 389_120
    assert r.native.bytes_per_token == 25_920  # 34,560 elements × 6 / 8
    assert round(100 * r.reduction, 1) == 93.3
    assert round(100 * r.architecture_reduction, 1) == 82.2
    assert math.isclose(r.reduction, 1 - 25_920 / 389_120)
    assert "93.3 %" in r.explanation()[1] and "82.2 %" in r.explanation()[1]


def test_82_2_percent_without_quantisation():
    r = report(baseline=resolve_baseline("deepseek-67b"))
    assert round(100 * r.reduction, 1) == 82.2 == round(100 * r.architecture_reduction, 1)
    assert math.isclose(r.reduction, 1 - 69_120 / 389_120)


def test_reduction_per_row():
    r = report(baseline=resolve_baseline("deepseek-67b"))
    gqa8 = next(x for x in r.rows if x.scheme == "gqa:8")
    assert math.isclose(r.reduction_of(gqa8), 1 - (2 * 8 * 128 * 60) / (2 * 8 * 128 * 95))


def test_precision():
    assert precision(bits=6).bytes_per_element == 0.75
    assert precision("fp8").bits == precision("int8").bits == 8
    assert precision("float32").bytes_per_element == 4
    assert precision(None).name == "bfloat16"
    with pytest.raises(InputError, match="not both"):
        precision("float16", 6)
    with pytest.raises(InputError, match="unknown dtype"):
        precision("float64")
    with pytest.raises(InputError):
        precision(bits=0)


def test_fractional_bytes_per_token():
    assert row("deepseek-v2-lite", "mla", precision(bits=4.5)).bytes_per_token == 15_552 * 4.5 / 8


def test_grid_and_sequence_bytes():
    r = report(batch_sizes=[1, 8], contexts=[4096, 131072])
    doc = r.to_json()
    mla = doc["rows"][0]
    assert mla["scheme"] == "mla"
    assert mla["grid"] == [{"batch_size": b, "context": c, "bytes": 69_120 * b * c} for b in (1, 8) for c in (4096, 131072)]
    assert mla["bytes_per_sequence"] == [{"context": c, "bytes": 69_120 * c} for c in (4096, 131072)]
    json.dumps(doc)  # serialisable


def test_budget_max_tokens_and_sequences():
    memory = parse_memory("80GiB")
    r = report(preset="deepseek-v2-lite", memory_bytes=memory, contexts=[4096, 32768])
    doc = r.to_json()
    mla = doc["rows"][0]
    assert mla["max_tokens"] == memory // 31_104
    assert mla["max_sequences"] == [{"context": c, "sequences": memory // 31_104 // c} for c in (4096, 32768)]
    assert doc["budget"]["weight_bytes"] is None


def test_budget_minus_weights():
    memory = parse_memory("80GiB")
    weights = count_params(preset_config("deepseek-v2-lite")).total * 2  # 15,706,484,224 parameters in bfloat16
    r = report(preset="deepseek-v2-lite", memory_bytes=memory, weight_precision=BF16)
    assert r.budget.weight_bytes == weights == 31_412_968_448
    assert r.to_json()["rows"][0]["max_tokens"] == (memory - weights) // 31_104


def test_weights_larger_than_memory_is_an_error():
    with pytest.raises(InputError, match="weights alone"):
        report(memory_bytes=parse_memory("80GiB"), weight_precision=BF16)  # 236B parameters


def test_parse_memory_and_tokens():
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("1.5 TiB") == int(1.5 * 2**40)
    assert parse_memory("512") == 512
    for bad in ("lots", "80 parsecs", "0GiB"):
        with pytest.raises(InputError):
            parse_memory(bad)
    assert parse_tokens("128k") == 131_072 and parse_tokens("4096") == 4096 and parse_tokens("1M") == 2**20
    with pytest.raises(InputError):
        parse_tokens("many")


def test_parse_schemes():
    assert [s.name for s in parse_schemes(None, 128)] == ["mla", "mla-expanded", "mha", "gqa:8", "gqa:4", "gqa:2", "mqa"]
    assert [s.name for s in parse_schemes(None, 4)] == ["mla", "mla-expanded", "mha", "gqa:2", "mqa"]
    assert [s.name for s in parse_schemes(["mla,gqa:2,4,8", "MQA"], 128)] == ["mla", "gqa:2", "gqa:4", "gqa:8", "mqa"]
    assert [s.name for s in parse_schemes(["gqa"], 16)] == ["gqa:8", "gqa:4", "gqa:2"]
    for bad in (["mla,foo"], ["gqa:0"], ["gqa:129"], ["gqa:x"], ["4"]):
        with pytest.raises(InputError):
            parse_schemes(bad, 128)


def test_non_positive_batch_or_context():
    with pytest.raises(InputError, match="`batch_size`"):
        report(batch_sizes=[0])
    with pytest.raises(InputError, match="`context`"):
        report(contexts=[4096, -1])


def test_context_beyond_max_positions_is_noted():
    assert report(preset="tiny", schemes=[Scheme("mla")], contexts=[1024]).notes


def test_baseline_presets_and_configs(tmp_path):
    b = resolve_baseline("deepseek-67b")
    assert (b.num_layers, b.num_heads, b.kv_heads, b.head_dim) == (95, 64, 8, 128)
    assert b.native_scheme.name == "gqa:8"
    assert resolve_baseline("deepseek-v2-lite").native_scheme.name == "mla"
    llama = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    mha = resolve_baseline(str(tmp_path))
    assert (mha.native_scheme.name, mha.head_dim) == ("mha", 128)
    assert cache_row(mha.native_scheme, mha, BF16).bytes_per_token == 2 * 32 * 128 * 32 * 2
    mqa = tmp_path / "mqa.json"
    mqa.write_text(json.dumps({**llama, "num_key_value_heads": 1, "head_dim": 64}))
    assert resolve_baseline(str(mqa)).native_scheme.name == "mqa"


def test_bad_baselines(tmp_path):
    with pytest.raises(InputError, match="not a preset"):
        resolve_baseline("no-such-baseline")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        resolve_baseline(str(tmp_path / "config.json"))
    with pytest.raises(InputError, match="no MLA"):
        cache_row(Scheme("mla"), resolve_baseline("deepseek-67b"), BF16)
