"""Measure the bundled demo model against issue #24's targets and write its ``evaluation.json``.

Usage: python benchmarks/demo_evaluate.py MODEL_DIR CORPUS_DIR [--also-trained-on CORPUS_DIR] [--choose-sampling] [--write]

CORPUS_DIR is what ``benchmarks/demo_corpus.py`` built: ``train/<package>/`` (trained on) and
``held_out/<package>/`` (whole packages never trained on). Measured:

* held-out loss on every held-out package (each file one ``BOS text EOS`` document, packed into rows of
  ``seq_len + 1`` as training does), next to the unigram entropy of the same tokens;
* greedy continuations of :data:`SIGNATURES`: how many compile with ``compile()`` up to at least their
  first body statement (the header plus the complete lines after it, longest prefix that compiles);
* 20 sampled outputs with the model's sampling defaults: the longest run of characters they share with
  any training file (a copy is a run longer than 200 characters);
* with ``--choose-sampling``: a small grid of temperature x repetition penalty, scored by how often the
  first statement compiles and how often a line repeats, to pick ``generation_config.json``'s defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.inference.generate import GenerateSettings, generate_batches
from dsv2cli.inference.inputs import PromptInput, to_requests
from dsv2cli.inference.session import load_for_generation
from dsv2cli.inference.tokenizer import TextTokenizer
from dsv2cli.training.data import pack
from dsv2cli.training.evaluate import evaluate_text, first_statement_compiles, summed_loss

# Ten function signatures and class headers; tests/test_train_demo.py uses the same list.
SIGNATURES = (
    "def fibonacci(n):",
    "def is_prime(n):",
    "def read_lines(path):",
    "def merge_dicts(a, b):",
    "def flatten(items):",
    "def parse_args(argv=None):",
    "class Stack:",
    "class Point:",
    "class Config(object):",
    "class ParseError(Exception):",
)
# Ten more openings for the copy check (with the signatures: 20 sampled outputs).
OPENINGS = (
    "import os\n",
    "from typing import",
    "def main():",
    "class Node:",
    "def __repr__(self):",
    "def get(self, key, default=None):",
    "try:\n    import",
    "if __name__ == '__main__':",
    "def to_json(self):",
    "def load(filename):",
)
COPY_LIMIT = 200
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:5.0f} s] {message}", file=sys.stderr, flush=True)


def repeated_line_fraction(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line of the same output exactly."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


@torch.no_grad()
def held_out_loss(model_dir: Path, package_dir: Path, seq_len: int, batch_size: int = 8) -> dict[str, float | int]:
    tokenizer = TextTokenizer.from_path(model_dir)
    texts = [p.read_text(encoding="utf-8") for p in sorted(package_dir.rglob("*.py"))]
    docs = [tokenizer.encode(text, add_bos=False) for text in texts]
    rows = pack(docs, seq_len, tokenizer.bos_id, tokenizer.eos_id)  # [R, S+1]
    model = load_checkpoint(model_dir)
    total = summed_loss(model, rows, batch_size)
    targets = rows[:, 1:].reshape(-1)
    counts = torch.bincount(targets).double()
    probs = counts[counts > 0] / targets.numel()
    return {
        "files": len(texts),
        "bytes": sum(len(t.encode()) for t in texts),
        "tokens": targets.numel(),
        "loss_sum": total,
        "loss": total / targets.numel(),
        "unigram_entropy": float(-(probs * probs.log()).sum()),
        "counts": counts,
    }


def generate(loaded, prompts: list[str], n: int, temperature: float, top_p: float, penalty: float, seed: int | None):
    settings = GenerateSettings(
        max_new_tokens=n, temperature=temperature, top_p=top_p, repetition_penalty=penalty, seed=seed, batch_size=len(prompts)
    )
    requests = to_requests([PromptInput(text=p) for p in prompts], loaded.tokenizer)
    run = generate_batches(loaded, requests, settings.options(loaded, seed), len(prompts))
    return [r.text or "" for r in run.results]


def longest_shared(text: str, corpus: str) -> int:
    """Length of the longest substring of ``text`` found in ``corpus`` when it exceeds half the copy limit, else 0.

    A shared run of 2w characters contains a whole aligned window of w, so only those windows are searched.
    """
    w = COPY_LIMIT // 2
    best = 0
    for start in range(0, max(len(text) - w + 1, 0), w):
        if corpus.find(text[start : start + w]) < 0:
            continue
        lo, hi = start, start + w
        while lo > 0 and corpus.find(text[lo - 1 : hi]) >= 0:
            lo -= 1
        while hi < len(text) and corpus.find(text[lo : hi + 1]) >= 0:
            hi += 1
        best = max(best, hi - lo)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("corpus", type=Path)
    parser.add_argument(
        "--also-trained-on",
        type=Path,
        action="append",
        default=[],
        help="another corpus directory whose train/ the model saw (a run started with --init-from): copies of it count too",
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--choose-sampling", action="store_true")
    parser.add_argument("--write", action="store_true", help="write MODEL/evaluation.json (and the chosen sampling)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()
    sample = evaluate_text(args.model, (args.model / "sample.txt").read_text(encoding="utf-8"), args.seq_len)
    # The top-level numbers are sample.txt's, which tests/test_train_demo.py recomputes.
    report: dict = {"file": "sample.txt", "seq_len": args.seq_len, **sample.to_json()}
    report["ratio"] = sample.loss / sample.unigram_entropy
    log(f"sample.txt: loss {sample.loss:.4f} unigram {sample.unigram_entropy:.4f} ratio {report['ratio']:.4f}")

    packages = {}
    pooled_counts, pooled_loss, pooled_tokens = None, 0.0, 0
    for package_dir in sorted((args.corpus / "held_out").iterdir()):
        r = held_out_loss(args.model, package_dir, args.seq_len)
        counts = r.pop("counts")
        pooled_counts = counts if pooled_counts is None else _add(pooled_counts, counts)
        pooled_loss += r.pop("loss_sum")
        pooled_tokens += r["tokens"]
        r["ratio"] = r["loss"] / r["unigram_entropy"]
        packages[package_dir.name] = r
        log(
            f"{package_dir.name:12} {r['tokens']:7,} tokens  loss {r['loss']:.3f}  unigram {r['unigram_entropy']:.3f}  ratio {r['ratio']:.3f}"
        )
    probs = pooled_counts[pooled_counts > 0] / pooled_counts.sum()
    entropy = float(-(probs * probs.log()).sum())
    loss = pooled_loss / pooled_tokens
    report["held_out_packages"] = {
        "packages": packages,
        "tokens": pooled_tokens,
        "loss": loss,
        "perplexity": math.exp(loss),
        "unigram_entropy": entropy,
        "ratio": loss / entropy,
        "target_ratio": 0.6,
    }
    log(f"pooled: loss {loss:.4f} unigram {entropy:.4f} ratio {loss / entropy:.4f}")

    loaded = load_for_generation(str(args.model), threads=2)
    greedy = generate(loaded, list(SIGNATURES), 64, 0.0, 1.0, 1.0, None)
    ok = [first_statement_compiles(p, t) for p, t in zip(SIGNATURES, greedy, strict=True)]
    report["greedy_compile"] = {
        "max_new_tokens": 64,
        "passed": sum(ok),
        "of": len(ok),
        "target": 7,
        "outputs": [{"prompt": p, "text": t, "compiles": c} for p, t, c in zip(SIGNATURES, greedy, ok, strict=True)],
    }
    log(f"greedy first statements compile: {sum(ok)}/{len(ok)}")

    if args.choose_sampling:
        grid = []
        for temperature in (0.2, 0.3, 0.5, 0.7):
            for penalty in (1.0, 1.2):
                compiled, repeats = 0, 0.0
                for seed in range(2):
                    texts = generate(loaded, list(SIGNATURES), 64, temperature, 0.95, penalty, seed)
                    compiled += sum(first_statement_compiles(p, t) for p, t in zip(SIGNATURES, texts, strict=True))
                    repeats += sum(repeated_line_fraction(t) for t in texts)
                row = {
                    "temperature": temperature,
                    "top_p": 0.95,
                    "repetition_penalty": penalty,
                    "first_statement_compiles": compiled / 20,
                    "repeated_lines": repeats / 20,
                }
                grid.append(row)
                log(json.dumps(row))
        # dsv2 generate takes temperature, top_p and the repetition penalty from generation_config.json.
        best = max(grid, key=lambda r: r["first_statement_compiles"] - r["repeated_lines"])
        report["sampling_grid"] = {"rows": grid, "chosen": best, "rule": "most first statements compiling minus repeated lines"}
        log(f"chosen: {best}")
        if args.write:
            path = args.model / "generation_config.json"
            generation = json.loads(path.read_text()) | {
                "do_sample": True,
                "temperature": best["temperature"],
                "top_p": best["top_p"],
            }
            generation.pop("repetition_penalty", None)
            if best["repetition_penalty"] != 1.0:
                generation["repetition_penalty"] = best["repetition_penalty"]
            path.write_text(json.dumps(generation, indent=2) + "\n")
        defaults = {k: best[k] for k in ("temperature", "top_p", "repetition_penalty")}
    else:
        defaults = loaded.tokenizer.special.generation_defaults
    temperature, top_p = float(defaults.get("temperature", 1.0)), float(defaults.get("top_p", 1.0))
    penalty = float(defaults.get("repetition_penalty", 1.0))
    trained_on = [args.corpus, *args.also_trained_on]
    corpus = "\n\x00".join(p.read_text(encoding="utf-8") for c in trained_on for p in sorted((c / "train").rglob("*.py")))
    prompts = list(SIGNATURES + OPENINGS)
    sampled = generate(loaded, prompts, 128, temperature, top_p, penalty, 0)
    shared = [longest_shared(p + t, corpus) for p, t in zip(prompts, sampled, strict=True)]
    report["copy_check"] = {
        "outputs": len(sampled),
        "max_new_tokens": 128,
        "sampling": {"temperature": temperature, "top_p": top_p, "repetition_penalty": penalty, "seed": 0},
        "limit_chars": COPY_LIMIT,
        "longest_shared_chars": max(shared),
        "copies": sum(s > COPY_LIMIT for s in shared),
        "note": "0 means no shared run reached 100 characters",
    }
    log(f"copy check: longest shared run {max(shared)} chars; copies over {COPY_LIMIT}: {report['copy_check']['copies']}")
    report["seconds"] = time.perf_counter() - began
    text = json.dumps(report, indent=2) + "\n"
    if args.write:
        (args.model / "evaluation.json").write_text(text)
    print(text)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    size = max(len(a), len(b))
    return F.pad(a, (0, size - len(a))) + F.pad(b, (0, size - len(b)))


if __name__ == "__main__":
    main()
