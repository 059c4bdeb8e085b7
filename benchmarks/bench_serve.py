"""`dsv2 serve` under load, and llama.cpp's `llama-server` beside it: time to first token, inter-token latency, tokens/s.

Starts `dsv2 serve` as a user would (a subprocess on a loopback port), warms each batch shape up once (on
other prompts of the same lengths, so no measured prompt is in a prompt cache), then runs N concurrent
streamed completions (greedy, ``ignore_eos``, distinct prompts) per level (1, 4 and 16
streams) and reads the server-sent events as they arrive: time to first token and inter-token latency
(p50 / p99) per level, and aggregate tokens/s (the completion tokens the servers report, over the level's
wall time). Also: one stream against `dsv2 generate` on the same prompt, and a chat's second turn after a
long history with the prefix cache and without it (a second server with ``--prefix-cache-bytes 0``).

``--llama-server`` adds llama.cpp's ``llama-server`` on the same model and threads under the same load: the
same requests (``/v1/completions``, ``stream: true``, same prompts, ``temperature: 0``, ``max_tokens``,
``ignore_eos: true``), started as a user would (``-m GGUF -t THREADS -np <most streams> -c <slots x
--slot-context>``, continuous batching). llama.cpp is built from the PyPI sdist of llama-cpp-python into
``--cache-dir`` once, as ``bench_vs_llamacpp.py`` builds it (``benchmarks/llamacpp.py``; the
``llama-server`` target the first time: minutes on 2 cores). The GGUF is ``--gguf``, or MODEL converted with
the sdist's ``convert_hf_to_gguf.py`` (F32 for a floating-point HF checkpoint, which `dsv2 serve` runs in
float32 on CPU); an int8 / int4 dsv2 checkpoint cannot be read by that converter, so it takes ``--gguf`` or
``--gguf-from`` the floating-point checkpoint it was made from (converted to Q8_0 / Q4_0). Conversions are
kept under ``--cache-dir``. If llama-server asserts (in weight repacking, as llama-bench does on
DeepSeek-V2 Q8_0 files here), it is started again with ``--no-repack`` and the report says so;
``--llama-server-args`` adds options of your own.

The engines take turns, one server at a time (the full-size pair does not fit in 24 GB together): each
``--rounds`` round starts each engine's server after the same page-cache state (emptied as root, then that
engine's weight files read) and runs every level; the order alternates between rounds; each engine keeps, per
level, its round with the most tokens/s. It prints each engine's table and the ratios dsv2 / llama-server per
level (tokens/s: above 1 = dsv2 faster; latencies: below 1 = dsv2 sooner).

    python benchmarks/bench_serve.py                          # the bundled demo model, 2 threads
    python benchmarks/bench_serve.py --model ./lite-int8 --tokens 64 --streams 1 4 16
    python benchmarks/bench_serve.py --no-compile --json out.json
    python benchmarks/bench_serve.py --llama-server           # the demo against llama-server (F32 GGUF)
    python benchmarks/bench_serve.py --model /tmp/demo-int8 --llama-server --gguf-from dsv2cli/assets/demo  # Q8_0
    python benchmarks/bench_serve.py --model ./lite-int8 --llama-server --gguf ./lite-q8_0.gguf --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from llamacpp import (  # noqa: E402
    DEFAULT_CACHE,
    converter,
    llama_server_binary,
    llama_server_command,
    llama_source,
    log,
    same_page_cache_state,
    to_gguf,
)

DEMO = ROOT / "dsv2cli" / "assets" / "demo"
WORDS = "def class import return lambda yield while for print list dict value index result self".split()
GGUF_TYPES = {"int8": "q8_0", "int4": "q4_0"}  # a quantized dsv2 checkpoint -> the GGUF type compared with it


class ServerFailed(Exception):
    """A server exited or stopped answering; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(command: list[str], port: int) -> Iterator[int]:
    """Run a server command until it answers ``GET /health`` with 200; stop it with SIGTERM afterwards."""
    log_file = tempfile.TemporaryFile("w+")  # the server's log (a pipe nobody reads would fill up and stall it)
    process = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerFailed(f"{Path(command[0]).name} did not start: {_tail(log_file)}")
            time.sleep(0.2)
        yield port
    except OSError:
        raise ServerFailed(f"the server stopped answering (exit status {process.poll()}): {_tail(log_file)}") from None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def dsv2_server(args: argparse.Namespace, *extra: str) -> AbstractContextManager[int]:
    port = free_port()
    command = [sys.executable, "-m", "dsv2cli", "serve", "--port", str(port), "--threads", str(args.threads)]
    command += ["--max-concurrent", str(max(args.streams)), "--max-queue", "256", *extra]
    if args.model:
        command += ["--model", args.model]
    if args.no_compile:
        command.append("--no-compile")
    return running(command, port)


def _tail(log_file, size: int = 3000) -> str:
    log_file.seek(0)
    return log_file.read()[-size:]


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data.startswith(b"{") else {}


def model_id(port: int) -> str:
    return request(port, "GET", "/v1/models")[1]["data"][0]["id"]


def stream(port: int, path: str, body: dict) -> tuple[list[float], int | None]:
    """Seconds from sending ``body`` to each streamed token's event, and the completion tokens of ``usage``.

    A token's event carries text (or a chat delta's content). Not counted: a chat's opening role chunk, a
    closing chunk with no text and a finish reason (llama-server sends one after the last token), and a
    ``usage`` chunk (no choices).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    times, completion_tokens = [], None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            break
        chunk = json.loads(line[6:])
        completion_tokens = (chunk.get("usage") or {}).get("completion_tokens", completion_tokens)
        choices = chunk.get("choices") or []
        if not choices:
            continue
        delta = choices[0].get("delta") or {}
        text = choices[0].get("text") if "text" in choices[0] else delta.get("content")
        if text is None or "role" in delta or (text == "" and choices[0].get("finish_reason")):
            continue
        times.append(time.perf_counter() - start)
    conn.close()
    return times, completion_tokens


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_level(port: int, name: str, streams: int, tokens: int) -> dict:
    def one(i: int, shift: int = 0) -> tuple[list[float], int | None]:
        prompt = " ".join(WORDS[(i + j + shift) % len(WORDS)] for j in range(8 + i % 5))
        body = {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        return stream(port, "/v1/completions", body)

    with ThreadPoolExecutor(streams) as pool:
        # warm-up (compiles this batch shape when steps are compiled) on other prompts of the same lengths, so that
        # the measured prompts are not in either server's prompt cache
        list(pool.map(one, range(streams), [len(WORDS) // 2] * streams))
        start = time.perf_counter()
        runs = list(pool.map(one, range(streams)))
        wall = time.perf_counter() - start
    ttft = [times[0] for times, _ in runs if times]
    gaps = [b - a for times, _ in runs for a, b in zip(times, times[1:], strict=False)]
    total = sum(len(times) if reported is None else reported for times, reported in runs)
    return {
        "streams": streams,
        "tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        # after each stream's first token, as `dsv2 generate` reports its decode rate
        "decode_tokens_per_s": sum(len(times) - 1 for times, _ in runs if len(times) > 1)
        / max(sum(times[-1] - times[0] for times, _ in runs if len(times) > 1), 1e-9),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
    }


def load_levels(port: int, args: argparse.Namespace) -> list[dict]:
    name = model_id(port)
    return [load_level(port, name, n, args.tokens) for n in args.streams]


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
    times, _ = stream(port, "/v1/chat/completions", body)
    return {"prompt_tokens": answer["usage"]["prompt_tokens"], "ttft_s": times[0] if times else float("nan")}


# ---- llama-server ---------------------------------------------------------------------------------------------


def model_directory(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model not in (None, "demo") else DEMO


def quantization(directory: Path) -> str | None:
    """``int8`` / ``int4`` for a quantized dsv2 checkpoint (its manifest says so), else None."""
    manifest = directory / "manifest.json"
    return json.loads(manifest.read_text()).get("quantization") if manifest.is_file() else None


def gguf_for(args: argparse.Namespace, source: Path) -> Path:
    """``--gguf``, or the GGUF of the same model at the precision `dsv2 serve` runs MODEL at, converted once."""
    if args.gguf:
        return args.gguf
    model = model_directory(args)
    if not model.is_dir():
        raise SystemExit(f"--llama-server: {model} is not a local directory; pass --gguf FILE (a GGUF of the same model)")
    quantized = quantization(model)
    if quantized and args.gguf_from is None:
        raise SystemExit(
            f"--llama-server: {model} is an {quantized} dsv2 checkpoint, which llama.cpp's converter cannot read; pass "
            "--gguf FILE, or --gguf-from the floating-point (HF) checkpoint it was made from"
        )
    checkpoint = (args.gguf_from or model).resolve()
    if quantization(checkpoint) or (checkpoint / "manifest.json").is_file():
        raise SystemExit(f"--llama-server: {checkpoint} is not an HF-layout checkpoint (dsv2 convert --to hf makes one)")
    directory = args.cache_dir / "gguf" / hashlib.sha256(str(checkpoint).encode()).hexdigest()[:12]
    outtype = GGUF_TYPES.get(quantized, "f32")  # a float checkpoint: dsv2 serve runs it in float32 on CPU
    return to_gguf(converter(source, args.cache_dir), source, checkpoint, outtype, directory)


class LlamaServer:
    """Starts llama-server on the GGUF; once it has asserted, every later start adds ``--no-repack``."""

    def __init__(self, args: argparse.Namespace, binary: Path, gguf: Path) -> None:
        self.args, self.binary, self.gguf = args, binary, gguf
        self.repack = True

    def command(self, port: int) -> list[str]:
        args = self.args
        command = llama_server_command(
            self.binary, self.gguf, args.threads, max(args.streams), args.slot_context, port, self.repack
        )
        return [*command, *shlex.split(args.llama_server_args)]

    def levels(self) -> list[dict]:
        port = free_port()
        try:
            with running(self.command(port), port):
                return load_levels(port, self.args)
        except ServerFailed as failure:
            if not self.repack or "GGML_ASSERT" not in str(failure):
                raise
            log(f"llama-server asserted; starting it again with --no-repack: {str(failure)[-300:]}")
            self.repack = False
            return self.levels()


def best_levels(rounds: list[list[dict]]) -> list[dict]:
    """Per level, the round with the most tokens/s (shared machines only ever slow a run down)."""
    return [max(level, key=lambda r: r["tokens_per_s"]) for level in zip(*rounds, strict=True)]


def engine_files(args: argparse.Namespace, engine: str, gguf: Path | None) -> list[Path]:
    """The weight files an engine reads: the GGUF file, or MODEL's safetensors files."""
    return [gguf] if engine == "llama-server" and gguf else sorted(model_directory(args).glob("*.safetensors"))


def measure(args: argparse.Namespace, results: dict, llama: LlamaServer | None) -> None:
    """Every engine's levels ``--rounds`` times, one server at a time, alternating the order; dsv2's prefix-cache runs."""
    runs: dict[str, Callable[[], list[dict]]] = {"dsv2": lambda: _dsv2_round(args, results)}
    if llama is not None:
        runs["llama-server"] = llama.levels
    rounds: dict[str, list[list[dict]]] = {engine: [] for engine in runs}
    for index in range(args.rounds):
        order = list(runs) if index % 2 == 0 else list(reversed(runs))
        for engine in order:
            log(f"round {index + 1}/{args.rounds}: {engine} ...")
            if llama is not None:
                same_page_cache_state(engine_files(args, engine, llama.gguf))
            rounds[engine].append(runs[engine]())
    results["levels"] = best_levels(rounds["dsv2"])
    if llama is not None:
        results["llama_server"] = {"gguf": str(llama.gguf), "repack": llama.repack, "levels": best_levels(rounds["llama-server"])}
        results["ratios"] = [
            {"streams": ours["streams"], **{key: ours[key] / theirs[key] for key in LEVEL_MEASURES}}
            for ours, theirs in zip(results["levels"], results["llama_server"]["levels"], strict=True)
        ]


def _dsv2_round(args: argparse.Namespace, results: dict) -> list[dict]:
    """One dsv2 server: every level, then (the first time) a chat's second turn with the prefix cache."""
    with dsv2_server(args) as port:
        levels = load_levels(port, args)
        if "prefix_cache" not in results:
            results["model"] = model_id(port)
            results["prefix_cache"] = second_turn(port, results["model"], args.history)
    return levels


# ---- report ---------------------------------------------------------------------------------------------------

LEVEL_MEASURES = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")


def print_levels(title: str, levels: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'streams':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}")
    for level in levels:
        print(
            f"{level['streams']:>8} {level['tokens_per_s']:>9.1f} {level['ttft_p50_s'] * 1e3:>7.0f}ms "
            f"{level['ttft_p99_s'] * 1e3:>7.0f}ms {level['itl_p50_s'] * 1e3:>7.1f}ms {level['itl_p99_s'] * 1e3:>7.1f}ms"
        )


def print_report(args: argparse.Namespace, results: dict) -> None:
    name = results["model"]
    print(f"model {name}, {args.threads} threads, {args.tokens} tokens per stream, compiled steps: {not args.no_compile}")
    rounds = f"best of {args.rounds} rounds per level" if args.rounds > 1 else "one round"
    print_levels(f"dsv2 serve ({rounds})", results["levels"])
    if "llama_server" in results:
        llama = results["llama_server"]
        repack = "" if llama["repack"] else ", --no-repack"
        print_levels(f"llama-server, {Path(llama['gguf']).name}{repack} ({rounds})", llama["levels"])
        print("\ndsv2 / llama-server (tokens/s: above 1 = dsv2 faster; latencies: below 1 = dsv2 sooner)")
        print(f"{'streams':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}")
        for ratio in results["ratios"]:
            print(f"{ratio['streams']:>8} " + " ".join(f"{ratio[key]:>8.2f}x" for key in LEVEL_MEASURES))
        print("target: tokens/s at 16 streams >= 1.5x llama-server")
    one = results["levels"][0]
    generate = results["generate_tokens_per_s"]
    print(
        f"\none stream {one['tokens_per_s']:.1f} tokens/s end to end, {one['decode_tokens_per_s']:.1f} after its first token; "
        f"dsv2 generate {generate:.1f} tokens/s (decode): {one['decode_tokens_per_s'] / generate:.2f}x"
    )
    with_cache, without = results["prefix_cache"], results["no_prefix_cache"]
    print(
        f"second chat turn ({with_cache['prompt_tokens']} + more prompt tokens): time to first token "
        f"{with_cache['ttft_s'] * 1e3:.0f} ms with the prefix cache, {without['ttft_s'] * 1e3:.0f} ms without "
        f"({without['ttft_s'] / with_cache['ttft_s']:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MODEL as dsv2 serve takes it (default: the bundled demo)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--history", type=int, default=200, help="words of the first turn in the prefix-cache run")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--llama-server", action="store_true", help="also measure llama.cpp's llama-server under the same load")
    parser.add_argument("--gguf", type=Path, default=None, help="llama-server's model: a GGUF of the same model")
    parser.add_argument(
        "--gguf-from", type=Path, default=None, help="without --gguf: the HF checkpoint to convert (int8/int4 MODEL)"
    )
    parser.add_argument("--llama-server-args", default="", help="more llama-server options: --llama-server-args='--no-mmap'")
    parser.add_argument("--slot-context", type=int, default=512, help="llama-server's context per slot (-c is slots x this)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every engine this many times and keep each one's best")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="the llama.cpp sdist, build, converter copy and GGUF conversions"
    )
    args = parser.parse_args()
    if args.llama_server and args.tokens + 64 > args.slot_context:
        parser.error("--slot-context must leave room for a prompt (64 tokens) besides --tokens")
    # the servers and the generate run start in the repository root: paths given relative to here must still hold
    if args.model and Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    args.gguf, args.gguf_from = (path.resolve() if path else None for path in (args.gguf, args.gguf_from))

    llama = None
    if args.llama_server:
        source = llama_source(args.cache_dir)
        llama = LlamaServer(args, llama_server_binary(source, max(1, os.cpu_count() or 1)), gguf_for(args, source))
    results: dict = {"threads": args.threads, "tokens_per_stream": args.tokens, "compile": not args.no_compile}
    measure(args, results, llama)
    with dsv2_server(args, "--prefix-cache-bytes", "0") as port:
        results["no_prefix_cache"] = second_turn(port, results["model"], args.history)
    results["generate_tokens_per_s"] = generate_rate(args, args.tokens)
    print_report(args, results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ServerFailed as failure:
        raise SystemExit(str(failure)) from None
