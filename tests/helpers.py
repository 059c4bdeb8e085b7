"""Test helpers: small random checkpoints written by transformers' reference implementation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

TINY_HF: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.0,
    "max_position_embeddings": 256,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


def reference_model(seed: int = 0, rope: dict[str, Any] | None = YARN, **overrides: Any):
    """A random transformers DeepseekV2ForCausalLM (float32, eval) with well-spread router weights."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    fields = {**TINY_HF, **overrides}
    rope_parameters = dict(rope) if rope is not None else {"rope_type": "default", "rope_theta": 10000.0}
    config = DeepseekV2Config(**fields, rope_parameters=rope_parameters)
    model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)  # spread router logits so top-k ties never decide a result
            elif "norm" not in name:
                param.normal_(0.0, 0.05)
            else:
                param.uniform_(0.5, 1.5)
    return model


def save_reference(model, directory: Path, shard_size: str | None = None, spelling: str = "transformers5", **edits: Any) -> Path:
    """Save with save_pretrained; optionally rewrite config.json in the original DeepSeek spelling."""
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if spelling == "deepseek":
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        config["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        for derived in ("head_dim", "qk_head_dim"):
            config.pop(derived, None)
    config.update(edits)
    path.write_text(json.dumps(config, indent=2))
    return directory


def assert_close_relative(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3e} > {rel} x {scale:.3e}"


def greedy_reference(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    mask = torch.ones_like(prompt)  # explicit: transformers would otherwise treat token 0 as padding
    out = model.generate(
        prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[:, prompt.shape[1] :]


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for item in items:\n    print(item)\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "User: hello there\n\nAssistant: hi, how can I help?\n",
] * 20


def save_tokenizer(directory: Path, vocab_size: int = 300, chat_template: str | None = None) -> None:
    """Train a small byte-level BPE and write tokenizer.json + tokenizer_config.json (BOS/EOS as in DeepSeek-V2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "bos_token": {"content": "<｜begin▁of▁sentence｜>"},
        "eos_token": {"content": "<｜end▁of▁sentence｜>"},
        "add_bos_token": True,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def one_error_line(result) -> str:
    """A failed CLI run printed exactly one ``Error:`` line first on stderr and no traceback; return that line."""
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error: "), result.output
    assert sum(line.startswith("Error") for line in lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Tiny tensors: on a busy machine OpenMP's fork/join costs far more than the work itself (import it to use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# CI sets DSV2_REQUIRE_KERNELS=1 (.ci/run): there a C++ compiler is expected, so a test that needs dsv2's kernels
# or the compiled steps fails instead of skipping, and the suite cannot lose those tests without anyone noticing.
REQUIRE_KERNELS = "DSV2_REQUIRE_KERNELS"


def kernels_required() -> bool:
    """Whether ``DSV2_REQUIRE_KERNELS`` is on (1, true, yes or on)."""
    return os.environ.get(REQUIRE_KERNELS, "").strip().lower() in ("1", "true", "yes", "on")


def skip_without_kernels(reason: str) -> NoReturn:
    """Skip a test that needs a C++ compiler or dsv2's kernels; fail instead under ``DSV2_REQUIRE_KERNELS=1``."""
    if kernels_required():
        pytest.fail(f"{reason} ({REQUIRE_KERNELS}=1: they are expected here)", pytrace=False)
    pytest.skip(reason)


def needs_kernels(available: bool, reason: str) -> pytest.MarkDecorator:
    """The mark for ``pytest.mark.skipif(not available, reason=...)`` that goes through :func:`skip_without_kernels`
    (tests/conftest.py applies it when each test is set up)."""
    return pytest.mark.needs_kernels(available=available, reason=reason)
