"""`dsv2 serve`: an OpenAI-compatible HTTP server with continuous batching (the work is :mod:`dsv2cli.serve`)."""

from __future__ import annotations

import os

import typer

from dsv2cli.cli.common import LoadStatus, err, handle_errors
from dsv2cli.cli.options import DeviceOption, Dtype, DtypeOption, ModelOption, ThreadsOption
from dsv2cli.errors import InputError
from dsv2cli.inference.generate import choose_decoder, choose_forward
from dsv2cli.inference.session import load_for_generation
from dsv2cli.model.dtypes import DTYPES, parse_dtype
from dsv2cli.serve.app import HTTPSettings, create_app, run_server
from dsv2cli.serve.metrics import Metrics
from dsv2cli.serve.model_thread import ModelThread
from dsv2cli.serve.scheduler import Limits, Scheduler

API_KEY_ENV = "DSV2_API_KEY"

EPILOG = (
    "Examples:\n\n"
    "  dsv2 serve   # the bundled demo model on http://127.0.0.1:8000/v1\n\n"
    "  dsv2 serve ./lite-int8 --max-concurrent 16 --api-key secret\n\n"
    "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
    '-d \'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}\'\n\n'
    "Endpoints: /v1/chat/completions, /v1/completions (stream: true for server-sent events), /v1/models, "
    "/health, /metrics. See docs/serve.md."
)


@handle_errors
def serve(
    model_argument: str = typer.Argument(None, metavar="MODEL", help="Checkpoint directory, Hub repo id, or 'demo'."),
    model: ModelOption = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str = typer.Option(
        None, "--api-key", envvar=API_KEY_ENV, help="Require 'Authorization: Bearer KEY' on /v1 and the expert-record endpoints."
    ),
    max_concurrent: int = typer.Option(8, "--max-concurrent", help="Most requests decoding together (rows of the batch)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Most requests waiting for a row; more get HTTP 429."),
    max_prompt_tokens: int = typer.Option(None, "--max-prompt-tokens", help="Longest prompt accepted (default: the context)."),
    prefix_cache_bytes: int = typer.Option(
        256 << 20, "--prefix-cache-bytes", help="Latent entries of earlier prompts kept for reuse (0 = off)."
    ),
    grace_period: float = typer.Option(10.0, "--grace-period", help="Seconds in-flight requests get after SIGTERM."),
    device: DeviceOption = "auto",
    dtype: DtypeOption = Dtype.auto,
    kv_cache_dtype: str = typer.Option(
        "auto", "--kv-cache-dtype", help="auto (the model's dtype), float32, bfloat16 or float16."
    ),
    threads: ThreadsOption = None,
    compile: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help="Decode steps through torch.compile (default: on where it can run; each batch shape compiles once).",
        show_default=False,
    ),
    attention_kernel: bool = typer.Option(
        None,
        "--attention-kernel/--no-attention-kernel",
        help="Attend through dsv2's C++ kernel (default: where it builds).",
        show_default=False,
    ),
) -> None:
    """Serve a model over HTTP with OpenAI's API (chat and text completions, streaming), batching requests as they come."""
    if model_argument is not None and model is not None:
        raise InputError("give MODEL or `model`, not both")
    if kv_cache_dtype != "auto" and kv_cache_dtype not in DTYPES:
        raise InputError(f"unknown `kv_cache_dtype` '{kv_cache_dtype}'", hint=f"choose auto or one of {', '.join(DTYPES)}")
    if not 0 < port < 65536:
        raise InputError(f"`port` must be in 1..65535, got {port}")
    limits = Limits(max_concurrent, max_queue, max_prompt_tokens, prefix_cache_bytes)
    model_thread = ModelThread()  # loads the model and runs the scheduler: one OpenMP team (model_thread.py says why)
    loaded = model_thread.call(
        lambda: load_for_generation(model_argument or model, device, dtype.value, threads, progress=LoadStatus())
    )
    loading = "dsv2 kernels: loading (the first time on this machine they are built, about 30 s) ..."
    forward = model_thread.call(lambda: choose_forward(loaded, attention_kernel, loading=lambda: err.status(loading)))
    decoder, eager_reason = model_thread.call(lambda: choose_decoder(loaded, compile, forward))
    if eager_reason is not None:
        err.print(f"[dim]note: decoding eagerly: {eager_reason}[/]", soft_wrap=True)
    cache_dtype = None if kv_cache_dtype == "auto" else parse_dtype(kv_cache_dtype)
    scheduler = Scheduler(loaded, forward, decoder, limits, Metrics(), cache_dtype, model_thread)
    app = create_app(scheduler, HTTPSettings(api_key=api_key or os.environ.get(API_KEY_ENV) or None, grace_period=grace_period))
    err.print(f"[dim]serving {loaded.name} on http://{host}:{port}/v1 (Ctrl-C or SIGTERM stops)[/]", soft_wrap=True)
    run_server(app, host, port, grace_period)
