"""The bundled demo model: shipped files and licences, architecture, and issue #24's targets recomputed."""

import json

import pytest
from typer.testing import CliRunner

from dsv2cli.checkpoint.resolve import bundled_model_dir
from dsv2cli.cli.main import app
from dsv2cli.config import load_config
from dsv2cli.training.evaluate import evaluate_text, first_statement_compiles

DEMO = bundled_model_dir()
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
RATIO_TARGET = 0.6  # held-out loss / unigram entropy of the same text
COMPILE_TARGET = 7  # of 10 greedy continuations
COPY_LIMIT = 200  # characters


@pytest.fixture(scope="module")
def evaluation() -> dict:
    assert DEMO is not None, "dsv2cli/assets/demo/config.json is missing"
    return json.loads((DEMO / "evaluation.json").read_text())


def _generate(*args: str) -> list[str]:
    result = CliRunner().invoke(app, ["generate", *args, "--no-compile", "--no-attention-kernel", "--format", "json"])
    assert result.exit_code == 0, result.output
    return [r["text"] for r in json.loads(result.stdout)["results"]]


def test_demo_files_licences_and_architecture():
    assert DEMO is not None, "dsv2cli/assets/demo/config.json is missing"
    for name in (*FILES, "sample.txt", "evaluation.json", "training.json", "corpus.json", "README.md"):
        assert (DEMO / name).is_file(), name
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 30 * 2**20
    assert not (DEMO / "trainer").exists()  # resumable state is not shipped
    corpus = json.loads((DEMO / "corpus.json").read_text())
    assert {p["split"] for p in corpus.values()} == {"train", "held_out"}
    for name, package in corpus.items():
        assert (DEMO / "LICENSES" / f"{name}.txt").is_file(), name
        assert package["license"] and package["files"] > 0
    raw = json.loads((DEMO / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v2"
    config = load_config(DEMO)
    assert config.first_k_dense_replace >= 1 and config.n_shared_experts >= 1 and config.n_routed_experts >= 16
    assert config.kv_lora_rank < config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim)
    assert config.topk_method == "group_limited_greedy" and config.num_experts_per_tok > config.topk_group
    assert json.loads((DEMO / "tokenizer_config.json").read_text())["chat_template"].startswith("{% if not add_generation_prompt")


def test_demo_held_out_loss_is_below_the_target_ratio(evaluation):
    got = evaluate_text(DEMO, (DEMO / "sample.txt").read_text(), evaluation["seq_len"])
    assert got.tokens == evaluation["tokens"]
    assert got.loss == pytest.approx(evaluation["loss"], abs=1e-3)
    assert got.unigram_entropy == pytest.approx(evaluation["unigram_entropy"], abs=1e-6)
    # sample.txt is whole files of packages that were never trained on.
    assert got.loss <= RATIO_TARGET * got.unigram_entropy
    packages = evaluation["held_out_packages"]
    assert packages["loss"] <= RATIO_TARGET * packages["unigram_entropy"]
    training = json.loads((DEMO / "training.json").read_text())["result"]
    assert training["eval_loss"] < training["unigram_loss"] - 1.5


def test_demo_greedy_continuations_compile(evaluation):
    recorded = evaluation["greedy_compile"]
    prompts = [o["prompt"] for o in recorded["outputs"]]
    assert len(prompts) == 10
    texts = _generate(
        *prompts, "-n", str(recorded["max_new_tokens"]), "--temperature", "0", "--repetition-penalty", "1", "--batch-size", "10"
    )
    passed = sum(first_statement_compiles(p, t) for p, t in zip(prompts, texts, strict=True))
    assert abs(passed - recorded["passed"]) <= 1  # what evaluation.json records (a tie may break otherwise elsewhere)
    assert passed >= COMPILE_TARGET, f"{passed}/10 greedy first statements compile (target {COMPILE_TARGET})"


def test_demo_sampled_outputs_copy_no_training_file(evaluation):
    check = evaluation["copy_check"]
    assert check["outputs"] == 20 and check["limit_chars"] == COPY_LIMIT
    assert check["copies"] == 0 and check["longest_shared_chars"] <= COPY_LIMIT


def test_readme_first_command_starts_a_python_function():
    (text,) = _generate("def fibonacci(n):", "-n", "48", "--seed", "0")  # the generation_config's sampling
    body = [line for line in text.splitlines()[1:] if line.strip()]
    assert text.startswith("\n") and len(body) >= 2, text
    assert body[0].startswith("    ") and not body[0].startswith("     "), text  # a body indented by one level
