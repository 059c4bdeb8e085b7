import json

import pytest
from typer.testing import CliRunner

from dsv2cli import kernels
from dsv2cli.cli.main import app
from tests.helpers import one_error_line, reference_model, save_reference, save_tokenizer, skip_without_kernels

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli_gen")
    save_reference(reference_model(vocab_size=320), directory)
    save_tokenizer(directory)
    return directory


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_contract(model_dir):
    doc = _json(runner.invoke(app, ["generate", "-m", str(model_dir), "def add(a, b):", "for item", "-n", "5", "-f", "json"]))
    assert doc["model"] == model_dir.name
    assert doc["cache"]["scheme"] == "mla-latent" and doc["cache"]["bytes"] > 0
    assert len(doc["results"]) == 2
    for r in doc["results"]:
        assert set(r) >= {"prompt", "prompt_token_ids", "text", "token_ids", "logprobs", "finish_reason", "timings"}
        assert set(r["timings"]) == {"compile_s", "prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
        assert r["timings"]["compile_s"] >= 0.0  # compiled by default where it can be (0 when eager or already compiled)
        assert len(r["token_ids"]) == len(r["logprobs"]) == 5
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] == "length"
    assert doc["results"][0]["prompt"] == "def add(a, b):"


def test_bfloat16_latent_cache(model_dir):
    args = ["generate", "-m", str(model_dir), "def add(a, b):", "-n", "5", "-f", "json"]
    plain = _json(runner.invoke(app, args))
    narrow = _json(runner.invoke(app, [*args, "--kv-cache-dtype", "bfloat16"]))
    assert plain["cache"]["dtype"] == "float32" and narrow["cache"]["dtype"] == "bfloat16"
    assert narrow["cache"]["bytes"] * 2 == plain["cache"]["bytes"]
    assert len(narrow["results"][0]["token_ids"]) == 5
    assert narrow["results"][0]["token_ids"][0] == plain["results"][0]["token_ids"][0]
    summary = runner.invoke(app, [*args[:-2], "--kv-cache-dtype", "bfloat16"])
    assert summary.exit_code == 0 and "(bfloat16)" in summary.stderr
    bad = runner.invoke(app, [*args, "--kv-cache-dtype", "int4"])
    assert bad.exit_code != 0
    assert one_error_line(bad).startswith("Error: unknown --kv-cache-dtype 'int4'")


def test_attention_kernel(model_dir, monkeypatch):
    if not kernels.load().available:
        skip_without_kernels("the C++ kernels do not build here")
    calls = []
    original = kernels.Kernels.latent_attention
    monkeypatch.setattr(kernels.Kernels, "latent_attention", lambda self, *a: calls.append(a[1].shape) or original(self, *a))
    # Two prompts of different lengths: one left-padded batch (each row attends from its first slot on).
    # Eager steps (--no-compile): the Python wrapper is called at each step (compiled graphs call the operator).
    args = ["generate", "-m", str(model_dir), "def add(a, b):", "for item", "-n", "6", "-f", "json", "--no-compile"]
    plain = _json(runner.invoke(app, [*args, "--no-attention-kernel"]))
    assert calls == []  # BLAS, as asked
    fast = _json(runner.invoke(app, args))  # the kernel by default
    assert len(calls) == 2 * 5 * 3  # two prompts, 5 steps after the prefill's token, 3 layers
    for a, b in zip(plain["results"], fast["results"], strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    monkeypatch.setattr(kernels, "load", lambda: kernels.Kernels(error="Ninja is required to load C++ extensions"))
    refused = runner.invoke(app, [*args, "--attention-kernel"])
    assert one_error_line(refused) == (
        "Error: --attention-kernel: the kernel is not available here (Ninja is required to load C++ extensions)"
    )


def test_streams_text_and_summary_on_stderr(model_dir):
    result = runner.invoke(app, ["generate", "-m", str(model_dir), "class Stack:", "-n", "6"])
    assert result.exit_code == 0, result.output
    doc = _json(runner.invoke(app, ["generate", "-m", str(model_dir), "class Stack:", "-n", "6", "-f", "json"]))
    assert result.stdout.rstrip("\n") == doc["results"][0]["text"]
    assert "tokens/s" in result.stderr


def test_input_file_jsonl_with_messages_and_token_ids(model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps({"prompt": "def add"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hello there"}]})
        + "\n"
        + json.dumps({"prompt_token_ids": [0, 5, 6]})
        + "\n"
    )
    doc = _json(runner.invoke(app, ["generate", "-m", str(model_dir), "-i", str(path), "-n", "3", "-f", "json"]))
    prompts = [r["prompt"] for r in doc["results"]]
    assert prompts[0] == "def add"
    assert prompts[1] == "<｜begin▁of▁sentence｜>User: hello there\n\nAssistant:"
    assert prompts[2] is None and doc["results"][2]["prompt_token_ids"] == [0, 5, 6]


def test_jsonl_output_and_stdin(model_dir):
    result = runner.invoke(app, ["generate", "-m", str(model_dir), "-", "-n", "2", "-f", "jsonl"], input="for item in")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 1 and records[0]["prompt"] == "for item in"


def test_chat_with_system(model_dir):
    doc = _json(
        runner.invoke(app, ["generate", "-m", str(model_dir), "--chat", "--system", "Be brief.", "hi", "-n", "2", "-f", "json"])
    )
    assert doc["results"][0]["prompt"] == "<｜begin▁of▁sentence｜>Be brief.\n\nUser: hi\n\nAssistant:"


def test_same_seed_same_output(model_dir):
    args = ["generate", "-m", str(model_dir), "def", "-n", "8", "-t", "1.0", "--seed", "5", "-f", "json"]
    assert (
        _json(runner.invoke(app, args))["results"][0]["token_ids"] == _json(runner.invoke(app, args))["results"][0]["token_ids"]
    )


def test_interactive_session(model_dir):
    result = runner.invoke(
        app, ["generate", "-m", str(model_dir), "--interactive", "-n", "3"], input="hello\n/clear\nagain\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert "Conversation cleared" in result.stderr


def test_token_ids_without_tokenizer(tmp_path):
    save_reference(reference_model(), tmp_path)
    doc = _json(runner.invoke(app, ["generate", "-m", str(tmp_path), "--token-ids", "0,5,6", "-n", "3", "-f", "json"]))
    assert doc["results"][0]["text"] is None and len(doc["results"][0]["token_ids"]) == 3
    assert "token ids" in one_error_line(runner.invoke(app, ["generate", "-m", str(tmp_path), "hello"]))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-t", "-1", "x"], "temperature"),
        (["--top-p", "0", "x"], "top-p"),
        (["--top-p", "1.5", "x"], "top-p"),
        (["-n", "0", "x"], "max-new-tokens"),
    ],
)
def test_bad_options(model_dir, args, words):
    assert words in one_error_line(runner.invoke(app, ["generate", "-m", str(model_dir), *args]))


def test_bad_inputs(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "no prompts" in one_error_line(runner.invoke(app, ["generate", "-m", str(model_dir), "-i", str(empty)]))
    assert "not found" in one_error_line(runner.invoke(app, ["generate", "-m", str(tmp_path / "missing"), "x"]))
    long_prompt = "def add " * 400
    assert "context" in one_error_line(runner.invoke(app, ["generate", "-m", str(model_dir), long_prompt]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert "bad.jsonl:1" in one_error_line(runner.invoke(app, ["generate", "-m", str(model_dir), "-i", str(bad)]))
    assert "preset" in one_error_line(runner.invoke(app, ["generate", "-m", "deepseek-v2", "x"]))
