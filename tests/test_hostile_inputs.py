"""Malformed variants of every untrusted format (property-based): one ``Error:`` line, exit 1, nothing at OUTPUT.

Formats: safetensors header, shard index, native manifest, config.json, generation_config.json,
tokenizer_config.json, JSON-lines prompts and the trainer state. Each property runs a few dozen
generated cases through the reader or the command, within a few seconds.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from typer.testing import CliRunner

from dsv2cli.checkpoint.files import INDEX_NAME, read_safetensors_header
from dsv2cli.cli.main import app
from dsv2cli.errors import DSV2Error
from dsv2cli.inference.inputs import read_input_file
from dsv2cli.inference.tokenizer import read_special_tokens
from dsv2cli.training import checkpointing
from dsv2cli.training.settings import TrainSettings
from tests.helpers import one_error_line, one_thread_per_module, reference_model, save_reference  # noqa: F401

runner = CliRunner()
FAST = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_subnormal=False) | st.text(max_size=6)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_reference(reference_model(seed=9), tmp_path_factory.mktemp("hostile") / "hf", shard_size="90KB")


@pytest.fixture(scope="module")
def native(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "native"
    result = runner.invoke(app, ["convert", str(checkpoint), str(out), "--no-probe"])
    assert result.exit_code == 0, result.output
    return out


def _copy(source: Path, tmp_path: Path, name: str) -> Path:
    """A copy of ``source`` (made once per test; each example restores the files it changed from ``source``)."""
    target = tmp_path / name
    if not target.exists():
        shutil.copytree(source, target)
    for path in source.iterdir():
        if path.is_file() and path.stat().st_mtime_ns != (target / path.name).stat().st_mtime_ns:
            shutil.copy2(path, target / path.name)
    return target


def _verify_fails(directory: Path) -> None:
    """``dsv2 verify`` reports the damage: exit 1, no traceback, a problem listed or one Error line."""
    result = runner.invoke(app, ["verify", str(directory)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    if result.stderr.startswith("Error"):
        one_error_line(result)
    else:
        assert "problem" in result.output, result.output


def _fails_cleanly(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    return one_error_line(result)


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header: object, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@FAST
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "__entry__", "__metadata__"]), value=json_values)
def test_safetensors_header_agrees_with_the_library(checkpoint, tmp_path, field, value):
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    header, data = _header(shard)
    name = next(k for k in header if k != "__metadata__")
    if field == "__entry__":
        header[name] = value
    elif field == "__metadata__":
        header["__metadata__"] = value
    else:
        header[name] = {**header[name], field: value}
    path = tmp_path / "model.safetensors"
    _write_header(path, header, data)
    try:
        with safe_open(str(path), framework="pt"):
            library_accepts = True
    except Exception:
        library_accepts = False
    try:
        read_safetensors_header(path)
        ours = True
    except ValueError:
        ours = False
    assert library_accepts or not ours  # what the library refuses, dsv2 refuses


@FEW
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "__entry__"]), value=json_values)
def test_malformed_header_is_one_error_line_in_verify(checkpoint, tmp_path, field, value):
    directory = _copy(checkpoint, tmp_path, "src")
    shard = sorted(directory.glob("*.safetensors"))[0]
    header, data = _header(shard)
    name = next(k for k in header if k != "__metadata__")
    header[name] = value if field == "__entry__" else {**header[name], field: value}
    _write_header(shard, header, data)
    _verify_fails(directory)


@FEW
@given(value=json_values)
def test_malformed_index_is_one_error_line(checkpoint, tmp_path, value):
    directory = _copy(checkpoint, tmp_path, "src")
    index = json.loads((directory / INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    if isinstance(value, str):
        value = [value]  # a string could name a real shard; anything else is malformed
    index["weight_map"][name] = value
    (directory / INDEX_NAME).write_text(json.dumps(index))
    _verify_fails(directory)


@FEW
@given(where=st.sampled_from(["tensor", "tensor.file", "tensor.shape", "file", "file.bytes", "top"]), value=json_values)
def test_malformed_manifest_is_one_error_line(native, tmp_path, where, value):
    directory = _copy(native, tmp_path, "native")
    manifest = json.loads((directory / "manifest.json").read_text())
    tensor = next(iter(manifest["tensors"]))
    file = next(iter(manifest["files"]))
    if where == "tensor":
        manifest["tensors"][tensor] = value
    elif where.startswith("tensor."):
        manifest["tensors"][tensor][where.split(".")[1]] = value if value != [] else "x"
    elif where == "file":
        manifest["files"][file] = value
    elif where == "file.bytes":
        manifest["files"][file]["bytes"] = value if value != manifest["files"][file]["bytes"] else -1
    else:
        manifest = value if not isinstance(value, dict) else {**value, "format": None}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    _verify_fails(directory)


CONFIG_KEYS = [
    "hidden_size", "num_hidden_layers", "vocab_size", "rope_theta", "rope_scaling", "rope_parameters", "n_shared_experts",
    "n_routed_experts", "rms_norm_eps", "tie_word_embeddings", "num_experts_per_tok", "qk_rope_head_dim", "eos_token_id",
    "max_position_embeddings", "topk_method",
]  # fmt: skip


@FAST
@given(key=st.sampled_from(CONFIG_KEYS), value=json_values | st.integers(-(10**12), 10**12))
def test_malformed_config_is_refused_or_described(checkpoint, tmp_path, key, value):
    config = json.loads((checkpoint / "config.json").read_text())
    config[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = runner.invoke(app, ["info", str(path), "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        one_error_line(result)


@FEW
@given(key=st.sampled_from(["hidden_size", "rope_scaling", "tie_word_embeddings", "n_shared_experts"]), value=json_values)
def test_malformed_config_leaves_nothing_at_output(checkpoint, tmp_path, key, value):
    directory = _copy(checkpoint, tmp_path, "src")
    config = json.loads((directory / "config.json").read_text())
    if config.get(key) == value:
        return
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    output = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(directory), str(output), "--no-probe"])
    if result.exit_code == 0:  # a value the model accepts (a different but valid config) converts; start again
        shutil.rmtree(output)
        return
    one_error_line(result)
    assert not output.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("depth", [100, 200_000])
def test_deeply_nested_json_everywhere(checkpoint, tmp_path, depth):
    deep = "[" * depth + "]" * depth
    directory = _copy(checkpoint, tmp_path, "src")
    (directory / INDEX_NAME).write_text('{"weight_map": ' + deep + "}")
    _verify_fails(directory)
    config = tmp_path / "config.json"
    config.write_text('{"extra": ' + deep + "}")
    assert "nested" in _fails_cleanly(["info", str(config)])
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": ' + deep + "}\n")
    with pytest.raises(DSV2Error, match="nested"):
        read_input_file(prompts)


SPECIAL_FILES = {
    "tokenizer_config.json": ["bos_token", "eos_token", "add_bos_token", "chat_template"],
    "generation_config.json": [
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "do_sample",
        "eos_token_id",
        "bos_token_id",
    ],
}


@FAST
@given(file=st.sampled_from(sorted(SPECIAL_FILES)), data=st.data(), value=json_values)
def test_malformed_tokenizer_and_generation_config(tmp_path, file, data, value):
    key = data.draw(st.sampled_from(SPECIAL_FILES[file]))
    directory = tmp_path / "ckpt"
    directory.mkdir(exist_ok=True)
    for name in SPECIAL_FILES:
        (directory / name).unlink(missing_ok=True)
    (directory / file).write_text(json.dumps({key: value}))
    try:
        special = read_special_tokens(directory)
    except DSV2Error as exc:
        assert file in exc.message
        return
    assert special.chat_template is None or isinstance(special.chat_template, str)
    assert isinstance(special.add_bos_token, bool)
    for name, given_value in special.generation_defaults.items():
        assert isinstance(given_value, (int, float, bool)) and given_value == given_value, name


@FAST
@given(line=st.text(max_size=40) | json_values.map(json.dumps))
def test_malformed_json_lines(tmp_path, line):
    path = tmp_path / "in.jsonl"
    path.write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        prompts = read_input_file(path)
    except DSV2Error:
        return
    assert prompts


STATE_KEYS = ["step", "seconds", "settings", "data_fingerprint", "eval_history", "param_groups"]


@FAST
@given(
    key=st.sampled_from([*STATE_KEYS, "settings.lr", "settings.inputs", "settings.balance", "settings.unknown"]),
    value=json_values,
)
def test_malformed_trainer_state(tmp_path, key, value):
    state = {
        "step": 1,
        "seconds": 1.0,
        "settings": TrainSettings(inputs=["x"], output="y").to_json(),
        "data_fingerprint": "abc",
        "eval_history": [[1, 2.0]],
        "param_groups": [{"lr": 0.1}],
    }
    if key.startswith("settings."):
        state["settings"][key.split(".")[1]] = value
    else:
        state[key] = value
    path = tmp_path / "run" / checkpointing.TRAINER_DIR / checkpointing.STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    try:
        loaded = checkpointing.read_trainer_state(tmp_path / "run")
        TrainSettings.from_json(loaded["settings"])
    except DSV2Error:
        return


def test_surrogates_and_non_utf8_input(tmp_path):
    from dsv2cli.inference.inputs import PromptInput, to_requests
    from dsv2cli.untrusted import check_text

    with pytest.raises(DSV2Error, match="lone surrogate"):
        check_text("a\ud800b", "prompt 1")
    with pytest.raises(DSV2Error, match="lone surrogate"):
        to_requests([PromptInput(text="x\udcff")], tokenizer=object())  # type: ignore[arg-type]
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xff\xfe not utf-8\n")
    with pytest.raises(DSV2Error, match="UTF-8"):
        read_input_file(path)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ 'ab ' * 10000000 }}", "longer than"),
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(1) }}", "recurses"),
        ("{% include 'other' %}", "loader"),
        ("{{ 'a'.ljust(3000000000) }}", "memory"),
    ],
)
def test_chat_templates_are_bounded(template, message):
    from dsv2cli.inference.chat import render_chat

    with pytest.raises(DSV2Error, match=message):
        render_chat(template, [{"role": "user", "content": "hi"}], None, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": float("nan")}, "`temperature`"),
        ({"temperature": 1e-45}, "`temperature`"),
        ({"repetition_penalty": float("nan")}, "`repetition_penalty`"),
        ({"top_p": float("inf")}, "`top_p`"),
        ({"seed": 10**24}, "`seed`"),
    ],
)
def test_sampling_options_are_checked(options, message):
    from dsv2cli.inference.sampling import SamplingParams

    with pytest.raises(DSV2Error, match=message):
        SamplingParams(**options)


def test_hub_environment(monkeypatch):
    from dsv2cli.checkpoint import hub

    for value, offline in [("1", True), ("true", True), ("ON", True), ("false", False), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_offline() is offline, value
    for bad in ["notaurl", "file:///etc", "http://"]:
        monkeypatch.setenv("HF_ENDPOINT", bad)
        with pytest.raises(DSV2Error, match="HF_ENDPOINT"):
            hub._endpoint()
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    assert hub._endpoint() == "https://hf-mirror.com"


def test_symlink_out_of_the_checkpoint_is_not_copied(checkpoint, tmp_path):
    directory = _copy(checkpoint, tmp_path, "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing")
    (directory / "tokenizer_config.json").unlink(missing_ok=True)
    (directory / "tokenizer_config.json").symlink_to(secret)
    output = tmp_path / "out"
    message = _fails_cleanly(["convert", str(directory), str(output), "--no-probe"])
    assert "symbolic link" in message or "problem" in message
    assert not output.exists()


def test_parameter_counts_are_the_sum_of_the_tensors():
    import math

    from dsv2cli.analysis.params import count_params
    from dsv2cli.checkpoint.hf_keys import hf_tensor_shapes
    from dsv2cli.presets import PRESETS, preset_config

    for name in PRESETS:
        config = preset_config(name)
        assert count_params(config).total == sum(math.prod(s) for s in hf_tensor_shapes(config).values()), name
