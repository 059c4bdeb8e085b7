"""The HTTP side: an OpenAI-compatible FastAPI app over the :class:`Scheduler`, run by uvicorn.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole answers, or server-sent events
with ``stream``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Every failure is an
OpenAI error object with a 4xx or 5xx status; the server keeps serving. With an API key, the ``/v1`` endpoints
want ``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` stay open, as llama-server's do.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from dsv2cli.errors import DSV2Error
from dsv2cli.inference.generate import default_sampling
from dsv2cli.inference.inputs import chat_prompt
from dsv2cli.serve.answers import Answer
from dsv2cli.serve.batch import Done, Failed, ServeRequest, TokenOut
from dsv2cli.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    now,
    parse_json,
    validate,
)
from dsv2cli.serve.scheduler import Scheduler

# Seconds between checks that a client waiting for a whole answer is still connected.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class HTTPSettings:
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    grace_period: float = 10.0  # seconds a stream may go on after shutdown starts (uvicorn's own timeout is longer)


class _ClientGone(Exception):
    pass


def create_app(scheduler: Scheduler, settings: HTTPSettings) -> FastAPI:
    """The app; the scheduler's thread starts and stops with the app's lifespan."""
    loaded = scheduler.loaded
    tokenizer = loaded.tokenizer
    context = loaded.model.config.max_position_embeddings
    metrics = scheduler.metrics
    created = now()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="dsv2 serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def check_model(name: str | None) -> None:
        if name is not None and name != loaded.name:
            raise APIError(
                404,
                f"model '{name}' is not served here; this server serves '{loaded.name}'",
                param="model",
                code="model_not_found",
            )

    def token_text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else str(token)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not scheduler.alive:
            return JSONResponse({"status": "error"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        prefix = scheduler.prefix
        if prefix is not None:
            metrics.prefix_bytes.set(prefix.bytes)
            if scheduler.prompt_tokens:
                metrics.prefix_hit_rate.set(prefix.hit_tokens / scheduler.prompt_tokens)
        loads = scheduler.expert_loads()
        if loads is not None:
            metrics.set_expert_loads(loads)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/start_expert_distribution_record")
    async def start_expert_record(request: Request) -> JSONResponse:
        authorize(request)
        scheduler.start_recording()
        return JSONResponse({"status": "recording"})

    @app.post("/stop_expert_distribution_record")
    async def stop_expert_record(request: Request) -> JSONResponse:
        authorize(request)
        scheduler.stop_recording()
        return JSONResponse({"status": "stopped"})

    @app.post("/dump_expert_distribution_record")
    async def dump_expert_record(request: Request) -> JSONResponse:
        authorize(request)
        document = scheduler.expert_loads()
        if document is None:
            raise APIError(400, "nothing was recorded; POST /start_expert_distribution_record first")
        return JSONResponse(document)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {"id": loaded.name, "object": "model", "created": created, "owned_by": "dsv2cli", "max_model_len": context}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body: ChatRequest = validate(ChatRequest, await read_body(request))
        check_model(body.model)
        if tokenizer is None:
            raise APIError(
                400, "this checkpoint has no tokenizer, so chats cannot be rendered; use /v1/completions with token ids"
            )
        try:
            text = await asyncio.to_thread(chat_prompt, tokenizer, body.chat_messages())
        except DSV2Error as exc:
            raise APIError(400, exc.message, param="messages") from None
        ids = await asyncio.to_thread(tokenizer.encode, text, False)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return await run(request, "chat", body, ids, body.max_completion_tokens or body.max_tokens, top, body.logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body: CompletionRequest = validate(CompletionRequest, await read_body(request))
        check_model(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "this checkpoint has no tokenizer; give the prompt as token ids", param="prompt")
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = await asyncio.to_thread(tokenizer.encode, prompt)  # megabytes of text take a while: off the event loop
        else:
            vocab = loaded.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            ids = list(prompt)
        top = body.logprobs or 0
        return await run(request, "text", body, ids, body.max_tokens, top, body.logprobs is not None)

    async def run(
        request: Request, kind: str, body: SamplingFields, ids: list[int], max_tokens: int | None, top: int, logprobs: bool
    ) -> Response:
        param = "messages" if kind == "chat" else "prompt"
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {context}",
                param=param,
                code="context_length_exceeded",
            )
        limit = scheduler.limits.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens; this server takes at most {limit} (max_prompt_tokens)", param=param
            )
        max_new = min(max_tokens or context - len(ids), context - len(ids))
        defaults = tokenizer.special.generation_defaults if tokenizer is not None else {}
        try:
            sampling = default_sampling(
                defaults, body.temperature, body.top_k, body.top_p, body.min_p, body.repetition_penalty, body.seed
            )
        except DSV2Error as exc:
            raise APIError(400, exc.message) from None
        stop = body.stop_strings()
        if stop and tokenizer is None:
            raise APIError(400, "'stop' needs a tokenizer, and this checkpoint has none", param="stop")
        scheduler.check_fits(len(ids), max_new)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenOut | Done | Failed] = asyncio.Queue()

        def emit(event: TokenOut | Done | Failed) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown)
                job.cancel()

        job = ServeRequest(
            prompt_token_ids=ids,
            max_tokens=max_new,
            emit=emit,
            sampling=sampling,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            stop=stop,
            ignore_eos=body.ignore_eos,
            top_logprobs=top,
        )
        scheduler.submit(job)
        metrics.requests.labels(request.url.path, "200").inc()
        answer = Answer(kind, loaded.name, logprobs, token_text)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # At shutdown, sse-starlette cancels streams at once unless given a grace period: in-flight answers may finish.
            grace = max(0.0, settings.grace_period - 0.5)
            return EventSourceResponse(_stream(answer, queue, job, include_usage), sep="\n", shutdown_grace_period=grace)
        try:
            while True:
                event = await _next_event(queue, request, job)
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message, type="server_error")
                if isinstance(event, Done):
                    return JSONResponse(answer.whole(event))
                answer.add(event)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel()  # a no-op once it is done; frees the row when the handler is cancelled

    return app


async def _next_event(queue: asyncio.Queue, request: Request, job: ServeRequest) -> TokenOut | Done | Failed:
    """The next event, checking every :data:`DISCONNECT_POLL_S` that the client is still there."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise _ClientGone from None


async def _stream(answer: Answer, queue: asyncio.Queue, job: ServeRequest, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; a client that goes away cancels this, which frees its row."""
    try:
        if answer.kind == "chat":
            yield json.dumps(answer.chunk({"role": "assistant", "content": ""}, None, None))
        while True:
            event = await queue.get()
            if isinstance(event, Failed):
                yield json.dumps(APIError(event.status, event.message, type="server_error").body())
                break
            if isinstance(event, Done):
                if include_usage:
                    yield json.dumps(answer.usage_chunk(event))
                break
            yield json.dumps(answer.token_chunk(event))
        yield "[DONE]"
    finally:
        job.cancel()


def run_server(app: FastAPI, host: str, port: int, grace_period: float, sock: socket.socket | None = None) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; in-flight requests get ``grace_period`` seconds, then the process returns
    normally (exit status 0) instead of re-raising the signal as uvicorn otherwise does."""
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=grace_period, log_level="info", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    main = threading.current_thread() is threading.main_thread()  # only the main thread handles signals
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    for sig in previous:
        signal.signal(sig, lambda *_: None)  # what uvicorn re-raises after its own graceful shutdown: nothing more
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
