"""Compiled decode steps (the model's own forward, blocks through torch.compile): the same tokens as eager decoding.

Compiling takes tens of seconds on two cores the first time, so each model here is compiled once.
tests/test_one_forward.py holds every path against a float64 reference.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from dsv2cli import kernels
from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.cli.main import app
from dsv2cli.errors import InputError
from dsv2cli.inference import compiled as compiled_module
from dsv2cli.inference.compiled import CAPACITY_STEP, CompiledDecoder, compiler_available, round_capacity
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.inference.sampling import SamplingParams
from dsv2cli.model import ForwardOptions
from dsv2cli.model.transformer import fuse_projections
from tests.helpers import needs_kernels, reference_model, save_reference

needs_compiler = needs_kernels(
    compiler_available() and kernels.load().available, reason="compiled steps need a C++ compiler and dsv2's kernels"
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compiled")
    save_reference(reference_model(seed=7, vocab_size=160), directory)
    model = fuse_projections(load_hf_checkpoint(directory))
    return model, CompiledDecoder(model)


def _generate(model, prompts, decoder=None, **options):
    requests = [GenerationRequest(p, None, i) for i, p in enumerate(prompts)]
    return Generation(model, requests, GenerationOptions(**options), decoder=decoder).run()


@needs_compiler
@pytest.mark.slow  # compiles a model (tens of seconds on two cores the first time)
def test_compiled_steps_give_the_eager_logits(compiled):
    model, decoder = compiled
    prompt = torch.randint(0, 160, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager_cache, compiled_cache = model.new_cache(1, CAPACITY_STEP), model.new_cache(1, CAPACITY_STEP)
        logits = model(prompt, cache=eager_cache, last_only=True)
        model(prompt, cache=compiled_cache, last_only=True)
        assert decoder.serves(compiled_cache)
        assert decoder.options.latent_attention is not None  # the one-pass C++ attention serves this model (latent rank 32)
        assert decoder.prepare(compiled_cache) > 0
        assert decoder.prepare(compiled_cache) == 0.0  # this shape is compiled now
        token = logits[:, -1:].argmax(-1)
        for _ in range(8):
            expected = model(token, cache=eager_cache)
            got = decoder.step(token, compiled_cache)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)
        assert compiled_cache.length == eager_cache.length
        torch.testing.assert_close(compiled_cache.entries, eager_cache.entries, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.slow  # compiles a model (tens of seconds on two cores the first time)
def test_generation_through_the_compiled_step_equals_eager(compiled):
    model, decoder = compiled
    prompt = [0, 17, 99, 150, 3, 44, 61]
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    for options in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "sampling": sampled}):
        (eager,) = _generate(model, [prompt], **options)
        (fast,) = _generate(model, [prompt], decoder, **options)
        assert fast.token_ids == eager.token_ids
        assert fast.logprobs == pytest.approx(eager.logprobs, abs=1e-4)
        assert fast.timings.compile_s == 0.0  # this cache shape (one row, 256 slots) was compiled by the test above
    # A left-padded batch of two rows decodes through its own compiled graph: the same tokens as each prompt alone.
    other = [0, 5, 9, 11]
    batch = _generate(model, [prompt, other], decoder, max_new_tokens=6)
    assert batch[0].timings.compile_s > 0
    for row, alone in zip(batch, (_generate(model, [p], max_new_tokens=6)[0] for p in (prompt, other)), strict=True):
        assert row.token_ids == alone.token_ids


@needs_compiler
@pytest.mark.slow  # compiles a second model
def test_two_decoders_each_run_their_own_model(compiled, tmp_path):
    """Blocks of two models share compiled graphs where their shapes agree: each decoder still runs its own model's weights."""
    model, decoder = compiled
    save_reference(reference_model(seed=8, vocab_size=176), tmp_path)
    other = fuse_projections(load_hf_checkpoint(tmp_path))
    other_decoder = CompiledDecoder(other)
    prompt = torch.randint(0, 160, (1, 5), generator=torch.Generator().manual_seed(4))
    token = torch.tensor([[7]])
    with torch.inference_mode():
        for m, d in ((model, decoder), (other, other_decoder), (model, decoder)):
            eager_cache, compiled_cache = m.new_cache(1, CAPACITY_STEP), m.new_cache(1, CAPACITY_STEP)
            m(prompt, cache=eager_cache)
            m(prompt, cache=compiled_cache)
            torch.testing.assert_close(d.step(token, compiled_cache), m(token, cache=eager_cache), rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.slow  # compiles a second cache shape
def test_another_cache_shape_compiles_its_own_graph(compiled):
    """A larger cache gets graphs of its own."""
    model, decoder = compiled
    prompt = torch.randint(0, 160, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        eager_cache, compiled_cache = model.new_cache(1, 2 * CAPACITY_STEP), model.new_cache(1, 2 * CAPACITY_STEP)
        logits = model(prompt, cache=eager_cache, last_only=True)
        model(prompt, cache=compiled_cache, last_only=True)
        assert decoder.prepare(compiled_cache) > 0
        token = logits[:, -1:].argmax(-1)
        for _ in range(3):
            expected = model(token, cache=eager_cache)
            torch.testing.assert_close(decoder.step(token, compiled_cache), expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)


@needs_compiler
@pytest.mark.slow  # compiles two more cache shapes
def test_steps_skip_guards_yet_each_cache_shape_runs_its_own_graph(compiled):
    """Steps run only the guards that tell compiled graphs apart: caches of three shapes (batch size, capacity)
    stepped in turn each get their own graph, and a shape never prepared is compiled by its first step."""
    model, decoder = compiled
    generator = torch.Generator().manual_seed(6)
    shapes = [(1, CAPACITY_STEP), (2, CAPACITY_STEP), (1, 3 * CAPACITY_STEP)]
    with torch.inference_mode():
        caches = []
        for batch, capacity in shapes:
            prompt = torch.randint(0, 160, (batch, 7), generator=generator)
            eager_cache, compiled_cache = model.new_cache(batch, capacity), model.new_cache(batch, capacity)
            logits = model(prompt, cache=eager_cache, last_only=True)
            model(prompt, cache=compiled_cache, last_only=True)
            caches.append([eager_cache, compiled_cache, logits[:, -1:].argmax(-1)])
        for _ in range(3):
            for entry in caches:  # never prepared: (1, 3 * CAPACITY_STEP) compiles in its first step
                eager_cache, compiled_cache, token = entry
                expected = model(token, cache=eager_cache)
                torch.testing.assert_close(decoder.step(token, compiled_cache), expected, rtol=1e-5, atol=1e-5)
                entry[2] = expected[:, -1:].argmax(-1)


@needs_compiler  # the compiled fixture builds a CompiledDecoder
def test_steps_it_serves(compiled):
    model, decoder = compiled
    assert decoder.serves(model.new_cache(1, 8))
    assert decoder.serves(model.new_cache(2, 8, pad=[1, 0]))
    assert not decoder.serves(model.new_cache(1, 8), routing_hook=lambda decision: None)
    assert [round_capacity(n) for n in (1, CAPACITY_STEP, CAPACITY_STEP + 1)] == [CAPACITY_STEP, CAPACITY_STEP, 2 * CAPACITY_STEP]


@needs_compiler  # the compiled fixture builds a CompiledDecoder
def test_without_a_compiler_it_says_so(compiled, monkeypatch):
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    assert "C++ compiler" in compiled_module.cannot_compile(compiled[0])
    with pytest.raises(InputError, match="C\\+\\+ compiler"):
        CompiledDecoder(compiled[0])


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo-int8") / "int8"
    convert_checkpoint("demo", directory, quantize="int8", probe=False)
    return directory


@needs_compiler
@pytest.mark.slow  # compiles a model (tens of seconds on two cores the first time)
def test_cli_compile_on_an_int8_checkpoint(demo_int8):
    """`dsv2 generate` on the bundled model converted to int8 compiles its decode steps by default; --no-compile opts out."""
    runner = CliRunner()
    args = ["generate", "-m", str(demo_int8), "def add(a, b):", "-n", "16", "-f", "json"]
    eager = runner.invoke(app, [*args, "--no-compile"])
    fast = runner.invoke(app, args)
    assert eager.exit_code == 0 and fast.exit_code == 0, fast.output
    eager_result, fast_result = json.loads(eager.stdout)["results"][0], json.loads(fast.stdout)["results"][0]
    assert fast_result["timings"]["compile_s"] > 0 and eager_result["timings"]["compile_s"] == 0
    assert len(fast_result["token_ids"]) == len(eager_result["token_ids"]) == 16
    assert fast_result["token_ids"][0] == eager_result["token_ids"][0]  # the prefill's token, before any compiled step


@needs_compiler
@pytest.mark.slow  # compiles a model (tens of seconds on two cores the first time)
def test_compiled_int8_decode_keeps_the_stated_log_likelihood_change(demo_int8):
    """The compiled int8 step stays within the int8 decode path's stated cost (docs/convert.md) on the demo.

    Compiled kernels sum in another order than eager ones, which can move an activation across an int8
    rounding boundary, so compiled and eager int8 are close rather than equal; both are held to float32.
    """
    from dsv2cli.checkpoint.loader import load_checkpoint
    from dsv2cli.checkpoint.resolve import bundled_model_dir
    from dsv2cli.inference.quality import teacher_forced_decode_change
    from dsv2cli.inference.tokenizer import TextTokenizer

    demo = bundled_model_dir()
    tokens = torch.tensor([TextTokenizer.from_directory(demo).encode((demo / "sample.txt").read_text())[:128]])
    reference = load_hf_checkpoint(demo)
    int8 = fuse_projections(load_checkpoint(demo_int8, torch.float32))  # as `dsv2 generate` loads it on CPU
    eager = teacher_forced_decode_change(reference, int8, tokens, options=ForwardOptions(kernels.load()))
    fast = teacher_forced_decode_change(reference, int8, tokens, CompiledDecoder(int8))
    assert fast.tokens == eager.tokens == 127
    assert abs(fast.log_likelihood_change) <= 0.02 and fast.top1_agreement >= 0.95
    assert abs(fast.log_likelihood_change - eager.log_likelihood_change) <= 0.01


@needs_compiler
@pytest.mark.slow  # compiles a model (tens of seconds on two cores the first time)
def test_a_bfloat16_cache_keeps_the_stated_log_likelihood_change():
    """A bfloat16 latent cache (``--kv-cache-dtype bfloat16``): attention in bfloat16, eagerly and compiled.

    Stated in docs/generate.md: about 0.001 nats and 99.6 % top-1 agreement on the demo's sample.
    """
    from dsv2cli.checkpoint.resolve import bundled_model_dir
    from dsv2cli.inference.quality import teacher_forced_decode_change
    from dsv2cli.inference.tokenizer import TextTokenizer

    demo = bundled_model_dir()
    tokens = torch.tensor([TextTokenizer.from_directory(demo).encode((demo / "sample.txt").read_text())[:128]])
    reference = load_hf_checkpoint(demo)
    model = fuse_projections(load_hf_checkpoint(demo))
    for decoder in (None, CompiledDecoder(model)):
        quality = teacher_forced_decode_change(reference, model, tokens, decoder, cache_dtype=torch.bfloat16)
        assert abs(quality.log_likelihood_change) <= 0.005 and quality.top1_agreement >= 0.97, (decoder, quality)
        assert quality.log_likelihood_change != 0.0  # the cache really was narrower
