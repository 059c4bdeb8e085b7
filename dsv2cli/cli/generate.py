"""`dsv2 generate`: text generation with the latent KV cache — streaming, sampling, chat, batches.

The command parses options and renders; the work is :mod:`dsv2cli.inference.generate` (settings, kernel
policy, the batch loop and its JSON document) and :mod:`dsv2cli.inference.conversation` (the chat).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from dsv2cli.cli.common import err, handle_errors, human_bytes, out
from dsv2cli.cli.options import (
    Backend,
    BackendOption,
    DeviceOption,
    Dtype,
    DtypeOption,
    Format,
    ModelOption,
    ThreadsOption,
    format_option,
)
from dsv2cli.cli.torchrun import load, on_main_rank, run_seed, torchrun_group
from dsv2cli.errors import InputError
from dsv2cli.inference.compiled import CompiledDecoder
from dsv2cli.inference.conversation import Conversation
from dsv2cli.inference.engine import GenerationOptions, GenerationRequest, GenerationResult, TokenEvent, check_requests
from dsv2cli.inference.generate import GenerateRun, GenerateSettings, choose_decoder, choose_forward, generate_batches
from dsv2cli.inference.inputs import PromptInput, parse_token_ids, read_input_file, to_requests
from dsv2cli.inference.session import LoadedModel
from dsv2cli.model.attention import ATTENTION_IMPLS
from dsv2cli.model.dtypes import DTYPES, parse_dtype
from dsv2cli.parallel import ParallelGroup

EPILOG = (
    "Examples:\n\n"
    '  dsv2 generate "def fibonacci(n):"\n\n'
    '  dsv2 generate "import os" -n 64 --temperature 0.8 --top-p 0.95 --seed 1\n\n'
    "  dsv2 convert ./DeepSeek-V2-Lite-Chat ./lite-int8 --quantize int8   # 16 GB on disk: fits a 24 GB machine\n\n"
    '  dsv2 generate --model ./lite-int8 --chat "Write a haiku about caches"\n\n'
    "  dsv2 generate --input-file prompts.jsonl --format json > results.json\n\n"
    "  echo 'class Stack:' | dsv2 generate -\n\n"
    "  dsv2 generate --interactive --model ./lite-int8\n\n"
    "  dsv2 generate --kv-cache-dtype bfloat16 -n 2000 'import'   # half the cache, faster long contexts\n\n"
    "  dsv2 generate --no-compile 'import'   # eager decode steps (no compiling; slower steps)\n\n"
    "  torchrun --nproc-per-node 2 -m dsv2cli generate -m ./lite-int8 'def quicksort(xs):'\n\n"
    "--model takes a checkpoint directory (HF or dsv2 native layout), a Hugging Face repo id, or 'demo' "
    "(the bundled model, the default). A model that does not fit in memory is refused before loading, with "
    "what it needs and how to make it fit (docs/generate.md, 'Memory')."
)


OutputFormats = format_option(
    Format.text, Format.json, Format.jsonl, help="text (streamed), json (one document) or jsonl (a record per result)."
)


class Attention(str, Enum):
    absorbed = "absorbed"
    naive = "naive"


assert tuple(a.value for a in Attention) == ATTENTION_IMPLS


@handle_errors
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts (several decode together as a batch); '-' reads stdin."),
    model: ModelOption = None,
    input_file: Path = typer.Option(
        None, "--input-file", "-i", help="One prompt per line, or JSON lines with prompt / messages / prompt_token_ids."
    ),
    token_ids: str = typer.Option(None, "--token-ids", help='A prompt given as token ids, e.g. "1,2,3" (no tokenizer needed).'),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt as a user message in the checkpoint's chat template."),
    system: str = typer.Option(None, "--system", help="System message for --chat and --interactive."),
    interactive: bool = typer.Option(
        False, "--interactive", help="Chat in the terminal (/exit, /clear; Ctrl-C stops an answer)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(
        None, "--temperature", "-t", help="0 = greedy. Default: the checkpoint's generation_config, else 0."
    ),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(
        None, "--top-p", help="Nucleus sampling mass in (0, 1] (default: generation_config, else 1 = off)."
    ),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 = off)."),
    repetition_penalty: float = typer.Option(
        None,
        "--repetition-penalty",
        help="> 1 discourages repeats, 1 = off. Default: the checkpoint's generation_config, else 1.",
    ),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling: the same seed gives the same output."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable); the text is cut before it."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating after the end-of-sequence token."),
    format: OutputFormats = Format.text,
    attention: Attention = typer.Option(
        Attention.absorbed, "--attention", help="absorbed (fast, default) or naive (re-expands K/V; for comparison)."
    ),
    device: DeviceOption = "auto",
    dtype: DtypeOption = Dtype.auto,
    kv_cache_dtype: str = typer.Option(
        "auto",
        "--kv-cache-dtype",
        help="auto (the model's dtype), float32, bfloat16 or float16: the latent cache's values. bfloat16 halves "
        "the cache and the bytes attention reads (the attention kernel widens it to float32 as it reads; "
        "without the kernel attention runs in bfloat16; docs/generate.md states the cost).",
    ),
    threads: ThreadsOption = None,
    batch_size: int = typer.Option(8, "--batch-size", help="Most prompts decoded together."),
    compile: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help="Decode steps (one prompt or a batch) through the model's forward compiled by torch.compile. Default: "
        "on on CPU where a C++ compiler and dsv2's kernels are available (a one-line note says why not otherwise); "
        "compiling takes 15-60 s the first time per batch shape, seconds from the on-disk cache later.",
        show_default=False,
    ),
    attention_kernel: bool = typer.Option(
        None,
        "--attention-kernel/--no-attention-kernel",
        help="Decode steps attend through dsv2's one-pass C++ kernel (CPU; built once per machine, about 30 s; "
        "needs a C++ compiler). Default: on where it builds.",
        show_default=False,
    ),
    backend: BackendOption = Backend.auto,
) -> None:
    """Generate text from a DeepSeek-V2-family model, streaming it as it is produced.

    Under torchrun the model is split across the processes (docs/distributed.md); rank 0 reads and prints.
    """
    if kv_cache_dtype != "auto" and kv_cache_dtype not in DTYPES:
        raise InputError(f"unknown --kv-cache-dtype '{kv_cache_dtype}'", hint=f"choose auto or one of {', '.join(DTYPES)}")
    settings = GenerateSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
        attention=attention.value,
        cache_dtype=None if kv_cache_dtype == "auto" else parse_dtype(kv_cache_dtype),
        batch_size=batch_size,
    )
    with torchrun_group(device, backend.value) as group:
        inputs = on_main_rank(group, lambda: _gather_inputs(prompts or [], input_file, token_ids, interactive))
        if compile and group is not None:
            raise InputError("--compile is for single-process runs", hint="drop --compile under torchrun")
        loaded = load(model, group, device, dtype.value, threads)
        loading = "dsv2 kernels: loading (the first time on this machine they are built, about 30 s) ..."
        forward = choose_forward(loaded, attention_kernel, loading=lambda: err.status(loading))
        decoder, eager_reason = choose_decoder(loaded, compile if group is None else False, forward, compiling=_compiling)
        options = settings.options(loaded, run_seed(group, seed), forward)
        requests = [] if interactive else to_requests(inputs, loaded.tokenizer, chat=chat, system=system)
        if requests:
            check_requests(loaded.model.config, requests, options, loaded.tokenizer)
        if eager_reason is not None:  # after every check of the options and prompts: an error stays one line
            err.print(f"[dim]note: decoding eagerly: {eager_reason}[/]", soft_wrap=True)
        if interactive:
            _interactive(Conversation(loaded, options, system, decoder), group)
            return
        _generate(loaded, requests, options, format, batch_size, decoder)


def _compiling():
    return err.status("compiling the decode step for this batch (the first time 15-60 s; cached on disk after) ...")


def _gather_inputs(prompts: list[str], input_file: Path | None, token_ids: str | None, interactive: bool) -> list[PromptInput]:
    inputs: list[PromptInput] = []
    for prompt in prompts:
        if prompt == "-":
            inputs.append(PromptInput(text=sys.stdin.read()))
        else:
            inputs.append(PromptInput(text=prompt))
    if input_file is not None:
        inputs.extend(read_input_file(input_file))
    if token_ids is not None:
        inputs.append(PromptInput(token_ids=parse_token_ids(token_ids)))
    if not inputs and not interactive and not sys.stdin.isatty():
        inputs.append(PromptInput(text=sys.stdin.read()))
    if interactive and inputs:
        raise InputError("--interactive reads prompts from the terminal; do not pass prompts as well")
    if not inputs and not interactive:
        raise InputError(
            "no prompt given", hint='pass a prompt ("def fib(n):"), --input-file, --token-ids, - for stdin, or --interactive'
        )
    for item in inputs:
        if item.text is not None and not item.text.strip():
            raise InputError("the prompt is empty")
    return inputs


def _generate(
    loaded: LoadedModel,
    requests: list[GenerationRequest],
    options: GenerationOptions,
    fmt: Format,
    batch_size: int,
    decoder: CompiledDecoder | None,
) -> None:
    """Run the batches, streaming one prompt's text as it comes, or each result as its batch ends."""
    stream_text = fmt == Format.text and len(requests) == 1

    def on_token(event: TokenEvent) -> None:
        if stream_text and event.text:
            out.file.write(event.text)
            out.file.flush()

    def on_results(results: list[GenerationResult]) -> None:
        for result in results:
            if fmt == Format.jsonl:
                sys.stdout.write(json.dumps(result.to_json()) + "\n")
                sys.stdout.flush()
            elif fmt == Format.text and not stream_text:
                out.rule(f"[{result.index + 1}] {_short(result.prompt or str(result.prompt_token_ids))}")
                out.print(result.text if result.text is not None else str(result.token_ids), markup=False, highlight=False)

    run = generate_batches(loaded, requests, options, batch_size, decoder, on_token=on_token, on_results=on_results)
    if fmt == Format.json:
        sys.stdout.write(json.dumps(run.to_json(), indent=2) + "\n")
    elif stream_text:
        if run.results[0].text is None:  # no tokenizer: show the ids
            out.file.write(" ".join(map(str, run.results[0].token_ids)))
        out.file.write("\n")
    _summary(run)


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _summary(run: GenerateRun) -> None:
    rate = f"{run.tokens / run.decode_s:.1f} tokens/s" if run.decode_s > 0 else "-"
    prefill = run.results[0].timings if run.results else None
    prefill_rate = f", prefill {prefill.prefill_tokens_per_s:.0f} tokens/s" if prefill and prefill.prefill_s > 0 else ""
    prefill_rate += f", compiled in {run.compile_s:.1f} s" if run.compile_s > 0 else ""
    cache_note = "" if run.cache_dtype == run.dtype else f" ({run.cache_dtype})"
    err.print(
        f"[dim]{run.tokens} tokens, {rate}{prefill_rate} · latent cache {human_bytes(run.cache_bytes)}{cache_note} · "
        f"{run.dtype} on {run.device} · finished: {', '.join(run.finish_reasons)}[/]",
        soft_wrap=True,
    )


def _read_line() -> str | None:
    """The next line the user typed; None at the end of input or on Ctrl-C."""
    try:
        if sys.stdin.isatty():
            return input(">>> ")
        return sys.stdin.readline() or None
    except (EOFError, KeyboardInterrupt):
        return None


def _interactive(conversation: Conversation, group: ParallelGroup | None) -> None:
    """The terminal side of a chat: read a line (rank 0 under torchrun), run a command or stream the answer."""
    err.print("[dim]Chat with the model. /clear forgets the conversation, /exit quits, Ctrl-C stops an answer.[/]")
    while True:
        line = on_main_rank(group, _read_line)  # under torchrun rank 0 reads and every rank gets the line
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            conversation.clear()
            err.print("[dim]Conversation cleared.[/]")
            continue
        answer = []
        try:
            for event in conversation.ask(line):
                answer.append(event.text)
                out.file.write(event.text)
                out.file.flush()
        except KeyboardInterrupt:
            if group is not None:
                raise  # torchrun passes Ctrl-C to every rank mid-step: the ranks cannot resume in step, so all stop
            err.print("\n[dim](stopped)[/]")
        out.file.write("\n")
        conversation.answered("".join(answer))
