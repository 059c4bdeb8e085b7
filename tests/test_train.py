"""Training core: loss goes down, resume is bit-identical, checkpoints load in dsv2 and transformers, routing hook."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dsv2cli
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.errors import CheckpointError, InputError
from dsv2cli.model import DeepseekV2
from dsv2cli.presets import preset_config
from dsv2cli.training.data import batch_indices, evaluation_rows, pack, unigram_cross_entropy
from dsv2cli.training.routing import BalanceSettings, TrainingRoutingHook
from dsv2cli.training.settings import TrainSettings, learning_rate
from dsv2cli.training.trainer import train
from tests.helpers import assert_close_relative

# Real text: this package's own model sources.
CORPUS = str(Path(dsv2cli.__file__).parent / "model")

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "rope_scaling": None,
}


def settings(out: Path, **changes) -> TrainSettings:
    base = TrainSettings(
        inputs=[CORPUS],
        output=str(out),
        overrides=TINY,
        vocab_size=300,
        held_out=0.2,
        seq_len=32,
        batch_size=4,
        max_steps=12,
        warmup_steps=2,
        lr=3e-3,
        log_every=4,
        eval_every=6,
        eval_tokens=256,
        save_every=6,
        balance=BalanceSettings(
            expert_alpha=0.01, device_alpha=0.05, comm_alpha=0.02, devices=4, max_devices_per_token=2, capacity_factor=1.0
        ),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    events = []
    result = train(settings(out, max_steps=20, eval_every=20, log_every=5), on_event=events.append)
    return out, result, [e.report for e in events if e.kind == "step"]


def test_short_run_lowers_loss_and_reports_balance(trained):
    out, result, reports = trained
    assert result.steps == 20 and result.stopped_by == "max_steps"
    assert [r.step for r in reports] == [5, 10, 15, 20]
    assert reports[-1].loss < reports[0].loss - 0.5
    # An untrained model sits near ln(V) = 5.7 nats.
    assert result.eval_loss < 0.9 * torch.log(torch.tensor(300.0)).item()
    summary = json.loads((out / "training.json").read_text())
    assert summary["result"]["eval_loss"] == result.eval_loss
    assert result.device_balance is not None and result.comm_balance is not None
    assert 0.0 <= result.drop_rate < 0.5
    assert set(result.load_max_over_mean) == {1}


def test_checkpoint_is_hf_layout_with_device_limited_routing(trained):
    out, _, _ = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2"
    assert (config["topk_method"], config["n_group"], config["topk_group"]) == ("group_limited_greedy", 4, 2)
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and "chat_template" in tok
    weights = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in weights
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.rglob("*"))


def test_checkpoint_logits_match_transformers(trained):
    transformers = pytest.importorskip("transformers")
    out, _, _ = trained
    ours = load_checkpoint(out)
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(2, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_relative(ours(tokens), ref(tokens).logits)


def test_transformers_tokenizer_reads_our_files(trained):
    transformers = pytest.importorskip("transformers")
    out, _, _ = trained
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("def forward(self, x):")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "def forward(self, x):"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:"


def test_resume_is_bit_identical(tmp_path):
    whole = train(settings(tmp_path / "whole", max_steps=8))
    stopped = train(settings(tmp_path / "parts", max_steps=8, stop_after=3))
    assert stopped.steps == 3 and stopped.stopped_by == "stop_after"
    resumed = train(TrainSettings(inputs=[], output=str(tmp_path / "parts")), resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 8
    a = load_file(str(tmp_path / "whole" / "trainer" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "trainer" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.eval_loss == whole.eval_loss
    assert (
        load_file(str(tmp_path / "whole" / "trainer" / "optimizer.safetensors")).keys()
        == load_file(str(tmp_path / "parts" / "trainer" / "optimizer.safetensors")).keys()
    )


def test_resume_can_move_the_end_of_the_schedule(tmp_path):
    # A run slower than planned: resumed with a nearer end, it still decays to the floor, and the new end is saved.
    train(settings(tmp_path / "run", max_steps=12, stop_after=3))
    resumed = train(TrainSettings(inputs=[], output=str(tmp_path / "run")), resume=True, resume_max_steps=6)
    assert resumed.resumed_from == 3 and resumed.steps == resumed.max_steps == 6 and resumed.stopped_by == "max_steps"
    saved = json.loads((tmp_path / "run" / "training.json").read_text())["settings"]
    assert saved["max_steps"] == 6
    assert learning_rate(5, TrainSettings(**{**saved, "balance": BalanceSettings()})) == pytest.approx(
        3e-3 * 0.1 + 3e-3 * 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    )
    with pytest.raises(CheckpointError, match="past max_steps"):
        train(TrainSettings(inputs=[], output=str(tmp_path / "run")), resume=True, resume_max_steps=5)


def test_refuses_to_overwrite_and_to_resume_changed_text(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        train(settings(tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    corpus = tmp_path / "text"
    corpus.mkdir()
    for f in Path(CORPUS).glob("*.py"):
        (corpus / f.name).write_text(f.read_text())
    train(settings(tmp_path / "run", inputs=[str(corpus)], stop_after=2))
    (corpus / "moe.py").write_text("changed\n" * 100)
    with pytest.raises(InputError, match="changed"):
        train(TrainSettings(inputs=[], output=str(tmp_path / "run")), resume=True)


def test_bfloat16_training_and_export(tmp_path):
    result = train(settings(tmp_path / "bf16", dtype="bfloat16", max_steps=3, eval_every=3))
    assert result.eval_loss is not None
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert weights["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # router stays float32
    assert load_checkpoint(tmp_path / "bf16").config.torch_dtype == "bfloat16"


def test_learning_rate_schedule():
    s = settings(Path("unused"), lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, s) == pytest.approx(0.1)
    assert learning_rate(9, s) == pytest.approx(1.0)
    assert learning_rate(60, s) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(110, s) == pytest.approx(0.1)


def test_data_order_and_packing():
    rows = pack([[5, 6, 7], [8, 9]], seq_len=3, bos_id=0, eos_id=1)
    assert rows.tolist() == [[0, 5, 6, 7], [1, 0, 8, 9]]  # the tail [1] is dropped
    a = batch_indices(10, 3, step=4, seed=1)
    assert torch.equal(a, batch_indices(10, 3, step=4, seed=1))
    epoch = torch.cat([batch_indices(10, 3, step=i, seed=1) for i in range(3)])
    assert len(set(epoch.tolist())) == 9  # no row twice within an epoch
    assert evaluation_rows(100, 640, 64).tolist() == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    train_rows = torch.tensor([[0, 2, 2, 3]])  # targets 2, 2, 3 -> counts +1 smoothing over V = 4: [1, 1, 3, 2] / 7
    assert unigram_cross_entropy(train_rows, torch.tensor([3]), 4) == pytest.approx(-torch.log(torch.tensor(2 / 7)).item())


def test_routing_hook_drops_and_adds_losses():
    config = preset_config("tiny")  # 16 experts in 4 groups, top-4 of the best 2 groups
    torch.manual_seed(0)
    model = DeepseekV2(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    tokens = torch.randint(0, config.vocab_size, (4, 16))
    plain = TrainingRoutingHook(BalanceSettings(expert_alpha=0.1, devices=4, max_devices_per_token=2))
    model(tokens, routing_hook=plain)
    assert plain.record.aux_loss is not None and plain.record.aux_loss.requires_grad
    assert plain.record.aux_loss.item() == pytest.approx(0.1 * sum(plain.record.expert_terms), rel=1e-5)
    assert plain.record.dropped == 0
    protected = torch.zeros(64, dtype=torch.bool)
    protected[:16] = True
    dropping = TrainingRoutingHook(
        BalanceSettings(devices=4, max_devices_per_token=2, capacity_factor=0.5), protected=protected, drop=True
    )
    logits = model(tokens, routing_hook=dropping)
    assert dropping.record.aux_loss is None  # every alpha is 0
    assert dropping.record.dropped > 0 and torch.isfinite(logits).all()
    with torch.no_grad():
        assert not torch.allclose(logits, model(tokens))


def test_init_from_starts_at_the_source_model(trained, tmp_path):
    # A new run on other text from a trained model: its architecture, tokenizer and weights, not fresh ones.
    source, _, _ = trained
    corpus = tmp_path / "text"
    corpus.mkdir()
    for f in sorted(Path(CORPUS).parent.joinpath("inference").glob("*.py")):
        (corpus / f.name).write_text(f.read_text())
    fresh = settings(tmp_path / "x", inputs=[str(corpus)], overrides={}, max_steps=1, eval_every=1, lr=1e-12)
    started = train(dataclasses.replace(fresh, output=str(tmp_path / "tuned"), init_from=str(source)))
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "tuned" / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    before = load_file(str(source / "trainer" / "model.safetensors"))
    after = load_file(str(tmp_path / "tuned" / "trainer" / "model.safetensors"))
    for name in before:  # one step at a negligible learning rate
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-9, msg=name)
    # Without the trainer's master weights, the exported model.safetensors is read (a model from elsewhere).
    exported = tmp_path / "exported"
    exported.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (exported / name).write_bytes((source / name).read_bytes())
    again = train(dataclasses.replace(fresh, output=str(tmp_path / "tuned2"), init_from=str(exported)))
    assert again.eval_loss == pytest.approx(started.eval_loss, abs=1e-5)
    scratch = train(dataclasses.replace(fresh, output=str(tmp_path / "scratch"), overrides=TINY))
    assert started.eval_loss < scratch.eval_loss - 0.5  # a fresh model of the same shape knows nothing yet
    # A resumed run keeps its own weights and architecture, even once the source is gone.
    stopped = train(
        dataclasses.replace(fresh, output=str(tmp_path / "parts"), init_from=str(exported), max_steps=3, stop_after=1)
    )
    assert stopped.steps == 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (exported / name).unlink()
    resumed = train(TrainSettings(inputs=[], output=str(tmp_path / "parts")), resume=True)
    assert resumed.resumed_from == 1 and resumed.steps == 3


def test_init_from_refuses_what_it_cannot_start_from(trained, tmp_path):
    source, _, _ = trained
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(InputError, match="no tokenizer.json"):
        train(settings(tmp_path / "a", init_from=str(no_tokenizer)))
    (no_tokenizer / "tokenizer.json").write_text((source / "tokenizer.json").read_text())
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        train(settings(tmp_path / "b", init_from=str(no_tokenizer)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
