"""`dsv2 train`: train a small DeepSeek-V2 from scratch on local text, with the paper's balance losses and token dropping."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dsv2cli.checkpoint.resolve import resolve_checkpoint
from dsv2cli.cli.common import emit_json, err, handle_errors, human_count, out
from dsv2cli.cli.options import Format, TextOrJson, ThreadsOption
from dsv2cli.errors import InputError
from dsv2cli.training.routing import BalanceSettings
from dsv2cli.training.settings import TrainSettings
from dsv2cli.training.trainer import StepReport, TrainEvent, TrainResult, train

EPILOG = (
    "Examples:\n\n"
    "  dsv2 train ./my_code --include '*.py' --out ./tiny-code --max-steps 300\n\n"
    "  dsv2 train 'notes/**/*.md' --out ./m --experts 16 --top-k 2 --devices 4 --max-devices-per-token 2 "
    "--expert-alpha 0.01 --device-alpha 0.05 --comm-alpha 0.02 --capacity-factor 1.0\n\n"
    "  dsv2 train --resume ./tiny-code --max-time 600\n\n"
    "  dsv2 train ./more_code --include '*.py' --init-from ./tiny-code --out ./tiny-code-2 --lr 5e-4 --max-steps 200\n\n"
    "The output directory is in Hugging Face layout (config.json, model.safetensors, tokenizer.json): "
    "`dsv2 generate --model DIR` and transformers' DeepseekV2ForCausalLM load it. See docs/train.md."
)

VOCAB_SIZE = 4096  # --vocab-size's default

# CLI flag -> HF config.json field.
_SIZE_FLAGS = {
    "hidden_size": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size",
    "experts": "n_routed_experts",
    "shared_experts": "n_shared_experts",
    "top_k": "num_experts_per_tok",
    "first_dense": "first_k_dense_replace",
    "kv_lora_rank": "kv_lora_rank",
    "q_lora_rank": "q_lora_rank",
}


def _parse_set(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got '{item}'", hint="for example --set qk_rope_head_dim=16")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


@handle_errors
def train_command(
    inputs: list[str] = typer.Argument(None, help="Text files, directories (walked recursively) or globs.", show_default=False),
    output: Path = typer.Option(None, "--out", "-o", help="Output directory (HF layout + trainer state)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this output directory exactly where it stopped."),
    init_from: Path = typer.Option(
        None,
        "--init-from",
        help="Start from this trained model (a float HF-layout directory, or demo): its architecture, tokenizer and weights.",
        show_default=False,
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty --out directory."),
    include: list[str] = typer.Option([], "--include", help="Only files matching this glob inside directories (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip paths matching this glob (repeatable)."),
    held_out: float = typer.Option(0.05, "--held-out", help="Fraction of files held out for evaluation."),
    preset: str = typer.Option("tiny", "--preset", help="Architecture preset to start from (see `dsv2 info`)."),
    hidden_size: int = typer.Option(None, "--hidden-size", help="Model width.", show_default=False),
    layers: int = typer.Option(None, "--layers", help="Number of layers.", show_default=False),
    heads: int = typer.Option(None, "--heads", help="Attention heads.", show_default=False),
    intermediate_size: int = typer.Option(None, "--intermediate-size", help="Dense MLP width.", show_default=False),
    moe_intermediate_size: int = typer.Option(None, "--moe-intermediate-size", help="Expert width.", show_default=False),
    experts: int = typer.Option(None, "--experts", help="Routed experts per MoE layer.", show_default=False),
    shared_experts: int = typer.Option(None, "--shared-experts", help="Shared experts.", show_default=False),
    top_k: int = typer.Option(None, "--top-k", help="Routed experts per token.", show_default=False),
    first_dense: int = typer.Option(None, "--first-dense", help="Leading dense layers.", show_default=False),
    kv_lora_rank: int = typer.Option(None, "--kv-lora-rank", help="MLA latent size.", show_default=False),
    q_lora_rank: int = typer.Option(None, "--q-lora-rank", help="MLA query compression (0 = none).", show_default=False),
    set_: list[str] = typer.Option([], "--set", help="Any config.json field, KEY=VALUE (JSON value; repeatable)."),
    vocab_size: int = typer.Option(VOCAB_SIZE, "--vocab-size", help="Size of the byte-level BPE vocabulary to train."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Reuse this tokenizer.json (or a directory holding one)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per step."),
    max_steps: int = typer.Option(
        None,
        "--max-steps",
        help="Steps of the schedule (cosine decay ends here). Default 1000; with --resume: move the end of the saved schedule.",
        show_default=False,
    ),
    max_time: float = typer.Option(None, "--max-time", help="Stop (and checkpoint) after this many seconds.", show_default=False),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", help="Linear warm-up steps."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Final LR as a fraction of the peak."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (matrices only)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient-norm clip (0 = off)."),
    dtype: str = typer.Option("float32", "--dtype", help="Training dtype: float32 or bfloat16."),
    save_dtype: str = typer.Option(
        None, "--save-dtype", help="dtype of the exported weights (default: --dtype).", show_default=False
    ),
    init_std: float = typer.Option(0.02, "--init-std", help="Std of the normal weight init."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, split and data order."),
    expert_alpha: float = typer.Option(0.0, "--expert-alpha", help="α1, expert-level balance loss weight (0 = off)."),
    device_alpha: float = typer.Option(0.0, "--device-alpha", help="α2, device-level balance loss weight (0 = off)."),
    comm_alpha: float = typer.Option(0.0, "--comm-alpha", help="α3, communication balance loss weight (0 = off)."),
    devices: int = typer.Option(1, "--devices", help="D: experts split into D contiguous device groups."),
    max_devices_per_token: int = typer.Option(
        1, "--max-devices-per-token", help="M: device-limited routing (top-K inside the best M devices)."
    ),
    capacity_factor: float = typer.Option(
        None,
        "--capacity-factor",
        help="Device-level token dropping budget (1.0 = average load; unset = no dropping).",
        show_default=False,
    ),
    protect_fraction: float = typer.Option(0.1, "--protect-fraction", help="Fraction of sequences never dropped."),
    drop_at_eval: bool = typer.Option(False, "--drop-at-eval", help="Also drop tokens when evaluating."),
    log_every: int = typer.Option(10, "--log-every", help="Steps per progress line."),
    eval_every: int = typer.Option(100, "--eval-every", help="Steps between held-out evaluations."),
    eval_tokens: int = typer.Option(32768, "--eval-tokens", help="Held-out tokens per evaluation."),
    save_every: int = typer.Option(200, "--save-every", help="Steps between checkpoints."),
    threads: ThreadsOption = None,
    format: TextOrJson = Format.text,
) -> None:
    """Train a DeepSeek-V2 (MLA + DeepSeekMoE) from scratch on local text, with balance losses and token dropping."""
    if threads is not None:
        if threads < 1:
            raise InputError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    if resume is not None and init_from is not None:
        raise InputError("--init-from starts a new run; --resume continues one", hint="pass one of them")
    if resume is not None:
        settings = TrainSettings(inputs=[], output=str(resume), max_time=max_time)
    else:
        if not inputs:
            raise InputError("no training text given", hint="pass files, directories or globs, or --resume DIR")
        if output is None:
            raise InputError("--out is required", hint="for example --out ./my-model")
        sizes = {"hidden_size": hidden_size, "layers": layers, "heads": heads, "intermediate_size": intermediate_size}
        sizes |= {"moe_intermediate_size": moe_intermediate_size, "experts": experts, "shared_experts": shared_experts}
        sizes |= {"top_k": top_k, "first_dense": first_dense, "kv_lora_rank": kv_lora_rank, "q_lora_rank": q_lora_rank}
        overrides = {_SIZE_FLAGS[k]: v for k, v in sizes.items() if v is not None}
        if init_from is not None:
            _check_init_from(overrides, set_, tokenizer, preset, vocab_size)
            init_from = resolve_checkpoint(str(init_from), download=False, what="`init_from`")[1]
        if overrides.get("q_lora_rank") == 0:
            overrides["q_lora_rank"] = None
        if "num_attention_heads" in overrides:
            overrides["num_key_value_heads"] = overrides["num_attention_heads"]
        overrides |= _parse_set(set_)
        settings = TrainSettings(
            inputs=list(inputs),
            output=str(output),
            preset=preset,
            overrides=overrides,
            vocab_size=vocab_size,
            tokenizer=str(tokenizer) if tokenizer else None,
            init_from=str(init_from) if init_from else None,
            include=list(include),
            exclude=list(exclude),
            held_out=held_out,
            seq_len=seq_len,
            batch_size=batch_size,
            max_steps=1000 if max_steps is None else max_steps,
            max_time=max_time,
            lr=lr,
            min_lr_ratio=min_lr_ratio,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            dtype=dtype,
            save_dtype=save_dtype,
            init_std=init_std,
            seed=seed,
            log_every=log_every,
            eval_every=eval_every,
            eval_tokens=eval_tokens,
            save_every=save_every,
            balance=BalanceSettings(
                expert_alpha=expert_alpha,
                device_alpha=device_alpha,
                comm_alpha=comm_alpha,
                devices=devices,
                max_devices_per_token=max_devices_per_token,
                capacity_factor=capacity_factor,
            ),
            protect_fraction=protect_fraction,
            drop_at_eval=drop_at_eval,
            command=shlex.join(["dsv2", *sys.argv[1:]]),
        )
    with _Display() as display:
        result = train(
            settings,
            on_event=display.on_event,
            resume=resume is not None,
            overwrite=overwrite,
            resume_max_steps=max_steps if resume is not None else None,
        )
    if format == Format.json:
        emit_json(result.to_json())
    else:
        _render(result)


def _check_init_from(sizes: dict[str, Any], set_: list[str], tokenizer: Path | None, preset: str, vocab_size: int) -> None:
    """A run that starts from a trained model takes its architecture and tokenizer as they are."""
    given = [f"--{k.replace('_', '-')}" for k, v in _SIZE_FLAGS.items() if v in sizes]
    given += ["--set"] * bool(set_) + ["--tokenizer"] * (tokenizer is not None) + ["--preset"] * (preset != "tiny")
    given += ["--vocab-size"] * (vocab_size != VOCAB_SIZE)
    if given:
        raise InputError(
            f"{', '.join(dict.fromkeys(given))} cannot change a model that --init-from starts from",
            hint="its architecture and tokenizer come from its config.json and tokenizer.json",
        )


def _summary(r: StepReport) -> str:
    parts = [f"loss {r.loss:.3f}", f"lr {r.lr:.2e}", f"{r.tokens_per_second:,.0f} tok/s", f"bal.exp {r.expert_balance:.3f}"]
    if r.device_balance is not None:
        parts.append(f"bal.dev {r.device_balance:.3f}")
    if r.comm_balance is not None:
        parts.append(f"bal.comm {r.comm_balance:.3f}")
    if r.drop_rate is not None:
        parts.append(f"drop {100 * r.drop_rate:.1f}%")
    return "  ".join(parts)


def _load_line(r: StepReport) -> str:
    return "expert load max/mean: " + "  ".join(f"L{layer} {v:.2f}" for layer, v in r.load_max_over_mean.items())


class _Display:
    """A rich progress bar on stderr with the latest numbers; a log line per evaluation."""

    def __enter__(self) -> _Display:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[numbers]}"),
            console=err,
            disable=not err.is_terminal,  # logs redirected to a file get the log lines only
        )
        self.progress.__enter__()
        self.task = None
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def on_event(self, event: TrainEvent) -> None:
        if event.kind == "info":
            self.progress.console.print(f"[dim]{event.message}[/]")
        elif event.kind == "start":
            self.progress.console.print(f"[dim]model: {event.message}; starting at step {event.step}[/]")
            self.task = self.progress.add_task("train", total=event.max_steps, completed=event.step, numbers="")
        elif event.kind == "step" and event.report is not None and self.task is not None:
            self.progress.update(self.task, completed=event.step, numbers=_summary(event.report))
            self.progress.console.print(f"[dim]step {event.step}: {_summary(event.report)}\n  {_load_line(event.report)}[/]")
        elif event.kind == "eval":
            self.progress.console.print(f"step {event.step}: held-out loss {event.eval_loss:.4f}")


def _render(r: TrainResult) -> None:
    table = Table(title=f"trained {r.output}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{r.steps} / {r.max_steps} (stopped by {r.stopped_by})")
    table.add_row("tokens seen", f"{r.tokens_seen:,} in {r.seconds:.0f} s")
    table.add_row("parameters", f"{r.parameters:,} ({human_count(r.parameters)})")
    if r.train_loss is not None:
        table.add_row("train loss", f"{r.train_loss:.4f} (last window)")
    if r.eval_loss is not None and r.eval_perplexity is not None:
        table.add_row("held-out loss", f"{r.eval_loss:.4f} (perplexity {r.eval_perplexity:.2f}) on {r.eval_tokens:,} tokens")
    table.add_row("unigram baseline", f"{r.unigram_loss:.4f} on the same tokens")
    if r.expert_balance is not None:
        balance = f"expert {r.expert_balance:.3f}"
        if r.device_balance is not None:
            balance += f", device {r.device_balance:.3f}, communication {r.comm_balance:.3f}"
        table.add_row("balance (1.0 = even)", balance)
    if r.drop_rate is not None:
        table.add_row("dropped assignments", f"{100 * r.drop_rate:.2f}%")
    if r.load_max_over_mean:
        table.add_row("expert load max/mean", "  ".join(f"L{k} {v:.2f}" for k, v in r.load_max_over_mean.items()))
    out.print(table)
