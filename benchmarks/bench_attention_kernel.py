"""The one-pass latent-attention kernel (``dsv2cli/kernels``) against the two BLAS calls it replaces.

Side by side in one process, interleaved, best of ``--rounds``:

* **attention alone**: one decode step's attention over every layer of a latent cache of the
  ``bench-300m`` shape (16 heads, kv_lora_rank 512, rope 64, 4 layers), float32 and bfloat16
  caches, at each ``--contexts``. Successive steps read different copies of the cache (at least
  256 MiB in all), so each layer comes from memory, as in a real step, where the weights stream
  through the CPU's caches between layers; the kernel's rate is printed in multiply-adds per second
  (``--peak`` adds the machine's peak rate of the same instructions, measured in the same run);
* **compiled decode steps** (with ``--checkpoint``, a bench-300m checkpoint or its int8 conversion,
  e.g. the ones ``bench_vs_llamacpp.py --checkpoint`` writes): ``CompiledDecoder(model)`` against
  ``CompiledDecoder(model, ForwardOptions(kernels.load(), attention_kernel=False))`` on the same prefilled cache, rewound after each
  round so both decode at the same context.

    python benchmarks/bench_attention_kernel.py
    python benchmarks/bench_attention_kernel.py --contexts 4096 --peak
    python benchmarks/bench_attention_kernel.py --checkpoint /tmp/bvl/ckpt-dsv2-int8 --cache-dtype bfloat16
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2cli import kernels  # noqa: E402
from dsv2cli.model.attention import _attend_shared  # noqa: E402

HEADS, RANK, ROPE, LAYERS = 16, 512, 64, 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POOL_BYTES = 256 << 20  # copies of the cache cycled through, several times a CPU's last-level cache

# Throughput of the kernel's two products with independent sums (what the hardware can do at
# best): float32 FMAs (16 multiply-adds each) and, with AVX512-BF16, bfloat16 dot products (32).
PEAK_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>

double peak_multiply_adds(bool bfloat16, int64_t threads) {
#if defined(__AVX512F__)
  const int64_t per_thread = 100000000;
  const auto start = std::chrono::steady_clock::now();
  float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(1e-9f * i);
    const __m512 factor = _mm512_set1_ps(0.999f);
    if (bfloat16) {
#if defined(__AVX512BF16__)
      const __m512bh one = (__m512bh)_mm512_set1_epi32(0x3f803f80);
      for (int64_t k = 0; k < per_thread / 16; ++k)
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], one, one);
#endif
    } else {
      for (int64_t k = 0; k < per_thread / 16; ++k)
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], factor, factor);
    }
    for (int i = 0; i < 16; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (sink == 12345.0f) return 0.0;  // keeps the loops
#if !defined(__AVX512BF16__)
  if (bfloat16) return 0.0;
#endif
  return threads * per_thread * (bfloat16 ? 32.0 : 16.0) / seconds;
#else
  return 0.0;
#endif
}
"""


def peak_rates(threads: int) -> dict[str, float]:
    """Peak multiply-adds per second of float32 FMAs and bfloat16 dot products on ``threads`` threads (0: not available)."""
    from torch.utils import cpp_extension

    module = cpp_extension.load_inline(
        "dsv2cli_peak",
        PEAK_SOURCE,
        functions=["peak_multiply_adds"],
        extra_cflags=["-O2", "-march=native", "-fopenmp", "-funroll-loops"],
        extra_ldflags=["-fopenmp"],
    )
    return {name: max(module.peak_multiply_adds(name == "bfloat16", threads) for _ in range(3)) for name in DTYPES}


def multiply_adds(context: int) -> int:
    """Multiply-adds of one step's absorbed attention: every filled entry against every head, scores (C + R) and values (C)."""
    return LAYERS * (context + 1) * HEADS * (2 * RANK + ROPE)


def best_ms(run, repeats: int, rounds: int) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats * 1000)
    return best


def time_attention(dtype: torch.dtype, context: int, rounds: int) -> tuple[float, float]:
    """ms of the BLAS path and of the kernel for one step's attention over every layer, interleaved, best of ``rounds``."""
    capacity = -(-(context + 1) // 256) * 256  # CompiledDecoder's rounding
    step_bytes = LAYERS * capacity * (RANK + ROPE) * dtype.itemsize
    caches = [torch.randn(LAYERS, capacity, RANK + ROPE).to(dtype) for _ in range(-(-POOL_BYTES // step_bytes))]
    query = torch.randn(HEADS, RANK + ROPE)
    mask = (torch.arange(capacity) <= context)[None, None]  # [1, 1, T]: the static-shape step's mask
    filled = torch.tensor([context + 1])
    scale = (128 + ROPE) ** -0.5
    turn = itertools.count()  # which copy the next step reads

    def blas():
        cache = caches[next(turn) % len(caches)]
        for layer in range(LAYERS):
            entries = cache[layer][None]  # [1, T, C + R]
            _attend_shared(query[None, None], entries, entries[..., :RANK], mask, scale)

    def kernel():
        cache = caches[next(turn) % len(caches)]
        for layer in range(LAYERS):
            kernels.load().latent_attention(query, cache[layer], filled, RANK, scale)

    times = [(best_ms(blas, 10, 1), best_ms(kernel, 10, 1)) for _ in range(rounds)]
    return min(t[0] for t in times), min(t[1] for t in times)


def attention_alone(contexts: list[int], rounds: int, peaks: dict[str, float] | None) -> None:
    print(
        f"attention of one decode step, {LAYERS} layers x {HEADS} heads, latent {RANK} + rope {ROPE}, cache read from memory (ms)"
    )
    if peaks:
        print(
            "peak multiply-adds/s, "
            + ", ".join(f"{name} products: {rate / 1e9:.0f} G" if rate else f"{name}: n/a" for name, rate in peaks.items())
        )
    print(
        f"{'cache':>9} {'context':>8} {'BLAS':>8} {'kernel':>8} {'speed-up':>9} {'kernel G mul-add/s':>19}"
        + (f" {'of peak':>8}" if peaks else "")
    )
    for name, dtype in DTYPES.items():
        for context in contexts:
            blas, kernel = time_attention(dtype, context, rounds)
            rate = multiply_adds(context) / (kernel / 1000)
            share = f" {rate / peaks[name]:>8.0%}" if peaks and peaks[name] else (f" {'n/a':>8}" if peaks else "")
            print(f"{name:>9} {context:>8} {blas:>8.3f} {kernel:>8.3f} {blas / kernel:>8.2f}x {rate / 1e9:>19.0f}" + share)


def compiled_steps(checkpoint: str, contexts: list[int], rounds: int, cache_dtype: str | None) -> None:
    from dsv2cli.inference.compiled import CompiledDecoder, round_capacity
    from dsv2cli.inference.engine import prefill_attention
    from dsv2cli.inference.session import load_for_generation
    from dsv2cli.model import ForwardOptions

    model = load_for_generation(checkpoint, "cpu", "float32", torch.get_num_threads()).model
    blas = ForwardOptions(kernels.load(), attention_kernel=False)
    decoders = {"BLAS": CompiledDecoder(model, blas), "kernel": CompiledDecoder(model)}
    dtype = DTYPES[cache_dtype] if cache_dtype else None
    print(f"\ncompiled decode steps of {checkpoint} ({cache_dtype or 'float32'} cache; ms per step, best of {rounds} x 10 steps)")
    print(f"{'context':>8} {'BLAS':>8} {'kernel':>8} {'speed-up':>9}")
    with torch.inference_mode():
        for context in contexts:
            cache = model.new_cache(1, round_capacity(context + 12), dtype=dtype)
            prompt = torch.randint(0, model.config.vocab_size, (1, context))
            model(prompt, cache=cache, attention=prefill_attention("absorbed", context), last_only=True, options=blas)
            for decoder in decoders.values():
                decoder.prepare(cache)
            token = torch.zeros(1, 1, dtype=torch.long)
            times = {name: float("inf") for name in decoders}
            for _ in range(rounds):
                for name, decoder in decoders.items():
                    length = cache.length
                    start = time.perf_counter()
                    for _ in range(10):
                        decoder.step(token, cache)
                    times[name] = min(times[name], (time.perf_counter() - start) / 10 * 1000)
                    cache.truncate(length)  # rewind: both decode at the same context
            print(f"{context:>8} {times['BLAS']:>8.2f} {times['kernel']:>8.2f} {times['BLAS'] / times['kernel']:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="also time compiled decode steps of this checkpoint")
    parser.add_argument("--cache-dtype", choices=list(DTYPES), help="latent cache dtype for --checkpoint")
    parser.add_argument("--peak", action="store_true", help="also measure the peak rate of the kernel's products (AVX-512 CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.load().available:
        sys.exit("the kernels do not build on this machine (see the warning above)")
    attention_alone(args.contexts, args.rounds, peak_rates(args.threads) if args.peak else None)
    if args.checkpoint:
        compiled_steps(args.checkpoint, args.contexts, args.rounds, args.cache_dtype)


if __name__ == "__main__":
    main()
