"""`dsv2 serve`: the server on a loopback port, driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from dsv2cli import kernels
from dsv2cli.cli.main import app as cli_app
from dsv2cli.inference.compiled import CompiledDecoder, compiler_available
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.inference.sampling import SamplingParams
from dsv2cli.inference.session import load_for_generation
from dsv2cli.serve.app import HTTPSettings, create_app
from dsv2cli.serve.batch import RunningBatch, ServeRequest, TokenOut
from dsv2cli.serve.metrics import Metrics
from dsv2cli.serve.scheduler import Limits, Scheduler
from tests.helpers import (  # noqa: F401
    needs_kernels,
    one_thread_per_module,
    reference_model,
    save_reference,
    save_tokenizer,
    skip_without_kernels,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    save_reference(reference_model(vocab_size=320), directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_generation(str(model_dir), "cpu", "float32", read_weights=False)


@contextmanager
def serving(loaded, limits=Limits(), api_key=None, decoder=None):
    """A server on 127.0.0.1 in a thread; yields its base URL (``http://127.0.0.1:PORT``)."""
    scheduler = Scheduler(loaded, loaded.options, decoder, limits, Metrics())
    app = create_app(scheduler, HTTPSettings(api_key=api_key, max_body_bytes=1 << 16))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(url, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    headers = {name.lower(): value for name, value in response.getheaders()}
    conn.close()
    try:
        return response.status, headers, json.loads(text)
    except ValueError:
        return response.status, headers, text


def metric(url, name):
    """The sum of a Prometheus sample's values over its labels."""
    _, _, text = raw(url, "GET", "/metrics")
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")
    )


PROMPTS = ["def add(a, b):", "for item in items:", "The quick brown fox", "class Stack:", "User: hello", "print(", "x", "def"]


def test_chat_and_completions_through_openai(loaded):
    with serving(loaded) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == [loaded.name]
        messages = [{"role": "user", "content": "hello there"}]
        whole = api.chat.completions.create(model=loaded.name, messages=messages, max_tokens=8, temperature=0)
        choice = whole.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 3
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        chunks = list(
            api.chat.completions.create(
                model=loaded.name,
                messages=messages,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == choice.message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

        done = api.completions.create(model=loaded.name, prompt="def add(a, b):", max_tokens=6, temperature=0, logprobs=2)
        logprobs = done.choices[0].logprobs
        assert len(logprobs.tokens) == done.usage.completion_tokens == len(logprobs.token_logprobs)
        assert all(
            len(top) == 2 and max(top.values()) >= lp - 1e-5
            for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
        )
        streamed = "".join(
            c.choices[0].text
            for c in api.completions.create(model=loaded.name, prompt="def add(a, b):", max_tokens=6, temperature=0, stream=True)
        )
        assert streamed == done.choices[0].text
        sampled = [
            api.completions.create(
                model=loaded.name,
                prompt="x",
                max_tokens=6,
                temperature=1.0,
                seed=7,
                extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1},
                frequency_penalty=0.5,
            )
            .choices[0]
            .text
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]


def test_output_is_what_generate_gives(loaded):
    prompt = loaded.tokenizer.encode("for item in items:")
    options = GenerationOptions(max_new_tokens=12, ignore_eos=True, forward=loaded.options)
    expected = Generation(loaded.model, [GenerationRequest(prompt)], options, loaded.tokenizer).run()[0]
    with serving(loaded) as url:
        status, _, doc = raw(
            url,
            "POST",
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0},
        )
    assert status == 200, doc
    assert doc["choices"][0]["text"] == expected.text
    assert doc["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(expected.logprobs, abs=1e-4)


def test_concurrent_greedy_requests_match_running_alone(loaded):
    """16 clients at once, 4 rows decoding: requests join and leave the batch between steps."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 3 + (5 * i) % 17) for i in range(16)]

    def ask(url, job):
        prompt, max_tokens = job
        answer = client(url).completions.create(
            model=loaded.name, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return answer.choices[0].text, answer.usage.completion_tokens

    with serving(loaded, Limits(max_concurrent=4, prefix_cache_bytes=0)) as url:
        alone = [ask(url, job) for job in jobs]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda job: ask(url, job), jobs))
        assert metric(url, "dsv2_batch_rows_sum") > metric(url, "dsv2_batch_rows_count")  # steps did run several rows
    assert together == alone
    assert [n for _, n in alone] == [n for _, n in jobs]


def test_prompts_admitted_together_are_prefilled_in_one_forward_as_each_alone(loaded):
    """Requests waiting when the scheduler turns are prefilled in one left-padded forward: the same first-token
    logits and latent entries as each prompt alone, and then the same greedy tokens."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3], [40, 41, 42, 43]]
    batch = RunningBatch(loaded.model, loaded.options)
    with torch.inference_mode():
        together = batch.prefill_together(prompts)
        for tokens, (logits, entries) in zip(prompts, together, strict=True):
            alone_logits, alone_entries = batch.prefill(tokens)
            assert entries.shape == alone_entries.shape
            torch.testing.assert_close(logits, alone_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(entries, alone_entries, rtol=1e-5, atol=1e-5)

    def run(requests_at_once):
        metrics = Metrics()
        scheduler = Scheduler(loaded, loaded.options, None, Limits(max_concurrent=4, prefix_cache_bytes=0), metrics)
        outputs = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def emit(i, event):
            if isinstance(event, TokenOut):
                outputs[i].append(event.token_id)
            else:
                done.release()

        requests = [
            ServeRequest(tokens, 6, lambda event, i=i: emit(i, event), SamplingParams(temperature=0.0), ignore_eos=True)
            for i, tokens in enumerate(prompts)
        ]
        for group in [requests] if requests_at_once else [[r] for r in requests]:
            for request in group:
                scheduler.submit(request)
            if not scheduler.started:
                scheduler.start()
            for _ in group:
                assert done.acquire(timeout=60)
        scheduler.stop()
        rendered = metrics.render().decode()
        return outputs, rendered

    alone, _ = run(requests_at_once=False)
    together_tokens, rendered = run(requests_at_once=True)
    assert together_tokens == alone
    assert "dsv2_prefill_prompts_count 1.0" in rendered and "dsv2_prefill_prompts_sum 4.0" in rendered


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(loaded):
    long_prompt = list(range(2, 260))
    cases = [
        (b"{not json", 400, None),
        (b'{"prompt": "x", "temperature": NaN}', 400, None),
        (b"[1, 2]", 400, None),
        (b'{"prompt": "\\ud800"}', 400, None),
        (b'{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
        (b"[" * 100000 + b"]" * 100000, 413, None),
        ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": "x", "stop": [1]}, 400, "stop"),
        ({"prompt": "x", "seed": -1}, 400, "seed"),
        ({"prompt": "x", "temperature": 1e-9}, 400, None),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": long_prompt}, 400, "prompt"),
        ({"prompt": [1, 99999]}, 400, "prompt"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "x" * 70000}, 413, None),
    ]
    with serving(loaded) as url:
        for body, status, param in cases:
            got, _, doc = raw(url, "POST", "/v1/completions", body)
            assert got == status, (body, doc)
            assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
            assert doc["error"]["param"] == param, (body, doc)
        got, _, doc = raw(url, "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
        assert got == 400 and "messages" in doc["error"]["param"]
        got, _, doc = raw(url, "GET", "/v1/nothing")
        assert got == 404 and "error" in doc
        got, _, doc = raw(url, "GET", "/v1/completions")
        assert got == 405 and doc["error"]["code"] == "method_not_allowed"
        got, _, doc = raw(url, "POST", "/v1/completions", b"[" * 10000 + b"]" * 10000)
        assert got == 400 and "error" in doc
        with pytest.raises(openai.BadRequestError):
            client(url).chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
        got, _, doc = raw(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert got == 200 and doc["usage"]["completion_tokens"] <= 3
        assert raw(url, "GET", "/health")[0] == 200


def test_api_key(loaded, monkeypatch):
    with serving(loaded, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert raw(url, "POST", "/v1/completions", {"prompt": "x"})[0] == 401
        assert client(url, "s3cret").completions.create(model=loaded.name, prompt="x", max_tokens=2).usage.completion_tokens <= 2
        assert raw(url, "GET", "/health")[0] == 200  # /health and /metrics stay open


def _stream_lines(url, body, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def test_queue_limit_and_disconnect(loaded, monkeypatch):
    from dsv2cli.serve.batch import RunningBatch

    step = RunningBatch.step

    def slow_step(self):  # 240 steps take at least 4.8 s however fast the machine: the row stays taken meanwhile
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(RunningBatch, "step", slow_step)
    long = {"prompt": "x", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with serving(loaded, Limits(max_concurrent=1, max_queue=1)) as url:
        first, response = _stream_lines(url, long)
        assert response.readline().startswith(b"data:")  # running: the one row is taken
        second, _ = _stream_lines(url, long)  # waits in the queue
        status, headers, doc = raw(url, "POST", "/v1/completions", long)
        assert status == 429 and headers["retry-after"] == "1" and doc["error"]["code"] == "queue_full"
        first.close()  # the client goes away mid-stream: its row is freed at the next step
        second.close()  # and this one leaves the queue
        deadline = time.monotonic() + 20
        while metric(url, "dsv2_finished_requests_total") < 2:
            assert time.monotonic() < deadline, "the disconnects were not noticed"
            time.sleep(0.05)
        _, _, text = raw(url, "GET", "/metrics")
        assert 'dsv2_finished_requests_total{reason="cancelled"} 2.0' in text
        status, _, doc = raw(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200, doc


def test_prefix_cache_reuses_a_chats_first_turn(loaded):
    first = [{"role": "system", "content": "You are terse. " * 6}, {"role": "user", "content": "def add(a, b):"}]

    def two_turns(url):
        api = client(url)
        one = api.chat.completions.create(model=loaded.name, messages=first, max_tokens=10, temperature=0)
        second = [
            *first,
            {"role": "assistant", "content": one.choices[0].message.content},
            {"role": "user", "content": "for item"},
        ]
        two = api.chat.completions.create(model=loaded.name, messages=second, max_tokens=10, temperature=0)
        return one, two

    with serving(loaded, Limits(prefix_cache_bytes=0)) as url:
        plain = two_turns(url)
    with serving(loaded, Limits(prefix_cache_bytes=1 << 24)) as url:
        cached = two_turns(url)
        assert metric(url, "dsv2_prompt_cached_tokens_total") == cached[1].usage.prompt_tokens_details.cached_tokens
        assert metric(url, "dsv2_prefix_cache_bytes") > 0
    assert plain[1].usage.prompt_tokens_details.cached_tokens == 0
    assert cached[1].usage.prompt_tokens_details.cached_tokens >= 16
    assert [m.choices[0].message.content for m in cached] == [m.choices[0].message.content for m in plain]


def test_cli_serves_and_exits_0_on_sigterm(model_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "DSV2_API_KEY": "k"}
    args = [
        sys.executable,
        "-m",
        "dsv2cli",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--no-compile",
        "--no-attention-kernel",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            try:
                if raw(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (
                process.stderr.read().decode() if process.poll() is not None else "no start"
            )
            time.sleep(0.2)
        assert raw(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, {"Authorization": "Bearer k"})[0] == 200
        assert raw(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 401
        body = {"prompt": "x", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
        conn, response = _stream_lines(url, body, {"Authorization": "Bearer k"})
        events = [response.readline() for _ in range(5)]
        process.send_signal(signal.SIGTERM)  # stops accepting; the stream in flight may finish within the grace period
        events += list(response)
        conn.close()
        data = [line for line in events if line.startswith(b"data:")]
        assert data[-1].strip() == b"data: [DONE]" and len(data) == 240 + 1
        assert process.wait(30) == 0, process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_expert_distribution_record(loaded):
    with serving(loaded, Limits(max_concurrent=2)) as url:
        assert raw(url, "POST", "/dump_expert_distribution_record")[0] == 400
        assert raw(url, "POST", "/start_expert_distribution_record")[0] == 200
        prompt = [5, 6, 7, 8]
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(3) as pool:  # three requests, two rows: idle rows must not count
            answers = list(pool.map(lambda _: raw(url, "POST", "/v1/completions", body), range(3)))
        assert all(status == 200 for status, _, _ in answers)
        assert raw(url, "POST", "/stop_expert_distribution_record")[0] == 200
        raw(url, "POST", "/v1/completions", body)  # not recorded
        status, _, doc = raw(url, "POST", "/dump_expert_distribution_record")
        assert status == 200 and doc["layers"] == loaded.model.config.moe_layer_indices
        assert doc["tokens"] == 3 * (len(prompt) + 6 - 1)  # each prompt once, then 5 steps
        assert all(sum(counts) == doc["tokens"] * doc["top_k"] for counts in doc["loads"])
        assert metric(url, "dsv2_expert_load") == sum(map(sum, doc["loads"]))


def test_expert_stats_reads_the_dump_as_its_own_loads(loaded, tmp_path):
    """Record through the endpoints, dump to a file, and `dsv2 expert-stats --loads` reports the server's counts."""
    with serving(loaded) as url:
        assert raw(url, "POST", "/start_expert_distribution_record")[0] == 200
        for prompt in ("def add(a, b):", "class Stack:"):
            body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            assert raw(url, "POST", "/v1/completions", body)[0] == 200
        assert raw(url, "POST", "/stop_expert_distribution_record")[0] == 200
        status, _, doc = raw(url, "POST", "/dump_expert_distribution_record")
        _, _, exposition = raw(url, "GET", "/metrics")
    assert status == 200
    gauges = {}  # the server's counts as /metrics exposes them: (layer, expert) -> tokens
    for line in exposition.splitlines():
        if line.startswith("dsv2_expert_load{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1 : line.index("}")].split(","))
            gauges[int(labels["layer"].strip('"')), int(labels["expert"].strip('"'))] = round(float(line.split()[-1]))
    dump, again = tmp_path / "dump.json", tmp_path / "again.json"
    dump.write_text(json.dumps(doc))
    result = CliRunner().invoke(cli_app, ["expert-stats", "--loads", str(dump), "-f", "json", "--save-loads", str(again)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["model"], report["tokens"], report["top_k"]) == (
        loaded.name,
        doc["tokens"],
        loaded.model.config.num_experts_per_tok,
    )
    assert [layer["layer"] for layer in report["layers"]] == loaded.model.config.moe_layer_indices
    for layer in report["layers"]:
        assert layer["counts"] == [gauges[layer["layer"], e] for e in range(report["n_routed_experts"])]
        assert sum(layer["counts"]) == report["tokens"] * report["top_k"]
    assert [layer["counts"] for layer in report["layers"]] == doc["loads"]
    assert json.loads(again.read_text()) == doc  # expert-stats' own loads file is the dump


def test_stop_strings_and_a_request_that_cannot_fit(loaded, monkeypatch):
    from dsv2cli.checkpoint.fit import InsufficientMemoryError
    from dsv2cli.serve import scheduler as scheduler_module

    with serving(loaded) as url:
        api = client(url)
        full = api.completions.create(model=loaded.name, prompt="def add(a, b):", max_tokens=12, temperature=0)
        text = full.choices[0].text
        cut = text[len(text) // 2 :][:2]
        if cut.strip():
            stopped = api.completions.create(model=loaded.name, prompt="def add(a, b):", max_tokens=12, temperature=0, stop=[cut])
            assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[: text.index(cut)]

        def refuse(*args, **kwargs):
            raise InsufficientMemoryError("a request needs 9 GB; 1 GB available")

        monkeypatch.setattr(scheduler_module, "require", refuse)
        status, _, doc = raw(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4})
        assert status == 503 and doc["error"]["code"] == "insufficient_memory"
        monkeypatch.undo()
        assert raw(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 4})[0] == 200


@needs_kernels(compiler_available(), reason="compiled steps need a C++ compiler")
@pytest.mark.slow  # compiles two batch shapes (tens of seconds on two busy cores)
def test_compiled_steps_serve_the_eager_tokens(loaded):
    if not kernels.load().available:
        skip_without_kernels("compiled steps need dsv2's kernels")
    jobs = [([5, 6, 7], 9), ([8, 9, 10, 11, 12], 4), ([3], 7)]

    def ask_all(url):
        body = {"temperature": 0, "ignore_eos": True, "logprobs": 0}
        with ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(lambda job: raw(url, "POST", "/v1/completions", {**body, "prompt": job[0], "max_tokens": job[1]}), jobs)
            )
        return [doc["choices"][0]["logprobs"] for _, _, doc in answers]

    with serving(loaded, Limits(max_concurrent=2)) as url:
        eager = ask_all(url)
    with serving(loaded, Limits(max_concurrent=2), decoder=CompiledDecoder(loaded.model)) as url:
        compiled = ask_all(url)
    assert [d["tokens"] for d in compiled] == [d["tokens"] for d in eager]
    for got, want in zip(compiled, eager, strict=True):
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-3)


def test_cli_help_and_bad_options():
    from typer.testing import CliRunner

    from dsv2cli.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--max-concurrent" in result.output and "Examples:" in result.output
    for args, words in (
        (["--max-concurrent", "0"], "--max-concurrent must be at least 1"),
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--kv-cache-dtype", "int3"], "--kv-cache-dtype"),
        (["demo", "--model", "demo"], "not both"),
    ):
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 1 and words in result.stderr, result.output


def test_prefix_cache_blocks_and_lru():
    import torch

    from dsv2cli.serve.prefix_cache import PrefixCache

    block = 2 * 4 * 3 * 4  # [L=2, 4 tokens, 3 values] of float32
    cache = PrefixCache(max_bytes=3 * block, block_tokens=4)
    entries = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    tokens = list(range(10))
    cache.insert(tokens, entries)  # two whole blocks
    assert cache.bytes == 2 * block
    assert cache.lookup(tokens[:8]) is not None and cache.lookup(tokens[:8]).shape == (2, 4, 3)  # one token must stay
    assert torch.equal(cache.lookup(tokens + [99]), entries[:, :8])
    assert cache.lookup([5, *tokens]) is None  # a block is valid only after the same earlier tokens
    cache.insert([7] * 8, torch.ones(2, 8, 3))  # over the budget: the least recently used block leaves
    assert cache.bytes <= 3 * block
    assert cache.lookup(tokens + [99]).shape[1] == 4  # the prefix's first block outlived its second


@needs_kernels(compiler_available(), reason="int8 and int4 checkpoints run through dsv2's kernels")
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_checkpoint_batches_like_it_runs_alone(model_dir, tmp_path, quantize):
    if not kernels.load().available:
        skip_without_kernels("int8 and int4 checkpoints run through dsv2's kernels")
    from dsv2cli.checkpoint.convert import convert_checkpoint
    from dsv2cli.checkpoint.resolve import bundled_model_dir

    source = model_dir if quantize == "int8" else bundled_model_dir()  # int4 groups of 32: the tiny model has a width of 24
    convert_checkpoint(str(source), tmp_path / quantize, quantize=quantize, probe=False)
    loaded = load_for_generation(str(tmp_path / quantize), "cpu", "float32", read_weights=False)
    jobs = [(PROMPTS[i], 4 + 3 * i) for i in range(6)]

    def ask(url, job):
        body = {"prompt": job[0], "max_tokens": job[1], "temperature": 0, "ignore_eos": True}
        return raw(url, "POST", "/v1/completions", body)[2]["choices"][0]["text"]

    with serving(loaded, Limits(max_concurrent=3)) as url:
        alone = [ask(url, job) for job in jobs]
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda job: ask(url, job), jobs))
    assert together == alone
