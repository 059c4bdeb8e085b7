"""The bundled demo model: shipped files, architecture, recorded held-out numbers, Python-shaped completions."""

import json

import pytest
from typer.testing import CliRunner

from dsv2cli.checkpoint.resolve import bundled_model_dir
from dsv2cli.cli.main import app
from dsv2cli.config import load_config
from dsv2cli.training.evaluate import evaluate_text

DEMO = bundled_model_dir()
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def test_demo_files_and_architecture():
    assert DEMO is not None, "dsv2cli/assets/demo/config.json is missing"
    for name in (*FILES, "sample.txt", "evaluation.json", "training.json", "README.md", "PSF-LICENSE.txt"):
        assert (DEMO / name).is_file(), name
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 30 * 2**20
    assert not (DEMO / "trainer").exists()  # resumable state is not shipped
    raw = json.loads((DEMO / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v2"
    config = load_config(DEMO)
    assert config.first_k_dense_replace >= 1 and config.n_shared_experts >= 1 and config.n_routed_experts >= 16
    assert config.kv_lora_rank < config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim)
    assert config.topk_method == "group_limited_greedy" and config.num_experts_per_tok > config.topk_group
    assert json.loads((DEMO / "tokenizer_config.json").read_text())["chat_template"].startswith("{% if not add_generation_prompt")


def test_demo_reaches_its_recorded_held_out_loss():
    recorded = json.loads((DEMO / "evaluation.json").read_text())
    got = evaluate_text(DEMO, (DEMO / "sample.txt").read_text(), recorded["seq_len"])
    assert got.tokens == recorded["tokens"]
    assert got.loss == pytest.approx(recorded["loss"], abs=1e-3)
    assert got.unigram_entropy == pytest.approx(recorded["unigram_entropy"], abs=1e-6)
    # Far below what any context-free model could reach on the same text.
    assert got.loss < got.unigram_entropy - 1.0
    training = json.loads((DEMO / "training.json").read_text())["result"]
    assert training["eval_loss"] < training["unigram_loss"] - 1.5


def test_demo_generates_python_shaped_code():
    result = CliRunner().invoke(app, ["generate", "def ", "-n", "48", "--temperature", "0", "--format", "json"])
    assert result.exit_code == 0, result.output
    text = json.dumps(json.loads(result.stdout))
    assert "\\n    " in text  # an indented body
    assert "(" in text and ":" in text
