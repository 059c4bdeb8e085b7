"""int4 weights (``model/int4.py``, ``kernels/int4_matmul.cpp``, ``dsv2 convert --quantize int4``).

Every path is held to the dequantized model: the same int4 weights expanded to float (float64 for the kernel
and the parity matrix). Tolerances, as a share of the reference's largest value:
- the kernel against float64 sums of the same int8 rows and int4 weights: 1e-5 (int32 sums per group are exact;
  only the float32 sum over groups rounds);
- rows through the kernel (decode rows; prefills too on CPUs without AVX512-BF16), which quantize activations to
  int8 per row, against the dequantized float model: 5e-2 of the largest logit at 90 % of the positions, top-1
  agreement at least 90 %; at every position 0.15, as int8 activations can move a token's router scores across a
  top-k boundary and so change its experts (position 6 of the 3-row case here: 0.10);
- rows without the kernels (the weight dequantized to the activation dtype): exact.
Tiny configs whose input dimensions are multiples of 32 (q_lora_rank 32 instead of the helpers' 24).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from typer.testing import CliRunner

from dsv2cli import kernels
from dsv2cli.checkpoint.convert import convert_checkpoint
from dsv2cli.checkpoint.loader import load_checkpoint, load_hf_checkpoint
from dsv2cli.checkpoint.native import MANIFEST_NAME, read_manifest
from dsv2cli.checkpoint.verify import verify_checkpoint
from dsv2cli.cli.main import app
from dsv2cli.errors import UnsupportedError
from dsv2cli.inference.compiled import CompiledDecoder, compiler_available, round_capacity
from dsv2cli.model import ForwardOptions
from dsv2cli.model.int4 import (
    Int4Linear,
    Int4RoutedExperts,
    absorb_int4,
    dequantize_groups,
    int4_linear,
    pack,
    quantize_groups,
    quantize_int4,
    unpack,
)
from dsv2cli.model.quantized import quantize_activation
from dsv2cli.model.transformer import fuse_projections
from tests.helpers import (
    needs_kernels,
    one_error_line,
    one_thread_per_module,  # noqa: F401 (autouse fixture)
    reference_model,
    save_reference,
    skip_without_kernels,
)

runner = CliRunner()
have_kernels = kernels.load().available
KERNELS = "no C++ compiler, or dsv2's kernels do not build here"
DECODE_TOLERANCE, FLIPPED_TOLERANCE, DECODE_AGREEMENT = 5e-2, 0.15, 0.9
SHAPES = {"q_lora_rank": 32, "vocab_size": 160}  # every input dimension a multiple of 32


# ---- the format ---------------------------------------------------------------------------------------------------


def test_one_group_by_hand():
    """Q4_0's rule: d = (value of largest magnitude) / -8, levels round(w / d) + 8 in [0, 15]; 16 bytes per 32 values."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 16], w[0, 17] = -1.0, 0.9, 0.5, 1.0
    packed, scale = quantize_groups(w, 32)
    assert scale.dtype == torch.float16 and scale.tolist() == [[0.125]]
    assert packed.shape == (1, 16) and packed.dtype == torch.uint8
    # byte j: value j low, value 16 + j high. -1 -> 0, 0.9 -> 15 (7.2 rounds to 7), 0.5 -> 12, 1.0 -> 16 clamps to 15, 0 -> 8.
    assert packed[0, :3].tolist() == [0 | 12 << 4, 15 | 15 << 4, 8 | 8 << 4]
    deq = dequantize_groups(packed, scale, torch.float32)
    assert deq[0, [0, 1, 16, 17, 2]].tolist() == [-1.0, 0.875, 0.5, 0.875, 0.0]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_pack_round_trip_and_error_bound(group):
    torch.manual_seed(group)
    levels = torch.randint(0, 16, (3, 5, 256), dtype=torch.uint8)
    assert torch.equal(unpack(pack(levels)), levels.to(torch.int8) - 8)
    w = torch.randn(3, 5, 256)
    packed, scale = quantize_groups(w, group)
    assert packed.shape == (3, 5, 128) and scale.shape == (3, 5, 256 // group)
    error = (dequantize_groups(packed, scale, torch.float32) - w).view(3, 5, -1, group).abs()
    step = scale.float().abs()[..., None]
    assert (error <= step * (1 + 1e-3)).all()  # half a step, a whole one where +8 clamps to +7
    assert (error <= step / 2 * (1 + 1e-3)).float().mean() > 0.99
    extreme = w.view(3, 5, -1, group).abs().amax(-1)
    assert torch.allclose(step[..., 0] * 8, extreme, rtol=1e-3)  # the largest magnitude is kept (float16 scale)


def test_group_size_that_does_not_divide_an_input_dimension_names_the_tensor():
    model = reference_model()  # q_lora_rank 24
    from dsv2cli.config import ModelConfig
    from dsv2cli.model import DeepseekV2

    config = ModelConfig.from_hf(model.config.to_dict())
    with torch.device("meta"):
        meta = DeepseekV2(config)
    with pytest.raises(
        UnsupportedError, match=r"does not divide the input dimension 24 of layers\.0\.self_attn\.q_b_proj\.weight"
    ):
        quantize_int4(meta, 32)


# ---- the kernel ---------------------------------------------------------------------------------------------------


def _kernel_reference(values, step, packed, scale, ids):
    deq = dequantize_groups(packed, scale, torch.float64)  # [E, O, I]
    out = torch.zeros(values.shape[0], packed.shape[1], dtype=torch.float64)
    for r in range(values.shape[0]):
        if ids[r] >= 0:
            out[r] = deq[ids[r]] @ (values[r].double() * step[r].double())
    return out


# E, O, I, rows: output rows not a multiple of the kernel's block of 4, I = 64 n + 32 (a tail block), ids repeated.
CASES = [(1, 37, 256, 1), (4, 64, 512, 5), (3, 130, 128, 16), (6, 8, 1024, 12), (2, 24, 160, 3), (3, 33, 96, 7)]


@needs_kernels(have_kernels, reason=KERNELS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernel_matches_float64_sums_of_the_same_values(group):
    torch.manual_seed(group)
    handle = kernels.load()
    for experts, outputs, width, rows in [case for case in CASES if case[2] % group == 0]:
        packed, scale = quantize_groups(torch.randn(experts, outputs, width), group)
        values, step = quantize_activation(torch.randn(rows, width))
        ids = torch.randint(-1, experts, (rows,))
        ids[0] = experts - 1  # at least one row through a matrix
        got = handle.int4_matmul(values, step, packed, scale, ids)
        expected = _kernel_reference(values, step, packed, scale, ids)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert (got[ids < 0] == 0).all()
        plain = handle.int4_matmul(values, step, packed[:1], scale[:1])  # no ids: every row through matrix 0
        assert torch.allclose(
            plain.double(),
            _kernel_reference(values, step, packed[:1], scale[:1], [0] * rows),
            rtol=0,
            atol=1e-5 * plain.abs().max().item(),
        )


@needs_kernels(have_kernels, reason=KERNELS)
def test_a_rows_result_does_not_depend_on_the_other_rows():
    """Rows sharing a matrix go through the kernel two at a time (each load of levels unpacked once for both)."""
    torch.manual_seed(4)
    handle = kernels.load()
    packed, scale = quantize_groups(torch.randn(3, 36, 256), 32)
    values, step = quantize_activation(torch.randn(9, 256))
    ids = torch.tensor([0, 2, 0, 0, 1, 2, 0, 1, 0])
    together = handle.int4_matmul(values, step, packed, scale, ids)
    for r in range(9):
        alone = handle.int4_matmul(values[r : r + 1], step[r : r + 1], packed, scale, ids[r : r + 1])
        assert torch.equal(alone[0], together[r])


@pytest.mark.slow  # builds the portable loop beside the loaded kernels (~30 s on 2 cores)
@needs_kernels(have_kernels, reason=KERNELS)
def test_portable_fallback_matches_the_vector_path(tmp_path):
    from torch.utils import cpp_extension

    name = "dsv2cli_int4_portable"
    source = Path(kernels.__file__).with_name("int4_matmul.cpp")
    flags = ["-O2", "-DDSV2_INT4_PORTABLE", f"-DDSV2_INT4_NAMESPACE={name}"]
    cpp_extension.load(name, [str(source)], extra_cflags=flags, build_directory=str(tmp_path), is_python_module=False)
    torch.manual_seed(3)
    for experts, outputs, width, rows in CASES:
        packed, scale = quantize_groups(torch.randn(experts, outputs, width), 64 if width % 64 == 0 else 32)
        values, step = quantize_activation(torch.randn(rows, width))
        ids = torch.randint(-1, experts, (rows,))
        portable = getattr(torch.ops, name).int4_matmul(values, step.reshape(-1), packed, scale, ids)
        vector = kernels.load().int4_matmul(values, step, packed, scale, ids)
        assert (portable - vector).abs().max() <= 1e-5 * vector.abs().max().clamp_min(1e-30)


# ---- the modules --------------------------------------------------------------------------------------------------


def test_rows_without_the_kernels_equal_the_dequantized_linear():
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 48, bias=False)
    int4 = Int4Linear.from_linear(linear, 64)
    x = torch.randn(2, 20, 128)
    expected = F.linear(x, dequantize_groups(int4.weight, int4.scale, torch.float32))
    assert torch.equal(int4(x), expected)
    assert torch.allclose(int4(x[:, :1]), expected[:, :1], rtol=1e-5, atol=1e-6)  # one row: BLAS's other kernel
    if have_kernels:  # a prefill's rows through the kernel (or dequantized, on CPUs with AVX512-BF16)
        assert (int4(x, kernels.load()) - expected).abs().max() <= 2e-2 * expected.abs().max()


@needs_kernels(have_kernels, reason=KERNELS)
def test_decode_rows_through_the_kernel_against_the_dequantized_linear_and_experts():
    torch.manual_seed(2)
    handle = kernels.load()
    linear = Int4Linear.from_linear(torch.nn.Linear(256, 96, bias=False), 32)
    x = torch.randn(3, 1, 256)
    got = int4_linear(x, linear.weight, linear.scale, handle)
    expected = F.linear(x, dequantize_groups(linear.weight, linear.scale, torch.float32))
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()

    from dsv2cli.config import ModelConfig
    from dsv2cli.model.moe import RoutedExperts

    experts = RoutedExperts(ModelConfig.from_hf(reference_model(**SHAPES).config.to_dict()))  # 8 experts, D 64, M 32
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    int4 = Int4RoutedExperts.from_experts(experts, 32)
    ids, weights = torch.tensor([[1, 6], [6, -1], [0, 3]]), torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]])
    tokens = torch.randn(3, 64)
    via_kernel = int4(tokens, ids, weights, handle)
    dequantized = int4(tokens, ids, weights)  # no kernels: each expert dequantized
    assert (via_kernel - dequantized).abs().max() <= 2e-2 * dequantized.abs().max()


# ---- every decode path against the dequantized model ----------------------------------------------------------------


STEPS = 5
PROMPTS = {1: [9], 3: [9, 5, 7]}
can_compile = compiler_available() and have_kernels


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return save_reference(reference_model(seed=22, **SHAPES), tmp_path_factory.mktemp("int4-hf"))


def _int4_model(hf: Path, group: int = 32):
    model = fuse_projections(quantize_int4(load_hf_checkpoint(hf), group))
    return absorb_int4(model, kernels.load()) if have_kernels else model


def _dequantized(hf: Path, int4_model, dtype=torch.float64):
    """The float model with every int4 weight of ``int4_model`` expanded (the reference of every int4 path)."""
    model = load_hf_checkpoint(hf).to(dtype)
    with torch.no_grad():
        for path, module in int4_model.named_modules():
            if isinstance(module, Int4Linear):
                model.get_submodule(path).weight.copy_(dequantize_groups(module.weight, module.scale, dtype))
            elif isinstance(module, Int4RoutedExperts):
                target = model.get_submodule(path)
                target.gate_up_proj.copy_(dequantize_groups(module.gate_up_proj, module.gate_up_proj_scale, dtype))
                target.down_proj.copy_(dequantize_groups(module.down_proj, module.down_proj_scale, dtype))
    return model


@pytest.fixture(scope="module")
def sequences():
    generator = torch.Generator().manual_seed(6)
    return {
        rows: [torch.randint(0, 160, (n + STEPS,), generator=generator) for n in lengths] for rows, lengths in PROMPTS.items()
    }


def _decode(model, row_tokens, options, decoder):
    """Prefill each row's prompt (left-padded together), then teacher-forced steps -> per row ``[STEPS, V]``."""
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
    pytest.param(
        mode,
        rows,
        kernel,
        id=f"{mode}-{rows}row-{'kernel' if kernel else 'blas'}",
        marks=[pytest.mark.slow] * (mode == "compiled"),
    )
    for mode in ("eager", "compiled")
    for rows in (1, 3)
    for kernel in (False, True)
]


@pytest.mark.parametrize("mode, rows, kernel", PATHS)
def test_every_int4_decode_path_matches_the_dequantized_float64_model(hf, sequences, mode, rows, kernel):
    if not can_compile:
        skip_without_kernels(KERNELS)
    model = _int4_model(hf)
    reference = _dequantized(hf, model)
    options = ForwardOptions(kernels.load(), attention_kernel=kernel)
    decoder = CompiledDecoder(model, options) if mode == "compiled" else None
    got = _decode(model, sequences[rows], options, decoder)
    agree = total = within = 0
    with torch.inference_mode():
        for logits, tokens in zip(got, sequences[rows], strict=True):
            n = len(tokens) - STEPS
            expected = reference(tokens[None])[0, n - 1 : n - 1 + STEPS]  # [STEPS, V]
            error = (logits - expected).abs().amax(-1) / expected.abs().max()  # per position
            assert (error <= FLIPPED_TOLERANCE).all(), error
            within += (error <= DECODE_TOLERANCE).sum().item()
            agree += (logits.argmax(-1) == expected.argmax(-1)).sum().item()
            total += STEPS
    assert within / total >= 0.9 and agree / total >= DECODE_AGREEMENT


# ---- dsv2 convert --quantize int4 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native(hf, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("int4") / "native"
    report = convert_checkpoint(str(hf), output, quantize="int4", probe=True)
    assert report.quantization == "int4" and report.group_size == 32 and report.to_json()["group_size"] == 32
    assert report.quality is not None and math.isfinite(report.quality.change.log_likelihood_change)
    return output


def test_convert_writes_the_scheme_and_loads_as_the_dequantized_model(hf, native):
    manifest = read_manifest(native)
    assert manifest.quantization == "int4" and manifest.group_size == 32
    entry = manifest.tensors["layers.1.mlp.experts.gate_up_proj"]
    assert entry["dtype"] == "U8" and entry["shape"] == [8, 64, 32]  # [E, 2M, D / 2]
    assert manifest.tensors["layers.1.mlp.experts.gate_up_proj_scale"] == {
        "file": entry["file"],
        "dtype": "F16",
        "shape": [8, 64, 2],
    }
    assert manifest.tensors["lm_head.scale"]["shape"] == [160, 2]
    assert (
        manifest.tensors["embed_tokens.weight"]["dtype"] == "F32" and "layers.0.self_attn.kv_b_proj.scale" not in manifest.tensors
    )
    assert verify_checkpoint(native).ok
    model = load_checkpoint(native)
    assert isinstance(model.lm_head, Int4Linear) and isinstance(model.layers[1].mlp.experts, Int4RoutedExperts)
    assert model.layers[1].mlp.experts.down_proj_scale.dtype == torch.float16  # mapped as stored
    same = quantize_int4(load_hf_checkpoint(hf), 32)  # the converter quantizes as the transform does
    assert torch.equal(model.lm_head.weight, same.lm_head.weight) and torch.equal(model.lm_head.scale, same.lm_head.scale)
    tokens = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(tokens)  # prefill rows: dequantized weights
        expected = _dequantized(hf, same, torch.float32)(tokens)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_generate_and_info_read_an_int4_checkpoint(native):
    result = runner.invoke(app, ["generate", "-m", str(native), "--token-ids", "5,6,7", "-n", "3", "--no-compile", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"][0]["token_ids"]) == 3
    info = runner.invoke(app, ["info", "deepseek-v2-lite", "-f", "json"])
    read = json.loads(info.stdout)["weight_bytes_per_token"]
    assert read["int4"] < 0.6 * read["int8"] < read["bfloat16"]


def test_expert_stats_and_cache_report_measure_run_an_int4_checkpoint(native, tmp_path):
    text = tmp_path / "ids.jsonl"
    text.write_text("\n".join(json.dumps({"prompt_token_ids": [(7 * i + j) % 160 for j in range(40)]}) for i in range(5)))
    result = runner.invoke(app, ["expert-stats", str(text), "-m", str(native), "--threads", "1", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] > 0
    args = ["cache-report", str(native), "--measure", "--measure-context", "16", "--decode-steps", "2", "--dtype", "float32"]
    result = runner.invoke(app, [*args, "-f", "json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["measured"]
    assert measured["weights"] == "checkpoint" and all(row["matches"] for row in measured["rows"])


def test_group_size_not_dividing_a_dimension_is_one_error_naming_the_tensor(tmp_path):
    hf24 = save_reference(reference_model(seed=3), tmp_path / "hf24")  # q_lora_rank 24
    result = runner.invoke(app, ["convert", str(hf24), str(tmp_path / "out"), "--quantize", "int4"])
    line = one_error_line(result)
    assert "does not divide the input dimension 24 of layers.0.self_attn.q_b_proj.weight" in line
    assert "--group-size" in result.stderr and not (tmp_path / "out").exists()
    line = one_error_line(runner.invoke(app, ["convert", str(hf24), str(tmp_path / "out"), "--group-size", "64"]))
    assert "--group-size applies to --quantize int4 only" in line


def test_requantizing_an_int4_checkpoint_is_refused_with_a_hint(native, tmp_path):
    result = runner.invoke(app, ["convert", str(native), str(tmp_path / "again"), "--quantize", "int4"])
    assert "already quantized (int4)" in one_error_line(result)
    assert "Hint: convert from the floating-point checkpoint" in result.stderr


def _copy(native: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(native, tmp_path / "copy"))


def test_mismatched_scale_shape_is_one_error_naming_the_tensor(native, tmp_path):
    copy = _copy(native, tmp_path)
    file = read_manifest(copy).tensors["layers.1.self_attn.o_proj.scale"]["file"]
    tensors = load_file(copy / file)
    tensors["layers.1.self_attn.o_proj.scale"] = tensors["layers.1.self_attn.o_proj.scale"][
        :, :1
    ].contiguous()  # [O, 1]: groups of 64
    save_file(tensors, copy / file)
    result = runner.invoke(app, ["generate", "-m", str(copy), "--token-ids", "5", "-n", "1", "--no-compile"])
    line = one_error_line(result)
    assert "int4 scale 'layers.1.self_attn.o_proj.scale' has shape [64, 1]; group size 32 needs [64, 2]" in line


def test_a_manifest_claiming_int4_over_int8_data_is_one_error_naming_the_tensor(hf, tmp_path):
    int8 = tmp_path / "int8"
    convert_checkpoint(str(hf), int8, quantize="int8", probe=False)
    path = int8 / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(quantization="int4", group_size=32)
    path.write_text(json.dumps(manifest))
    line = one_error_line(runner.invoke(app, ["verify", str(int8)]))
    assert "holds int8 data (I8" in line and "says int4" in line and "'layers.0.self_attn.q_a_proj.weight'" in line


@needs_kernels(have_kernels, reason=KERNELS)
def test_int4_on_the_demo_stays_within_the_issues_quality_bound():
    """docs/convert.md states the cost on the bundled demo (groups of 32): +0.0200 nats and 93.3 % top-1 over 255
    tokens; held here to the issue's bound, 0.05 nats and 90 %, over 128 eager decode steps."""
    from dsv2cli.checkpoint.resolve import bundled_model_dir
    from dsv2cli.inference.quality import teacher_forced_decode_change
    from dsv2cli.inference.tokenizer import TextTokenizer

    demo = bundled_model_dir()
    assert demo is not None
    tokens = torch.tensor([TextTokenizer.from_directory(demo).encode((demo / "sample.txt").read_text())[:128]])
    reference = load_hf_checkpoint(demo)
    int4 = absorb_int4(fuse_projections(quantize_int4(load_hf_checkpoint(demo), 32)), kernels.load())
    quality = teacher_forced_decode_change(reference, int4, tokens, options=ForwardOptions(kernels.load()))
    assert quality.tokens == 127
    assert abs(quality.log_likelihood_change) <= 0.05 and quality.top1_agreement >= 0.9
