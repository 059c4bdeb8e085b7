"""`dsv2 train`'s core: build a DeepSeek-V2 model, train it on local text, evaluate, checkpoint, resume.

AdamW with linear warm-up then cosine decay, gradient clipping, the paper's balance losses and device-level
token dropping through the routing hook (spec §5). A resumed run continues bit-identically: the data order
is a function of ``(seed, step)``, and weights, optimizer moments and the RNG state are restored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.nn import functional as F

from dsv2cli.analysis.balance import max_over_mean
from dsv2cli.analysis.params import count_params
from dsv2cli.analysis.token_drop import protected_sequences
from dsv2cli.checkpoint.fit import available_memory, gb
from dsv2cli.checkpoint.loader import parse_dtype
from dsv2cli.commit import Output
from dsv2cli.config import ModelConfig
from dsv2cli.errors import CheckpointError, InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2
from dsv2cli.presets import preset_hf_config
from dsv2cli.training import checkpointing
from dsv2cli.training.data import CorpusSplit, TextFile, batch_indices, evaluation_rows, load_corpus, pack, unigram_cross_entropy
from dsv2cli.training.routing import BalanceSettings, TrainingRoutingHook
from dsv2cli.training.tokenizer import save_tokenizer, train_bpe
from dsv2cli.untrusted import is_int, is_number


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a run; stored in the checkpoint so ``--resume`` repeats it exactly."""

    inputs: list[str]
    output: str
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config.json fields on top of the preset
    vocab_size: int = 4096
    tokenizer: str | None = None  # reuse this tokenizer instead of training one
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    held_out: float = 0.05
    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 1000
    max_time: float | None = None  # seconds of this invocation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"
    save_dtype: str | None = None  # dtype of the exported model.safetensors (default: dtype)
    init_std: float = 0.02
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 32768
    save_every: int = 200
    balance: BalanceSettings = field(default_factory=BalanceSettings)
    protect_fraction: float = 0.1
    drop_at_eval: bool = False
    command: str | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as an interruption would

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "settings") -> TrainSettings:
        """Settings saved by :meth:`to_json`, every field's type checked (a saved state is untrusted input)."""
        values = _typed_fields(cls, data, where)
        values["balance"] = BalanceSettings(**_typed_fields(BalanceSettings, data.get("balance", {}), f"{where}.balance"))
        return cls(**values)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": is_int,
    "float": is_number,
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}


def _typed_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data``'s fields for the dataclass ``cls``, each checked against the field's annotation."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be an object")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise CheckpointError(f"{where}: unknown field '{key}'")
        kind = str(known[key].type)
        if kind == "BalanceSettings":
            continue
        optional = kind.endswith(" | None")
        if not ((optional and value is None) or _CHECKS[kind.removesuffix(" | None")](value)):
            raise CheckpointError(f"{where}: field '{key}' must be of type {kind}, not {json.dumps(value)[:40]}")
        values[key] = value
    missing = [
        f.name
        for f in known.values()
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CheckpointError(f"{where}: missing field '{missing[0]}'")
    return values


@dataclass(frozen=True)
class StepReport:
    """What the progress display shows after a logging window."""

    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_second: float
    expert_balance: float
    device_balance: float | None
    comm_balance: float | None
    drop_rate: float | None
    load_max_over_mean: dict[int, float]  # MoE layer -> max/mean expert load in the window


@dataclass(frozen=True)
class TrainEvent:
    kind: str  # "info", "start", "step", "eval", "save"
    message: str = ""
    step: int = 0
    max_steps: int = 0
    report: StepReport | None = None
    eval_loss: float | None = None


@dataclass(frozen=True)
class TrainResult:
    output: str
    steps: int
    max_steps: int
    stopped_by: str  # "max_steps", "max_time" or "stop_after"
    tokens_seen: int
    seconds: float
    parameters: int
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    unigram_loss: float
    eval_tokens: int
    expert_balance: float | None
    device_balance: float | None
    comm_balance: float | None
    drop_rate: float | None
    load_max_over_mean: dict[int, float]
    eval_history: list[tuple[int, float]]
    resumed_from: int | None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["load_max_over_mean"] = {str(k): v for k, v in self.load_max_over_mean.items()}
        return data


def build_config(settings: TrainSettings, vocab_size: int, bos_id: int | None, eos_id: int | None) -> ModelConfig:
    """Preset + overrides + tokenizer ids + device-limited routing (``group_limited_greedy`` with D groups, M kept)."""
    hf = preset_hf_config(settings.preset)
    hf.update(settings.overrides)
    hf.update(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id)
    hf["max_position_embeddings"] = max(int(hf.get("max_position_embeddings") or 0), settings.seq_len)
    b = settings.balance
    if b.devices > 1:
        hf.update(topk_method="group_limited_greedy", n_group=b.devices, topk_group=b.max_devices_per_token)
    hf.update(aux_loss_alpha=b.expert_alpha, seq_aux=b.per_sequence)  # what the HF remote code would train with
    hf["torch_dtype"] = settings.save_dtype or settings.dtype
    return ModelConfig.from_hf(hf)


def initialise(model: DeepseekV2, std: float, generator: torch.Generator) -> None:
    """Normal(0, std) for matrices, ones for RMSNorm weights."""
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    s = settings
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    floor = s.lr * s.min_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def validate(settings: TrainSettings) -> None:
    s, b = settings, settings.balance
    checks = [
        (s.seq_len >= 2, "--seq-len must be at least 2"),
        (s.batch_size >= 1, "--batch-size must be at least 1"),
        (s.max_steps >= 1, "--max-steps must be at least 1"),
        (s.max_time is None or s.max_time > 0, "--max-time must be positive"),
        (s.lr > 0, "--lr must be positive"),
        (0 <= s.min_lr_ratio <= 1, "--min-lr-ratio must be between 0 and 1"),
        (s.warmup_steps >= 0, "--warmup-steps must not be negative"),
        (s.grad_clip >= 0, "--grad-clip must not be negative (0 turns clipping off)"),
        (s.eval_every >= 1 and s.save_every >= 1 and s.log_every >= 1, "--eval-every, --save-every, --log-every must be >= 1"),
        (s.eval_tokens >= s.seq_len, "--eval-tokens must be at least --seq-len"),
        (min(b.expert_alpha, b.device_alpha, b.comm_alpha) >= 0, "balance loss weights must not be negative"),
        (b.devices >= 1, "--devices must be at least 1"),
        (1 <= b.max_devices_per_token <= b.devices, "--max-devices-per-token must be between 1 and --devices"),
        (b.capacity_factor is None or b.capacity_factor > 0, "--capacity-factor must be positive"),
        (0 <= s.protect_fraction <= 1, "--protect-fraction must be between 0 and 1"),
    ]
    floats = {"--lr": s.lr, "--min-lr-ratio": s.min_lr_ratio, "--weight-decay": s.weight_decay, "--grad-clip": s.grad_clip}
    floats |= {"--init-std": s.init_std, "--held-out": s.held_out, "--protect-fraction": s.protect_fraction}
    floats |= {"beta1": s.beta1, "beta2": s.beta2, "--expert-alpha": b.expert_alpha, "--device-alpha": b.device_alpha}
    floats |= {"--comm-alpha": b.comm_alpha, "--capacity-factor": b.capacity_factor or 1.0, "--max-time": s.max_time or 1.0}
    for flag, value in floats.items():
        if not math.isfinite(value):
            raise InputError(f"{flag} must be a finite number, got {value}")
    checks += [
        (s.weight_decay >= 0, "--weight-decay must not be negative"),
        (s.init_std > 0, "--init-std must be positive"),
        (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
        (0 <= s.seed < 1 << 63, "--seed must be between 0 and 2**63 - 1"),
        (
            s.max_steps < 1 << 40 and s.seq_len <= 1 << 20 and s.batch_size <= 1 << 20,
            "--max-steps, --seq-len or --batch-size is absurdly large",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    parse_dtype(s.dtype)
    if s.save_dtype:
        parse_dtype(s.save_dtype)


def _check_memory(config: ModelConfig, settings: TrainSettings) -> None:
    """Refuse a run whose weights, gradients, AdamW moments and activations exceed the memory that can be allocated."""
    itemsize = parse_dtype(settings.dtype).itemsize
    need = count_params(config).total * (2 * itemsize + 8)  # weights + gradients in dtype, two float32 moments
    # A rough floor for what backward keeps per token: block inputs, norms, attention and MLP activations,
    # and the float32 logits with their softmax.
    tokens = settings.batch_size * settings.seq_len
    mlp = max(
        config.intermediate_size, config.moe_intermediate_size * (config.num_experts_per_tok + (config.n_shared_experts or 0))
    )
    heads = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    per_layer = 8 * config.hidden_size + 3 * mlp + 3 * heads
    need += tokens * (config.num_hidden_layers * per_layer * itemsize + 3 * 4 * config.vocab_size)
    available = available_memory()
    if need > available.bytes:
        raise InputError(
            f"training this model needs at least {gb(need)} (weights, gradients, AdamW moments and activations); {available.source} leaves {gb(available.bytes)}",
            hint="choose smaller sizes (--hidden-size, --layers, --experts, --vocab-size) or a smaller --batch-size / --seq-len",
        )


def train(
    settings: TrainSettings,
    on_event: Callable[[TrainEvent], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    resume_max_steps: int | None = None,
) -> TrainResult:
    """Train (or continue training) and return the final numbers; the output directory is checkpointed on the way.

    An existing non-empty output directory is refused unless ``resume`` (continue it) or ``overwrite``
    (replace it at the first checkpoint). ``resume_max_steps`` moves a resumed run's end (where the cosine
    decay ends) so that a run slower than planned still anneals; the learning rate follows the new schedule
    from the resumed step on.
    """
    emit = on_event or (lambda event: None)
    output = Path(settings.output)
    resumed_state = None
    if resume:  # the run continues where it is now, whatever directory it was first written to
        resumed_state = checkpointing.read_trainer_state(output)
        saved = TrainSettings.from_json(resumed_state["settings"], f"{checkpointing.TRAINER_DIR}/{checkpointing.STATE_FILE}")
        settings = dataclasses.replace(saved, output=str(output), max_time=settings.max_time, stop_after=settings.stop_after)
        if resume_max_steps is not None:
            settings = dataclasses.replace(settings, max_steps=resume_max_steps)
        if resumed_state["step"] > settings.max_steps:
            raise CheckpointError(f"{output}: the saved step {resumed_state['step']} is past max_steps {settings.max_steps}")
    validate(settings)
    target = Output.claim(output, kind="dir", replace=resume or overwrite, what="--out", allow_empty=True)
    _check_memory(build_config(settings, max(settings.vocab_size, 2), 0, 1), settings)  # before any slow work

    corpus = load_corpus(settings.inputs, settings.held_out, settings.seed, settings.include, settings.exclude)
    emit(TrainEvent("info", f"{len(corpus.train)} training files, {len(corpus.held_out)} held out, {corpus.skipped} skipped"))
    if resumed_state is not None and resumed_state["data_fingerprint"] != corpus.fingerprint():
        raise InputError("the training files changed since the checkpoint was written", hint="resume needs the same text")
    if resumed_state is not None:
        text_tokenizer = TextTokenizer.from_path(output)
    elif settings.tokenizer:
        text_tokenizer = TextTokenizer.from_path(Path(settings.tokenizer))
    else:
        emit(TrainEvent("info", f"training a byte-level BPE tokenizer ({settings.vocab_size} entries)"))
        text_tokenizer = TextTokenizer.bare(train_bpe([f.text for f in corpus.train], settings.vocab_size))
    tokenizer, bos_id, eos_id = text_tokenizer.tokenizer, text_tokenizer.bos_id, text_tokenizer.eos_id

    def encode(files: list[TextFile]) -> torch.Tensor:
        docs = [e.ids for e in tokenizer.encode_batch([f.text for f in files], add_special_tokens=False)]
        return pack(docs, settings.seq_len, bos_id, eos_id)

    train_rows, held_rows = encode(corpus.train), encode(corpus.held_out)
    if len(held_rows) == 0:
        raise InputError("the held-out files are shorter than one sequence", hint="raise --held-out or lower --seq-len")
    eval_rows = held_rows[evaluation_rows(len(held_rows), settings.eval_tokens, settings.seq_len)]
    unigram = unigram_cross_entropy(train_rows, eval_rows[:, 1:], tokenizer.get_vocab_size())
    emit(TrainEvent("info", f"{train_rows.numel():,} training tokens, {eval_rows[:, 1:].numel():,} evaluation tokens"))

    config = build_config(settings, tokenizer.get_vocab_size(), bos_id, eos_id)
    dtype = parse_dtype(settings.dtype)
    export_name = settings.save_dtype or settings.dtype
    generator = torch.Generator().manual_seed(settings.seed)
    model = DeepseekV2(config)
    initialise(model, settings.init_std, generator)
    model.to(dtype)
    for layer in model.layers:  # router weights stay float32 (spec §4.2)
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            gate.weight.data = gate.weight.data.float()
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
    )
    start, history, elapsed_before = 0, [], 0.0
    if resumed_state is not None:
        checkpointing.restore_training(output, model, optimizer, resumed_state)
        start, elapsed_before = resumed_state["step"], resumed_state["seconds"]
        history = [tuple(x) for x in resumed_state["eval_history"]]
    parameters = sum(p.numel() for p in model.parameters())
    run = _Run(settings, target, model, optimizer, tokenizer, train_rows, eval_rows, corpus, unigram, parameters, emit)
    return run.loop(
        start,
        history,
        elapsed_before,
        resumed_from=start if resumed_state else None,
        export=(parse_dtype(export_name), export_name),
    )


class _Run:
    """The training loop and its bookkeeping (kept apart from :func:`train`, which only prepares things)."""

    def __init__(
        self,
        settings: TrainSettings,
        target: Output,
        model: DeepseekV2,
        optimizer: torch.optim.Optimizer,
        tokenizer: Tokenizer,
        train_rows: torch.Tensor,
        eval_rows: torch.Tensor,
        corpus: CorpusSplit,
        unigram: float,
        parameters: int,
        emit: Callable[[TrainEvent], None],
    ) -> None:
        self.s, self.model, self.optimizer, self.tokenizer = settings, model, optimizer, tokenizer
        self.train_rows, self.eval_rows, self.corpus, self.unigram = train_rows, eval_rows, corpus, unigram
        self.parameters, self.emit, self.target = parameters, emit, target
        self.window: list[Any] = []

    def loop(
        self,
        start: int,
        history: list[tuple[int, float]],
        elapsed_before: float,
        resumed_from: int | None,
        export: tuple[torch.dtype, str],
    ) -> TrainResult:
        s, model = self.s, self.model
        self.emit(TrainEvent("start", f"{self.parameters:,} parameters", step=start, max_steps=s.max_steps))
        began = time.perf_counter()
        last_report: StepReport | None = None
        eval_loss = history[-1][1] if history else None
        totals = {"dropped": 0, "assignments": 0}
        stopped_by, done = "max_steps", start
        window_start = time.perf_counter()
        for step in range(start, s.max_steps):
            model.train()
            lr = learning_rate(step, s)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.train_rows[batch_indices(len(self.train_rows), s.batch_size, step, s.seed)]  # [B, S+1]
            hook = self._hook(step, batch.shape[0], drop=True)
            logits = model(batch[:, :-1], routing_hook=hook)  # [B, S, V]
            ce = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss = ce if hook.record.aux_loss is None else ce + hook.record.aux_loss
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            totals["dropped"] += hook.record.dropped
            totals["assignments"] += hook.record.assignments
            self.window.append((float(ce.detach()), hook.record))
            done = step + 1
            if done % s.log_every == 0 or done == s.max_steps:
                now = time.perf_counter()
                last_report = self._report(done, lr, now - window_start)
                window_start = now
                self.emit(TrainEvent("step", step=done, max_steps=s.max_steps, report=last_report))
            out_of_time = s.max_time is not None and time.perf_counter() - began >= s.max_time
            stop_here = s.stop_after is not None and done >= s.stop_after
            if done % s.eval_every == 0 or done == s.max_steps or out_of_time or stop_here:
                eval_loss = self.evaluate()
                history.append((done, eval_loss))
                self.emit(TrainEvent("eval", step=done, max_steps=s.max_steps, eval_loss=eval_loss))
            if out_of_time or stop_here:
                stopped_by = "max_time" if out_of_time else "stop_after"
                break
            if done % s.save_every == 0 and done != s.max_steps:
                self._save(done, elapsed_before + time.perf_counter() - began, history, export, None)
        if self.window:  # steps since the last log line (a stop between logging points)
            last_report = self._report(done, learning_rate(done - 1, s), time.perf_counter() - window_start)
        seconds = elapsed_before + time.perf_counter() - began
        result = self._result(done, stopped_by, seconds, history, eval_loss, last_report, totals, resumed_from)
        self._save(done, seconds, history, export, result)
        return result

    def _hook(self, step: int, batch_size: int, drop: bool) -> TrainingRoutingHook:
        s = self.s
        protected = None
        if drop and s.balance.capacity_factor is not None:
            generator = torch.Generator().manual_seed(s.seed * 7_919 + step)
            protected = protected_sequences(batch_size, s.protect_fraction, generator).repeat_interleave(s.seq_len)
        return TrainingRoutingHook(s.balance, protected, drop=drop)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (nats) on the held-out rows; no dropping unless ``drop_at_eval``."""
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.eval_rows), self.s.batch_size):
            rows = self.eval_rows[start : start + self.s.batch_size]
            hook = self._hook(0, rows.shape[0], drop=self.s.drop_at_eval) if self.s.drop_at_eval else None
            logits = self.model(rows[:, :-1], routing_hook=hook)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
            count += rows[:, 1:].numel()
        return total / count

    def _report(self, step: int, lr: float, seconds: float) -> StepReport:
        records = [r for _, r in self.window]
        losses = [loss for loss, _ in self.window]
        load: dict[int, torch.Tensor] = {}
        for r in records:
            for layer, counts in r.load.items():
                load[layer] = load.get(layer, 0) + counts

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        dropped = sum(r.dropped for r in records)
        assignments = sum(r.assignments for r in records)
        tokens = len(self.window) * self.s.batch_size * self.s.seq_len
        report = StepReport(
            step=step,
            max_steps=self.s.max_steps,
            loss=sum(losses) / len(losses),
            lr=lr,
            tokens_per_second=tokens / max(seconds, 1e-9),
            expert_balance=mean([v for r in records for v in r.expert_terms]) or 0.0,
            device_balance=mean([v for r in records for v in r.device_terms]),
            comm_balance=mean([v for r in records for v in r.comm_terms]),
            drop_rate=dropped / assignments if assignments else None,
            load_max_over_mean={layer: float(max_over_mean(c)) for layer, c in sorted(load.items())},
        )
        self.window = []
        return report

    def _result(
        self,
        step: int,
        stopped_by: str,
        seconds: float,
        history: list[tuple[int, float]],
        eval_loss: float | None,
        report: StepReport | None,
        totals: dict[str, int],
        resumed_from: int | None,
    ) -> TrainResult:
        return TrainResult(
            output=self.s.output,
            steps=step,
            max_steps=self.s.max_steps,
            stopped_by=stopped_by,
            tokens_seen=step * self.s.batch_size * self.s.seq_len,
            seconds=seconds,
            parameters=self.parameters,
            train_loss=report.loss if report else None,
            eval_loss=eval_loss,
            eval_perplexity=math.exp(eval_loss) if eval_loss is not None else None,
            unigram_loss=self.unigram,
            eval_tokens=self.eval_rows[:, 1:].numel(),
            expert_balance=report.expert_balance if report else None,
            device_balance=report.device_balance if report else None,
            comm_balance=report.comm_balance if report else None,
            drop_rate=totals["dropped"] / totals["assignments"] if totals["assignments"] else None,
            load_max_over_mean=report.load_max_over_mean if report else {},
            eval_history=list(history),
            resumed_from=resumed_from,
        )

    def _save(
        self,
        step: int,
        seconds: float,
        history: list[tuple[int, float]],
        export: tuple[torch.dtype, str],
        result: TrainResult | None,
    ) -> None:
        s = self.s
        state = {
            "step": step,
            "seconds": seconds,
            "settings": s.to_json(),
            "data_fingerprint": self.corpus.fingerprint(),
            "eval_history": history,
        }
        summary = {
            "command": s.command,
            "settings": s.to_json(),
            "corpus": {
                "train_files": len(self.corpus.train),
                "held_out_files": [str(f.path) for f in self.corpus.held_out],
                "train_tokens": self.train_rows[:, 1:].numel(),
            },
            "result": result.to_json() if result else {"step": step, "seconds": seconds, "eval_history": history},
        }

        def extra(directory: Path) -> None:
            save_tokenizer(self.tokenizer, directory, model_max_length=self.model.config.max_position_embeddings)
            (directory / "training.json").write_text(json.dumps(summary, indent=2) + "\n")

        checkpointing.save_checkpoint(self.target, extra, self.model, self.optimizer, state, *export)
        self.emit(TrainEvent("save", f"checkpoint at step {step}", step=step, max_steps=s.max_steps))
