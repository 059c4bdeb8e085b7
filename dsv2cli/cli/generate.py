"""`dsv2 generate`: text generation with the latent KV cache — streaming, sampling, chat, batches."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from dsv2cli.cli.common import LoadStatus, err, handle_errors, human_bytes, out
from dsv2cli.errors import InputError
from dsv2cli.inference.compiled import CompiledDecoder, cannot_compile
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest, GenerationResult
from dsv2cli.inference.inputs import PromptInput, chat_prompt, parse_token_ids, read_input_file, to_requests
from dsv2cli.inference.sampling import SamplingParams
from dsv2cli.inference.session import LoadedModel, with_attention_kernel
from dsv2cli.model import ForwardOptions
from dsv2cli.model.attention import ATTENTION_IMPLS
from dsv2cli.model.dtypes import DTYPES, parse_dtype
from dsv2cli.parallel import ParallelGroup, distributed_run, from_main_rank, shared_seed
from dsv2cli.parallel.session import load_model

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


class OutputFormat(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


class Attention(str, Enum):
    absorbed = "absorbed"
    naive = "naive"


assert tuple(a.value for a in Attention) == ATTENTION_IMPLS


@handle_errors
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts (several decode together as a batch); '-' reads stdin."),
    model: str = typer.Option(
        None, "--model", "-m", help="Checkpoint directory, Hub repo id, or 'demo' (default: the bundled model)."
    ),
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
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats (1 = off)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling: the same seed gives the same output."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this text appears (repeatable); the text is cut before it."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating after the end-of-sequence token."),
    format: OutputFormat = typer.Option(
        OutputFormat.text, "--format", "-f", help="text (streamed), json (one document) or jsonl (a record per result)."
    ),
    attention: Attention = typer.Option(
        Attention.absorbed, "--attention", help="absorbed (fast, default) or naive (re-expands K/V; for comparison)."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto, float32, bfloat16 or float16 (auto: float32 on CPU when it fits, else the stored dtype)."
    ),
    kv_cache_dtype: str = typer.Option(
        "auto",
        "--kv-cache-dtype",
        help="auto (the model's dtype), float32, bfloat16 or float16: the latent cache's values. bfloat16 halves "
        "the cache; with float32 activations attention then runs in bfloat16 (faster at long contexts on CPUs "
        "with AVX512-BF16; docs/generate.md states its cost).",
    ),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
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
    backend: str = typer.Option(
        "auto", "--backend", help="Under torchrun: gloo, nccl or auto (nccl on GPUs, gloo on CPU; env DSV2_BACKEND)."
    ),
) -> None:
    """Generate text from a DeepSeek-V2-family model, streaming it as it is produced.

    Under torchrun the model is split across the processes (docs/distributed.md); rank 0 reads and prints.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if seed is not None and not 0 <= seed < 1 << 63:
        raise InputError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    if kv_cache_dtype != "auto" and kv_cache_dtype not in DTYPES:
        raise InputError(f"unknown --kv-cache-dtype '{kv_cache_dtype}'", hint=f"choose auto or one of {', '.join(DTYPES)}")
    with distributed_run(device, backend) as group:  # group is None unless launched by torchrun
        inputs = from_main_rank(group, lambda: _gather_inputs(prompts or [], input_file, token_ids, interactive))
        if compile and group is not None:
            raise InputError("--compile is for single-process runs", hint="drop --compile under torchrun")
        loaded, shards = load_model(model, group, device, dtype, threads, progress=LoadStatus())
        forward = _forward_options(loaded, attention_kernel)
        decoder = _decoder(loaded, compile if group is None else False, forward)
        if shards is not None:
            for line in shards.lines():
                err.print(f"[dim]{line}[/]", soft_wrap=True)
        defaults = loaded.tokenizer.special.generation_defaults if loaded.tokenizer else {}
        sampled = bool(defaults.get("do_sample"))
        sampling = SamplingParams(
            temperature=temperature if temperature is not None else (float(defaults.get("temperature", 1.0)) if sampled else 0.0),
            top_k=top_k,
            top_p=top_p if top_p is not None else (float(defaults.get("top_p", 1.0)) if sampled else 1.0),
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=shared_seed(group, seed),
        )
        options = GenerationOptions(
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_ids=loaded.eos_token_ids,
            ignore_eos=ignore_eos,
            stop=tuple(stop or ()),
            attention=attention.value,
            cache_dtype=None if kv_cache_dtype == "auto" else parse_dtype(kv_cache_dtype),
            forward=forward,
        )
        if interactive:
            _interactive(loaded, options, system, group, decoder)
            return
        requests = to_requests(inputs, loaded.tokenizer, chat=chat, system=system)
        _run_batches(loaded, requests, options, format, batch_size, decoder)


def _decoder(loaded: LoadedModel, asked: bool | None, forward: ForwardOptions) -> CompiledDecoder | None:
    """Compiled decode steps: as asked, else wherever they can run (a one-line note says why not)."""
    if asked is False:
        return None
    if asked is None:
        reason = cannot_compile(loaded.model)
        if reason is not None:
            err.print(f"[dim]note: decoding eagerly: {reason}[/]", soft_wrap=True)
            return None

    def compiling():
        return err.status("compiling the decode step for this batch (the first time 15-60 s; cached on disk after) ...")

    return CompiledDecoder(loaded.model, forward, compiling=compiling)


def _forward_options(loaded: LoadedModel, asked: bool | None) -> ForwardOptions:
    """The loaded model's forward options, decode steps attending through the C++ kernel as asked, else wherever it
    builds. An explicit ``--attention-kernel`` that cannot be honoured is an error, the default falls back to BLAS."""
    if asked is False:
        return with_attention_kernel(loaded.options, loaded.device, enabled=False)
    with err.status("dsv2 kernels: loading (the first time on this machine they are built, about 30 s) ..."):
        forward = with_attention_kernel(loaded.options, loaded.device)
    if forward.latent_attention is None and asked:
        reason = "it runs on CPU only" if loaded.device.type != "cpu" else forward.kernels.error
        raise InputError(f"--attention-kernel: the kernel is not available here ({reason})", hint="drop --attention-kernel")
    return forward


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


def _run_batches(
    loaded: LoadedModel,
    requests: list[GenerationRequest],
    options: GenerationOptions,
    fmt: OutputFormat,
    batch_size: int,
    decoder: CompiledDecoder | None = None,
) -> None:
    results: list[GenerationResult] = []
    cache_bytes = 0
    stream_text = fmt == OutputFormat.text and len(requests) == 1
    for start in range(0, len(requests), batch_size):
        generation = Generation(loaded.model, requests[start : start + batch_size], options, loaded.tokenizer, decoder)
        for event in generation:
            if stream_text and event.text:
                out.file.write(event.text)
                out.file.flush()
        cache_bytes = max(cache_bytes, generation.cache_bytes)
        batch_results = generation.results
        results.extend(batch_results)
        for result in batch_results:
            if fmt == OutputFormat.jsonl:
                sys.stdout.write(json.dumps(result.to_json()) + "\n")
                sys.stdout.flush()
            elif fmt == OutputFormat.text and not stream_text:
                out.rule(f"[{result.index + 1}] {_short(result.prompt or str(result.prompt_token_ids))}")
                out.print(result.text if result.text is not None else str(result.token_ids), markup=False, highlight=False)
    if fmt == OutputFormat.json:
        document = {
            "model": loaded.name,
            "results": [r.to_json() for r in results],
            "cache": {"scheme": "mla-latent", "bytes": cache_bytes, "dtype": _cache_dtype_name(options, loaded)},
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif stream_text:
        if results[0].text is None:  # no tokenizer: show the ids
            out.file.write(" ".join(map(str, results[0].token_ids)))
        out.file.write("\n")
    _summary(results, cache_bytes, loaded, _cache_dtype_name(options, loaded))


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _cache_dtype_name(options: GenerationOptions, loaded: LoadedModel) -> str:
    return str(options.cache_dtype or loaded.dtype).removeprefix("torch.")


def _summary(results: list[GenerationResult], cache_bytes: int, loaded: LoadedModel, cache_dtype: str) -> None:
    tokens = sum(len(r.token_ids) for r in results)
    decode_s = max((r.timings.decode_s for r in results), default=0.0)
    prefill = results[0].timings if results else None
    rate = f"{tokens / decode_s:.1f} tokens/s" if decode_s > 0 else "-"
    prefill_rate = f", prefill {prefill.prefill_tokens_per_s:.0f} tokens/s" if prefill and prefill.prefill_s > 0 else ""
    compile_s = sum(r.timings.compile_s for r in results)
    prefill_rate += f", compiled in {compile_s:.1f} s" if compile_s > 0 else ""
    reasons = ", ".join(sorted({r.finish_reason or "?" for r in results}))
    dtype = str(loaded.dtype).removeprefix("torch.")
    cache_note = "" if cache_dtype == dtype else f" ({cache_dtype})"
    err.print(
        f"[dim]{tokens} tokens, {rate}{prefill_rate} · latent cache {human_bytes(cache_bytes)}{cache_note} · {dtype} on {loaded.device} · finished: {reasons}[/]",
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


def _interactive(
    loaded: LoadedModel,
    options: GenerationOptions,
    system: str | None,
    group: ParallelGroup | None = None,
    decoder: CompiledDecoder | None = None,
) -> None:
    if loaded.tokenizer is None:
        raise InputError("--interactive needs a checkpoint with a tokenizer")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    err.print("[dim]Chat with the model. /clear forgets the conversation, /exit quits, Ctrl-C stops an answer.[/]")
    while True:
        line = from_main_rank(group, _read_line)  # under torchrun rank 0 reads and every rank gets the line
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            history = history[:1] if system else []
            err.print("[dim]Conversation cleared.[/]")
            continue
        history.append({"role": "user", "content": line})
        text = chat_prompt(loaded.tokenizer, history)
        request = GenerationRequest(loaded.tokenizer.encode(text, add_bos=False), text, 0)
        generation = Generation(loaded.model, [request], options, loaded.tokenizer, decoder)
        answer = []
        try:
            for event in generation:
                answer.append(event.text)
                out.file.write(event.text)
                out.file.flush()
        except KeyboardInterrupt:
            if group is not None:
                raise  # torchrun passes Ctrl-C to every rank mid-step: the ranks cannot resume in step, so all stop
            err.print("\n[dim](stopped)[/]")
        out.file.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
