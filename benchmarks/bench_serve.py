"""`dsv2 serve` under load: time to first token, inter-token latency and aggregate tokens/s at 1, 4 and 16 streams.

Starts `dsv2 serve` as a user would (a subprocess on a loopback port), warms each batch shape up once, then
runs N concurrent streamed completions (greedy, ``ignore_eos``, distinct prompts) per level and reads the
server-sent events as they arrive. Also: one stream against `dsv2 generate` on the same prompt, and a chat's
second turn after a long history with the prefix cache and without it (a second server with
``--prefix-cache-bytes 0``).

    python benchmarks/bench_serve.py                          # the bundled demo model, 2 threads
    python benchmarks/bench_serve.py --model ./lite-int8 --tokens 64 --streams 1 4 16
    python benchmarks/bench_serve.py --no-compile --json out.json

The comparison against llama.cpp's llama-server on the full-size model is not part of this script yet.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "def class import return lambda yield while for print list dict value index result self".split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(args: argparse.Namespace, *extra: str):
    port = free_port()
    command = [sys.executable, "-m", "dsv2cli", "serve", "--port", str(port), "--threads", str(args.threads)]
    command += ["--max-concurrent", str(max(args.streams)), "--max-queue", "256", *extra]
    if args.model:
        command += ["--model", args.model]
    if args.no_compile:
        command.append("--no-compile")
    log = tempfile.TemporaryFile("w+")  # the server's log (a pipe nobody reads would fill up and stall it)
    process = subprocess.Popen(command, cwd=ROOT, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {_tail(log)}")
            time.sleep(0.2)
        yield port
    except OSError:
        raise SystemExit(f"the server stopped answering (exit status {process.poll()}): {_tail(log)}") from None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def _tail(log, size: int = 3000) -> str:
    log.seek(0)
    return log.read()[-size:]


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data.startswith(b"{") else {}


def model_id(port: int) -> str:
    return request(port, "GET", "/v1/models")[1]["data"][0]["id"]


def stream(port: int, path: str, body: dict) -> list[float]:
    """Seconds from sending ``body`` to each streamed token's event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    times = []
    for line in response:
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            break
        chunk = json.loads(line[6:])
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("text") is not None or (choices[0].get("delta") or {}).get("content") is not None):
            if "role" not in (choices[0].get("delta") or {}):
                times.append(time.perf_counter() - start)
    conn.close()
    return times


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_level(port: int, name: str, streams: int, tokens: int) -> dict:
    def one(i: int) -> list[float]:
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 5))
        body = {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        return stream(port, "/v1/completions", body)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(streams)))  # warm-up: compiles this batch shape when steps are compiled
        start = time.perf_counter()
        runs = list(pool.map(one, range(streams)))
        wall = time.perf_counter() - start
    ttft = [times[0] for times in runs if times]
    gaps = [b - a for times in runs for a, b in zip(times, times[1:], strict=False)]
    total = sum(len(times) for times in runs)
    return {
        "streams": streams,
        "tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
    }


GENERATE_TWICE = """
import json, sys
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.inference.generate import choose_decoder, choose_forward
from dsv2cli.inference.session import load_for_generation
model, threads, compile, prompt, tokens = json.loads(sys.argv[1])
loaded = load_for_generation(model, "cpu", "auto", threads)
forward = choose_forward(loaded, None)
decoder, _ = choose_decoder(loaded, None if compile else False, forward)
options = GenerationOptions(max_new_tokens=tokens, ignore_eos=True, eos_token_ids=loaded.eos_token_ids, forward=forward)
for _ in range(2):  # the first run pays the process's one-time costs (compiling, first touches)
    result = Generation(loaded.model, [GenerationRequest(loaded.tokenizer.encode(prompt))], options, loaded.tokenizer, decoder).run()[0]
print(result.timings.decode_tokens_per_s)
"""


def generate_rate(args: argparse.Namespace, tokens: int) -> float:
    """The engine's decode tokens/s (what `dsv2 generate` runs) on the first prompt of the load levels, warm."""
    prompt = " ".join(WORDS[j % len(WORDS)] for j in range(8))
    spec = json.dumps([args.model, args.threads, not args.no_compile, prompt, tokens])
    command = [sys.executable, "-c", GENERATE_TWICE, spec]
    return float(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()[-1])


def second_turn(port: int, name: str, history_tokens: int) -> dict:
    """A chat's second turn after a first turn of about ``history_tokens`` words: its time to first token."""
    for shift in (1, 0):  # the first pass compiles the batch shapes of this length; the second is measured
        result = _second_turn(port, name, history_tokens, shift)
    return result


def _second_turn(port: int, name: str, history_tokens: int, shift: int) -> dict:
    words = " ".join(WORDS[(j + shift) % len(WORDS)] for j in range(history_tokens))
    first = [{"role": "system", "content": words}, {"role": "user", "content": "go on"}]
    status, answer = request(
        port, "POST", "/v1/chat/completions", {"model": name, "messages": first, "max_tokens": 16, "temperature": 0}
    )
    assert status == 200, answer
    messages = [
        *first,
        {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
        {"role": "user", "content": "and?"},
    ]
    body = {"model": name, "messages": messages, "max_tokens": 4, "temperature": 0, "stream_options": {"include_usage": True}}
    times = stream(port, "/v1/chat/completions", body)
    return {"prompt_tokens": answer["usage"]["prompt_tokens"], "ttft_s": times[0] if times else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="MODEL as dsv2 serve takes it (default: the bundled demo)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--history", type=int, default=200, help="words of the first turn in the prefix-cache run")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    results: dict = {"threads": args.threads, "tokens_per_stream": args.tokens, "compile": not args.no_compile}
    with server(args) as port:
        name = model_id(port)
        results["model"] = name
        results["levels"] = [load_level(port, name, n, args.tokens) for n in args.streams]
        results["prefix_cache"] = second_turn(port, name, args.history)
    with server(args, "--prefix-cache-bytes", "0") as port:
        results["no_prefix_cache"] = second_turn(port, name, args.history)
    results["generate_tokens_per_s"] = generate_rate(args, args.tokens)

    print(f"model {name}, {args.threads} threads, {args.tokens} tokens per stream, compiled steps: {not args.no_compile}")
    print(f"{'streams':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}")
    for level in results["levels"]:
        print(
            f"{level['streams']:>8} {level['tokens_per_s']:>9.1f} {level['ttft_p50_s'] * 1e3:>7.0f}ms "
            f"{level['ttft_p99_s'] * 1e3:>7.0f}ms {level['itl_p50_s'] * 1e3:>7.1f}ms {level['itl_p99_s'] * 1e3:>7.1f}ms"
        )
    one = results["levels"][0]
    print(
        f"one stream {one['tokens_per_s']:.1f} tokens/s; dsv2 generate {results['generate_tokens_per_s']:.1f} tokens/s (decode)"
    )
    with_cache, without = results["prefix_cache"], results["no_prefix_cache"]
    print(
        f"second chat turn ({with_cache['prompt_tokens']} + more prompt tokens): time to first token "
        f"{with_cache['ttft_s'] * 1e3:.0f} ms with the prefix cache, {without['ttft_s'] * 1e3:.0f} ms without "
        f"({without['ttft_s'] / with_cache['ttft_s']:.1f}x)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
