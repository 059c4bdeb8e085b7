"""``torch.ops.dsv2cli.latent_attention`` (dsv2cli/kernels): one-pass attention over a latent cache, against softmax attention in float64."""

import functools
import logging
import os
import time

import pytest
import torch

from dsv2cli import kernels
from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.inference.compiled import compiler_available
from dsv2cli.model import ForwardOptions
from dsv2cli.model.attention import MultiHeadLatentAttention
from dsv2cli.model.transformer import fuse_projections
from tests.helpers import reference_model, save_reference, skip_without_kernels


@pytest.fixture(scope="module", autouse=True)
def built():
    if not compiler_available() or not kernels.load().available:
        skip_without_kernels("the C++ kernels do not build here (no compiler, ninja or AVX2)")


@pytest.fixture(scope="module")
def loaded() -> kernels.Kernels:
    return kernels.load()


def _expected(query: torch.Tensor, entries: torch.Tensor, filled: int, rank: int, scale: float) -> torch.Tensor:
    """softmax(scale * query @ entries[:filled]^T) @ entries[:filled, :rank], in float64."""
    kept = entries[:filled].double()
    probs = torch.softmax(scale * query.double() @ kept.t(), dim=-1)
    return (probs @ kept[:, :rank]).float()


# (rows, rank, rope, filled): a row group of 16 and ragged ones (20: two groups and a ragged one with AVX2;
# 32: two pairs of groups; 12: a pair whose second group is ragged), one entry, a block's tail, several
# blocks, and enough entries for each thread to take a range of its own.
SHAPES = [
    (16, 512, 64, 1),
    (16, 512, 64, 7),
    (16, 512, 64, 200),
    (5, 32, 16, 99),
    (20, 64, 2, 650),
    (3, 16, 8, 1000),
    (32, 128, 16, 300),
    (12, 64, 16, 300),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_cache_equals_softmax_attention(loaded, shape, threads):
    rows, rank, rope, filled = shape
    generator = torch.Generator().manual_seed(filled)
    cache = torch.randn(2, filled + 37, rank + rope, generator=generator)  # a layer's view: rows of a bigger tensor
    query = torch.randn(rows, rank + rope, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = loaded.latent_attention(query, cache[1], torch.tensor([filled]), rank, 0.07)
    finally:
        torch.set_num_threads(previous)
    assert got.shape == (rows, rank) and got.dtype == torch.float32
    torch.testing.assert_close(got, _expected(query, cache[1], filled, rank, 0.07), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_cache_is_within_bfloat16_rounding(loaded, shape):
    """Against the same attention with the query rounded to bfloat16 (what bfloat16 products see):
    what is left is the rounding of the probabilities, well under 1 % of the output's range."""
    rows, rank, rope, filled = shape
    generator = torch.Generator().manual_seed(filled)
    cache = torch.randn(filled + 5, rank + rope, generator=generator).to(torch.bfloat16)
    query = torch.randn(rows, rank + rope, generator=generator)
    got = loaded.latent_attention(query, cache, torch.tensor([filled]), rank, 0.07)
    expected = _expected(query.to(torch.bfloat16).float(), cache.float(), filled, rank, 0.07)
    assert (got - expected).abs().max() <= 5e-3 * expected.abs().max()


def test_compiled_call_equals_the_eager_call(loaded):
    """Under torch.compile the operator is one opaque call whose output shape comes from its fake kernel."""
    cache = torch.randn(40, 80)
    query = torch.randn(4, 80)

    def attend(query, cache, slot):
        return loaded.latent_attention(query * 2, cache, slot + 1, 64, 0.1) + 1

    compiled = torch.compile(attend, fullgraph=True, dynamic=False)
    for slot in (0, 17, 39):
        torch.testing.assert_close(compiled(query, cache, torch.tensor([slot])), attend(query, cache, torch.tensor([slot])))


def test_what_it_serves(loaded):
    query = torch.randn(16, 576)
    assert loaded.latent_attention_supported(query, torch.randn(10, 576), 512)
    assert loaded.latent_attention_supported(query, torch.randn(10, 576).to(torch.bfloat16), 512)
    assert not loaded.latent_attention_supported(query, torch.randn(10, 576).to(torch.float16), 512)
    assert not loaded.latent_attention_supported(query, torch.randn(10, 576), 500)  # latent not a multiple of 16
    assert not loaded.latent_attention_supported(query, torch.randn(576, 10).t(), 512)  # entries' values strided
    assert loaded.int8_matmul_supported(torch.zeros(4, 8, dtype=torch.int8))
    assert not loaded.int8_matmul_supported(torch.zeros(8, 4, dtype=torch.int8).t())  # rows strided
    assert not loaded.int8_matmul_supported(torch.zeros(4, 8))  # not int8
    with pytest.raises(RuntimeError, match="entries out of range"):
        loaded.latent_attention(query, torch.randn(10, 576), torch.tensor([11]), 512, 0.1)
    # The handle of a forward that was given none serves nothing.
    assert not kernels.NO_KERNELS.latent_attention_supported(query, torch.randn(10, 576), 512)
    assert not kernels.NO_KERNELS.int8_matmul_supported(torch.zeros(4, 8, dtype=torch.int8))
    assert kernels.load() is loaded  # one handle per process


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape", [(1, 2048, 64), (16, 2048, 64), (3, 100, 37), (1, 8, 1), (300, 256, 64)], ids=lambda s: "x".join(map(str, s))
)
def test_float_matmul_equals_a_float64_product(loaded, shape, threads):
    """The router's product: decode rows and a prefill's, any width and output count (a tail past the vectors)."""
    rows, width, outputs = shape
    generator = torch.Generator().manual_seed(width + outputs)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(outputs + 2, width, generator=generator)[1:-1]  # a view into a bigger tensor
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = loaded.float_matmul(x, weight)
    finally:
        torch.set_num_threads(previous)
    assert got.shape == (rows, outputs) and got.dtype == torch.float32
    torch.testing.assert_close(got, (x.double() @ weight.double().t()).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [(1, 2048, 1408, 4), (16, 1408, 64, 4), (7, 100, 13, 3), (3, 30, 5, 2), (40, 192, 41, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_int8_matmul_is_exact_on_ragged_shapes(loaded, shape, threads):
    """Exact int32 sums whatever the width (vector tails), output count (short blocks), rows sharing a matrix
    (the weight sums of the offset VNNI path reused) and rows with no matrix (id -1: zeros)."""
    rows, width, outputs, experts = shape
    generator = torch.Generator().manual_seed(rows * width + outputs)
    x = torch.randint(-127, 128, (rows, width), dtype=torch.int8, generator=generator)
    weight = torch.randint(-127, 128, (experts, outputs, width), dtype=torch.int8, generator=generator)
    step, scale = torch.rand(rows, 1, generator=generator), torch.rand(experts, outputs, generator=generator)
    ids = torch.randint(-1, experts, (rows,), generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = loaded.int8_matmul(x, step, weight, scale, ids)
    finally:
        torch.set_num_threads(previous)
    sums = torch.einsum("ri,roi->ro", x.long(), weight[ids.clamp(min=0)].long())  # exact, in int64
    expected = (sums.float() * scale[ids.clamp(min=0)] * step).masked_fill(ids[:, None] < 0, 0.0)
    assert torch.equal(got, expected)


def test_float_matmul_rows_do_not_depend_on_each_other(loaded):
    """A row gives the same bits alone and among others (a sequence routes alike alone, batched or prefilled)."""
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(40, 2048, generator=generator), torch.randn(64, 2048, generator=generator)
    together = loaded.float_matmul(x, weight)
    for row in (0, 1, 17, 39):
        assert torch.equal(loaded.float_matmul(x[row : row + 1], weight), together[row : row + 1])
    assert torch.equal(loaded.float_matmul(x[5:21], weight), together[5:21])
    assert loaded.float_matmul(x[:0], weight).shape == (0, 64)


def test_what_float_matmul_serves(loaded):
    weight = torch.randn(64, 32)
    assert loaded.float_matmul_supported(torch.randn(16, 32), weight)
    assert loaded.float_matmul_supported(torch.randn(512, 32), weight)  # a prefill too: rows must not route by batch
    assert not loaded.float_matmul_supported(torch.randn(1, 32).bfloat16(), weight.bfloat16())
    assert not loaded.float_matmul_supported(torch.randn(1, 32), torch.randn(32, 64).t())  # rows strided
    assert not kernels.NO_KERNELS.float_matmul_supported(torch.randn(1, 32), weight)


def test_a_failed_build_is_logged_once_and_reported_as_unavailable(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "load", functools.cache(kernels.load.__wrapped__))  # a process that has not loaded yet

    def fail():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(kernels, "_build_and_load", fail)
    with caplog.at_level(logging.WARNING, logger="dsv2cli.kernels"):
        handle = kernels.load()
        assert kernels.load() is handle  # not tried again
    assert not handle.available and handle.error == "Ninja is required to load C++ extensions"
    assert [r.getMessage() for r in caplog.records] == [
        "dsv2cli kernels unavailable, decoding with BLAS attention: Ninja is required to load C++ extensions"
    ]
    assert not handle.latent_attention_supported(torch.randn(4, 80), torch.randn(10, 80), 64)
    assert not handle.int8_matmul_supported(torch.zeros(4, 8, dtype=torch.int8))


def test_the_build_finds_ninja_without_changing_the_environment(monkeypatch, tmp_path):
    """Without ninja on PATH the wheel's binary is put in front for the build only."""
    before = os.environ.get("PATH")
    seen = []
    with kernels._path_with(str(tmp_path)):
        seen.append(os.environ["PATH"])
    assert seen[0].split(os.pathsep)[0] == str(tmp_path)
    assert os.environ.get("PATH") == before
    with pytest.raises(RuntimeError), kernels._path_with(str(tmp_path)):
        raise RuntimeError("a failed build")
    assert os.environ.get("PATH") == before
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/ninja")
    assert kernels._ninja_directory() is None  # on PATH already: nothing is added


@pytest.mark.parametrize("pad", [[0], [3, 0, 5]], ids=["one-row", "left-padded-batch"])
def test_model_decode_steps_through_the_kernel_equal_blas(loaded, tmp_path, pad):
    """Options with the attention kernel: eager one-token steps attend through it, each row over its own slots (from its
    padding on); without it (``attention_kernel=False``), through BLAS, in the same process and model."""
    save_reference(reference_model(seed=11), tmp_path)
    model = fuse_projections(load_hf_checkpoint(tmp_path))
    prompt = torch.randint(0, 128, (len(pad), 9), generator=torch.Generator().manual_seed(4))
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    calls = []
    original = kernels.Kernels.latent_attention

    def counted(self, query, entries, filled, rank, scale):
        calls.append((entries.shape[0], tuple(filled.tolist())))
        return original(self, query, entries, filled, rank, scale)

    blas, kernel = ForwardOptions(loaded, attention_kernel=False), ForwardOptions(loaded)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.Kernels, "latent_attention", counted)
        caches = [model.new_cache(len(pad), 16, pad=pad) for _ in range(2)]
        logits = [model(prompt, cache=cache, last_only=True, options=kernel) for cache in caches]
        token = logits[0][:, -1:].argmax(-1)
        for _ in range(4):
            expected = model(token, cache=caches[0], options=blas)
            got = model(token, cache=caches[1], options=kernel)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)
    # one call per row per layer per step, each over the row's own slots
    assert len(calls) == 4 * len(attentions) * len(pad)
    assert {filled for _, filled in calls} == {(p, 10 + step) for step in range(4) for p in pad}


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """torch's extension builder waits forever on a lock file left by a killed build."""
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    for directory in (fresh, stale):
        directory.mkdir()
        (directory / "lock").touch()
    old = time.time() - kernels.STALE_LOCK_S - 5
    os.utime(stale / "lock", (old, old))
    with caplog.at_level(logging.WARNING, logger="dsv2cli.kernels"):
        kernels._clear_stale_lock(fresh)
        kernels._clear_stale_lock(stale)
        kernels._clear_stale_lock(tmp_path / "never-built")
    assert (fresh / "lock").exists() and not (stale / "lock").exists()
    assert len(caplog.records) == 1 and "interrupted build" in caplog.records[0].getMessage()
