from dsv2cli.analysis.params import count_params
from dsv2cli.checkpoint.hf_keys import hf_tensor_shapes
from dsv2cli.presets import preset_config


def test_published_parameter_counts():
    v2 = count_params(preset_config("deepseek-v2"))
    lite = count_params(preset_config("deepseek-v2-lite"))
    assert v2.total == 235_741_434_880
    assert lite.total == 15_706_484_224
    assert v2.active == 21_375_800_320
    assert round(lite.active_without_embedding / 1e9, 2) == 2.45


def test_tensor_counts_match_spec():
    assert len(hf_tensor_shapes(preset_config("deepseek-v2"))) == 29_102
    assert len(hf_tensor_shapes(preset_config("deepseek-v2-lite"))) == 5_291


def test_counts_equal_built_model(tmp_path):
    import torch

    from dsv2cli.model import DeepseekV2

    config = preset_config("tiny")
    with torch.device("meta"):
        model = DeepseekV2(config)
    assert sum(p.numel() for p in model.parameters()) == count_params(config).total
