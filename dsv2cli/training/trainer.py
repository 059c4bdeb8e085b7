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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.nn import functional as F

from dsv2cli.analysis.balance import max_over_mean
from dsv2cli.analysis.token_drop import protected_sequences
from dsv2cli.commit import Output
from dsv2cli.errors import CheckpointError, InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.model import DeepseekV2
from dsv2cli.model.dtypes import parse_dtype
from dsv2cli.training import checkpointing
from dsv2cli.training.data import CorpusSplit, TextFile, batch_indices, evaluation_rows, load_corpus, pack, unigram_cross_entropy
from dsv2cli.training.routing import TrainingRoutingHook
from dsv2cli.training.settings import TrainSettings, build_config, check_memory, learning_rate, validate
from dsv2cli.training.tokenizer import save_tokenizer, train_bpe


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


def initialise(model: DeepseekV2, std: float, generator: torch.Generator) -> None:
    """Normal(0, std) for matrices, ones for RMSNorm weights."""
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


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
    base = None  # the architecture of a run that starts from a trained model: its config.json (after a resume: ours)
    if settings.init_from is not None:
        source = output if resumed_state is not None else Path(settings.init_from)
        base = checkpointing.check_init_source(source).to_hf("deepseek")
    target = Output.claim(output, kind="dir", replace=resume or overwrite, what="`out`", allow_empty=True)
    vocab = int(base["vocab_size"]) if base is not None else max(settings.vocab_size, 2)
    check_memory(build_config(settings, vocab, 0, 1, base), settings)  # before any slow work

    corpus = load_corpus(settings.inputs, settings.held_out, settings.seed, settings.include, settings.exclude)
    emit(TrainEvent("info", f"{len(corpus.train)} training files, {len(corpus.held_out)} held out, {corpus.skipped} skipped"))
    if resumed_state is not None and resumed_state["data_fingerprint"] != corpus.fingerprint():
        raise InputError("the training files changed since the checkpoint was written", hint="resume needs the same text")
    if resumed_state is not None:
        text_tokenizer = TextTokenizer.from_path(output)
    elif settings.init_from is not None:
        text_tokenizer = TextTokenizer.from_path(Path(settings.init_from))
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
        raise InputError("the held-out files are shorter than one sequence", hint="raise `held_out` or lower `seq_len`")
    eval_rows = held_rows[evaluation_rows(len(held_rows), settings.eval_tokens, settings.seq_len)]
    unigram = unigram_cross_entropy(train_rows, eval_rows[:, 1:], tokenizer.get_vocab_size())
    emit(TrainEvent("info", f"{train_rows.numel():,} training tokens, {eval_rows[:, 1:].numel():,} evaluation tokens"))

    config = build_config(settings, tokenizer.get_vocab_size(), bos_id, eos_id, base)
    if base is not None and config.vocab_size != base["vocab_size"]:
        raise InputError(f"{settings.init_from}: its tokenizer has {config.vocab_size} entries, its config {base['vocab_size']}")
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
    if settings.init_from is not None and resumed_state is None:
        read = checkpointing.read_initial_weights(Path(settings.init_from), model)
        emit(TrainEvent("info", f"starting from the weights of {settings.init_from} ({read})"))
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
