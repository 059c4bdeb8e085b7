"""The parity matrix: every decode path against one float64 reference, with the tolerances docs/performance.md states.

Paths: eager or compiled steps (``CompiledDecoder``: the model's own forward, blocks compiled) x float32,
bfloat16 or int8 weights x one row or a left-padded batch x attention through the one-pass C++ kernel or
BLAS. Each path prefills its prompts and then reads a fixed continuation one decode step at a time
(teacher forcing); the reference is the same weights in float64, each prompt alone, in one forward.
"""

import pytest
import torch

from dsv2cli import kernels
from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.inference.compiled import CompiledDecoder, compiler_available, round_capacity
from dsv2cli.model import ForwardOptions
from dsv2cli.model.quantized import absorb_int8, quantize_int8
from dsv2cli.model.transformer import fuse_projections
from tests.helpers import needs_kernels, reference_model, save_reference, skip_without_kernels

STEPS = 5
PROMPTS = {1: [9], 3: [9, 5, 7]}  # rows -> prompt lengths (a batch is left-padded to the longest)

# Largest |logit - reference| allowed, as a share of the reference's largest |logit|:
# float32 differs from float64 by rounding only; bfloat16 weights and activations round to 8 significant
# bits; int8 rounds weights to 1/254 of each row's largest value and decode rows' activations likewise.
TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-2, "int8": 5e-2}
# Share of positions where the path's top token is the reference's.
AGREEMENT = {"float32": 1.0, "bfloat16": 0.9, "int8": 0.9}

can_compile = compiler_available() and kernels.load().available


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("one-forward")
    save_reference(reference_model(seed=21, vocab_size=160), directory)
    return directory


@pytest.fixture(scope="module")
def sequences():
    """Per row count: the tokens ``[rows, longest prompt + STEPS]`` of each row, prompt then continuation (no padding)."""
    generator = torch.Generator().manual_seed(6)
    return {
        rows: [torch.randint(0, 160, (n + STEPS,), generator=generator) for n in lengths] for rows, lengths in PROMPTS.items()
    }


@pytest.fixture(scope="module")
def reference(checkpoint, sequences):
    """float64 logits of each row alone, in one forward: ``{rows: [[S, V] per row]}``."""
    model = load_hf_checkpoint(checkpoint).double()
    with torch.inference_mode():
        return {rows: [model(tokens[None])[0] for tokens in row_tokens] for rows, row_tokens in sequences.items()}


def _model(checkpoint, weights: str):
    if weights == "bfloat16":
        return fuse_projections(load_hf_checkpoint(checkpoint, dtype=torch.bfloat16))
    model = load_hf_checkpoint(checkpoint)
    return absorb_int8(fuse_projections(quantize_int8(model)), kernels.load()) if weights == "int8" else fuse_projections(model)


def _decode(
    model, row_tokens: list[torch.Tensor], options: ForwardOptions, decoder: CompiledDecoder | None
) -> list[torch.Tensor]:
    """Prefill each row's prompt (left-padded together), then STEPS teacher-forced steps -> per row ``[STEPS, V]``."""
    lengths = [len(t) - STEPS for t in row_tokens]
    longest = max(lengths)
    pad = [longest - n for n in lengths]
    prompts = torch.zeros(len(row_tokens), longest, dtype=torch.long)
    for row, (tokens, n) in enumerate(zip(row_tokens, lengths, strict=True)):
        prompts[row, pad[row] :] = tokens[:n]
    cache = model.new_cache(len(row_tokens), round_capacity(longest + STEPS), pad=pad)
    with torch.inference_mode():
        logits = [model(prompts, cache=cache, last_only=True, options=options)[:, -1]]
        for step in range(STEPS - 1):
            token = torch.stack([tokens[n + step] for tokens, n in zip(row_tokens, lengths, strict=True)])[:, None]
            logits.append((model(token, cache=cache, options=options) if decoder is None else decoder.step(token, cache))[:, -1])
    return [torch.stack(logits)[:, row].double() for row in range(len(row_tokens))]


PATHS = [
    pytest.param(mode, weights, rows, kernel, id=f"{mode}-{weights}-{rows}row-{'kernel' if kernel else 'blas'}")
    for mode in ("eager", "compiled")
    for weights in ("float32", "bfloat16", "int8")
    for rows in (1, 3)
    for kernel in (False, True)
]


@pytest.mark.slow  # compiled paths compile the model's blocks for their shape (seconds each after the first)
@pytest.mark.parametrize("mode, weights, rows, kernel", PATHS)
def test_every_decode_path_matches_the_float64_reference(checkpoint, sequences, reference, mode, weights, rows, kernel):
    if (kernel or mode == "compiled") and not can_compile:
        skip_without_kernels("no C++ compiler, or dsv2's kernels do not build here")
    model = _model(checkpoint, weights)
    # dsv2's kernels for the int8 products wherever they build; the attention kernel as the path says.
    options = ForwardOptions(kernels.load(), attention_kernel=kernel)
    decoder = CompiledDecoder(model, options) if mode == "compiled" else None
    got = _decode(model, sequences[rows], options, decoder)
    agree = total = 0
    for row, (logits, tokens) in enumerate(zip(got, sequences[rows], strict=True)):
        n = len(tokens) - STEPS
        expected = reference[rows][row][n - 1 : n - 1 + STEPS]  # the logits at the prompt's last token and after
        error = (logits - expected).abs().max().item()
        assert error <= TOLERANCE[weights] * expected.abs().max().item(), (row, error)
        agree += (logits.argmax(-1) == expected.argmax(-1)).sum().item()
        total += STEPS
    assert agree / total >= AGREEMENT[weights]


@needs_kernels(can_compile, reason="no C++ compiler, or dsv2's kernels do not build here")
def test_compiled_blocks_share_one_graph_per_kind_of_block(checkpoint):
    """Compiling takes the same time for any depth: one graph for the dense blocks and one for the MoE blocks."""
    from torch._dynamo.utils import counters

    model = _model(checkpoint, "float32")
    assert len(model.layers) == 3  # one dense, two MoE
    decoder = CompiledDecoder(model)
    cache = model.new_cache(2, 256)
    before = counters["stats"]["unique_graphs"]
    decoder.prepare(cache)
    assert counters["stats"]["unique_graphs"] - before == 2
    assert decoder.prepare(cache) == 0.0
