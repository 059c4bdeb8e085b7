"""dsv2's native checkpoint layout: stacked experts, one safetensors file per layer, and a manifest.

A native directory holds ``config.json`` (and tokenizer / generation files), ``embed.safetensors``
(the embedding), ``layer-NN.safetensors`` (everything of layer NN, routed experts stacked as
``layers.NN.mlp.experts.gate_up_proj [E, 2I, D]`` and ``down_proj [E, D, I]``), ``head.safetensors``
(final norm and ``lm_head``), and ``manifest.json``::

    {"format": "dsv2-native", "format_version": 1, "dtype": "bfloat16", "quantization": null | "int8" | "int4",
     "tensors": {name: {"file", "dtype", "shape"}}, "files": {name: {"bytes", "sha256"}}}

An int4 manifest also records its scheme: ``"group_size": 32`` (inputs per float16 scale; ``model/int4.py``).

Tensor names are dsv2 module names, so loading (``loader.load_checkpoint``) is: build on the meta device,
map each file (safetensors memory-maps it), ``load_state_dict(assign=True)``. Nothing is copied
unless a different dtype or device is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsv2cli.checkpoint.files import TORCH_TO_ST, problems_error, read_safetensors_header
from dsv2cli.checkpoint.hf_keys import ROUTER_SUFFIX
from dsv2cli.checkpoint.share import Share
from dsv2cli.config import ModelConfig
from dsv2cli.errors import CheckpointError
from dsv2cli.model import DeepseekV2
from dsv2cli.model.dtypes import DTYPES
from dsv2cli.model.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, quantize_int4
from dsv2cli.model.quantized import quantize_int8
from dsv2cli.untrusted import Fields, is_int, read_json

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "dsv2-native"
FORMAT_VERSION = 1
QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class Manifest:
    dtype: str
    quantization: str | None
    tensors: dict[str, dict]
    files: dict[str, dict]
    group_size: int | None = None  # int4 only: inputs per scale

    def to_json(self) -> dict:
        scheme = {} if self.group_size is None else {"group_size": self.group_size}
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype,
            "quantization": self.quantization,
            **scheme,
            "tensors": self.tensors,
            "files": self.files,
        }


def is_native(directory: Path) -> bool:
    return (directory / MANIFEST_NAME).is_file()


def read_manifest(directory: Path) -> Manifest:
    """Parse ``manifest.json``, every field type-checked; a malformed or newer manifest is a :class:`CheckpointError`."""
    path = directory / MANIFEST_NAME
    fields = Fields(read_json(path, CheckpointError), MANIFEST_NAME, CheckpointError)
    if fields.data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a dsv2 manifest (format {str(fields.data.get('format'))[:40]!r})")
    if fields.data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {str(fields.data.get('format_version'))[:20]}; this dsv2 reads version {FORMAT_VERSION}",
            hint="convert the checkpoint again with this version of dsv2",
        )
    manifest = Manifest(
        fields.str("dtype"),
        fields.str("quantization", default=None, optional=True),
        fields.object("tensors"),
        fields.object("files"),
        fields.int("group_size", default=None, optional=True),
    )
    for name, entry in manifest.tensors.items():
        tensor = Fields(entry, MANIFEST_NAME, CheckpointError, prefix=f"tensors.{name}.")
        tensor.str("file")
        tensor.str("dtype")
        shape = tensor.list("shape")
        if not all(is_int(s) and 0 <= s < 1 << 63 for s in shape):
            raise tensor.fail("shape", "must be a list of non-negative integers")
    for name, entry in manifest.files.items():
        record = Fields(entry, MANIFEST_NAME, CheckpointError, prefix=f"files.{name}.")
        record.int("bytes", low=0)
        record.str("sha256")
    if manifest.dtype not in DTYPES:
        raise CheckpointError(f"{path}: unknown dtype {manifest.dtype!r}", hint=f"expected one of {', '.join(DTYPES)}")
    if manifest.quantization not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"{path}: unknown quantization {manifest.quantization!r}")
    if (manifest.quantization == "int4") != (manifest.group_size is not None):
        raise CheckpointError(f"{path}: group_size belongs to int4 checkpoints, and every int4 checkpoint has one")
    if manifest.group_size is not None and manifest.group_size not in GROUP_SIZES:
        raise CheckpointError(f"{path}: int4 group_size {manifest.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    return manifest


def layer_file(index: int, num_layers: int) -> str:
    return f"layer-{index:0{max(2, len(str(num_layers - 1)))}d}.safetensors"


def file_for(native_name: str, num_layers: int) -> str:
    """Which native file holds a tensor: ``embed``, ``layer-NN`` or ``head``."""
    if native_name.startswith("layers."):
        return layer_file(int(native_name.split(".", 2)[1]), num_layers)
    return "embed.safetensors" if native_name.startswith("embed_tokens.") else "head.safetensors"


def expected_tensors(
    config: ModelConfig, quantization: str | None, int8_head: bool = True, group_size: int | None = None
) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Every tensor a native checkpoint of ``config`` holds: name -> (shape, required dtype or None = any float).

    Built from the model itself on the meta device (after the int8 or int4 transform when quantized),
    so names can never drift from the modules they are assigned to. ``int8_head=False`` describes
    int8 checkpoints written before ``lm_head`` was quantized; ``group_size``: an int4 checkpoint's.
    """
    model = build_structure(config, quantization, int8_head, group_size)
    expected: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if tensor.dtype in (torch.int8, torch.uint8):  # int8, packed int4
            expected[name] = (tuple(tensor.shape), TORCH_TO_ST[tensor.dtype])
        elif quantization and name.endswith("scale"):  # float32 for int8, float16 for int4
            expected[name] = (tuple(tensor.shape), TORCH_TO_ST[tensor.dtype])
        else:
            expected[name] = (tuple(tensor.shape), None)
    return expected


def build_structure(
    config: ModelConfig, quantization: str | None, int8_head: bool = True, group_size: int | None = None
) -> DeepseekV2:
    """The model on the meta device, with int8 or int4 modules installed for a quantized checkpoint."""
    with torch.device("meta"):
        model = DeepseekV2(config)
    if quantization == "int8":
        quantize_int8(model, quantize_head=int8_head)
    elif quantization == "int4":
        quantize_int4(model, group_size or DEFAULT_GROUP_SIZE)
    return model


def has_int8_head(manifest: Manifest) -> bool:
    """Whether an int8 checkpoint stores ``lm_head`` in int8 (older ones kept it in floating point)."""
    return "lm_head.scale" in manifest.tensors


def header_problems(directory: Path, manifest: Manifest, config: ModelConfig) -> list[str]:
    """Problems visible from the headers alone: files, names, shapes and dtypes (no hashing)."""
    problems: list[str] = []
    expected = expected_tensors(config, manifest.quantization, has_int8_head(manifest), manifest.group_size)
    stored: dict[str, tuple[str, tuple[int, ...], str]] = {}
    unavailable: set[str] = set()  # their tensors are accounted for by the file's own problem
    for file in sorted({str(t.get("file")) for t in manifest.tensors.values()}):
        path = directory / file
        unavailable.add(file)
        if "/" in file or "\\" in file or not file.endswith(".safetensors"):
            problems.append(f"{MANIFEST_NAME}: names '{file}', which is not a safetensors file in the checkpoint directory")
            continue
        if not path.is_file():
            problems.append(f"missing file '{file}' (named by {MANIFEST_NAME})")
            continue
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError) as exc:
            problems.append(f"{file}: {exc}")
            continue
        unavailable.discard(file)
        for name, info in header.items():
            stored[name] = (file, info.shape, info.dtype)
    if manifest.quantization == "int4":
        _check_int4_scheme(expected, stored, manifest.group_size)
    for name, entry in manifest.tensors.items():
        where = stored.get(name)
        if where is None:
            if entry.get("file") not in unavailable:
                problems.append(f"{entry.get('file')}: has no tensor '{name}' although {MANIFEST_NAME} says so")
        elif where[0] != entry.get("file") or list(where[1]) != list(entry.get("shape", [])) or where[2] != entry.get("dtype"):
            problems.append(f"{where[0]}: tensor '{name}' ({where[2]} {list(where[1])}) differs from {MANIFEST_NAME}")
    hidden = {name for name, entry in manifest.tensors.items() if entry.get("file") in unavailable}
    missing = [name for name in expected if name not in stored and name not in hidden]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(f"missing tensor{'s' if len(missing) > 1 else ''}: {shown}")
    float_dtype = TORCH_TO_ST[DTYPES[manifest.dtype]]
    for name, (file, shape, dtype) in stored.items():
        if name not in expected:
            problems.append(f"{file}: unexpected tensor '{name}' (not part of this config)")
            continue
        want_shape, want_dtype = expected[name]
        if shape != want_shape:
            problems.append(f"{file}: tensor '{name}' has shape {list(shape)}, config needs {list(want_shape)}")
        allowed = {want_dtype} if want_dtype else {float_dtype, "F32"} if name.endswith(ROUTER_SUFFIX) else {float_dtype}
        if dtype not in allowed:
            problems.append(f"{file}: tensor '{name}' has dtype {dtype}; expected {' or '.join(sorted(allowed))}")
        elif name not in manifest.tensors:
            problems.append(f"{file}: tensor '{name}' is not listed in {MANIFEST_NAME}")
    return problems


def _check_int4_scheme(
    expected: dict[str, tuple[tuple[int, ...], str | None]],
    stored: dict[str, tuple[str, tuple[int, ...], str]],
    group_size: int | None,
) -> None:
    """Raise one :class:`CheckpointError` naming the first packed int4 weight or scale whose stored dtype or shape is not
    the scheme's (int8 data under an int4 manifest, scales of another group size)."""
    for name, (shape, dtype) in expected.items():
        if dtype not in ("U8", "F16") or name not in stored:
            continue
        file, have_shape, have_dtype = stored[name]
        if have_dtype != dtype:
            kind = "int8" if have_dtype == "I8" else have_dtype
            raise CheckpointError(
                f"{file}: tensor '{name}' holds {kind} data ({have_dtype} {list(have_shape)}) but {MANIFEST_NAME} says int4 "
                f"({dtype} {list(shape)})",
                hint="the manifest does not describe these files; convert the checkpoint again",
            )
        if have_shape != shape:
            what = "scale" if dtype == "F16" else "packed weight"
            raise CheckpointError(
                f"{file}: int4 {what} '{name}' has shape {list(have_shape)}; group size {group_size} needs {list(shape)}",
                hint="the manifest's group_size does not match these files; convert the checkpoint again",
            )


def read_native_state_dict(
    directory: Path,
    manifest: Manifest,
    config: ModelConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    share: Share | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a native directory by name, mapped from its files; headers are checked first.

    Nothing is copied where the stored dtype and device are kept: a tensor is a view of the mapped file.
    ``dtype=None`` keeps the stored float dtype; int8 weights always stay int8 (the float tensors and the
    scales take ``dtype``, which is then the activation dtype). With a ``share`` (one rank of a
    multi-process run) only that rank's slice of each split tensor is read (``get_slice``): its own
    experts' rows, its heads, its vocabulary rows. A slice of input columns is copied to make it
    contiguous (its rows are strided in the file); every other slice stays a view of the mapped file.
    """
    problems = header_problems(directory, manifest, config)
    if problems:
        raise problems_error(directory, problems)
    activation = dtype or DTYPES[manifest.dtype]
    state: dict[str, torch.Tensor] = {}
    for file in sorted({t["file"] for t in manifest.tensors.values()}):
        try:
            with safe_open(str(directory / file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    split = None if share is None else share.split_for(name)
                    if split is None:
                        tensor = f.get_tensor(name)
                    else:
                        tensor = f.get_slice(name)[split.index()]
                        if split.dim > 0:
                            tensor = tensor.contiguous()
                    state[name] = _runtime(name, tensor, dtype, activation, manifest.quantization is not None, device)
        except (
            OSError,
            RuntimeError,
            SafetensorError,
        ) as exc:  # SafetensorError: a RuntimeError before 0.8, a plain Exception since
            raise CheckpointError(f"could not read {file}: {exc}", hint="run `dsv2 verify` on the directory") from exc
    return state


def runtime_dtype(
    name: str, stored: torch.dtype, dtype: torch.dtype | None, activation: torch.dtype, quantized: bool
) -> torch.dtype:
    """The dtype a native tensor stored as ``stored`` is computed in, loaded with ``dtype`` (None: as stored).

    int8 and packed int4 weights stay as they are; the router is float32 when a dtype is asked for; an int8
    checkpoint's scales take the ``activation`` dtype, an int4 one's stay float16 (mapped, as its kernel reads
    them); everything else ``dtype``.
    """
    if stored in (torch.int8, torch.uint8):
        return stored
    if name.endswith(ROUTER_SUFFIX):
        return torch.float32 if dtype is not None else stored
    if quantized and name.endswith("scale"):
        # int8's are stored in float32 and its matmuls take them in the activation dtype; int4's are float16
        return stored if stored == torch.float16 else activation
    return dtype or stored


def _runtime(
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype | None,
    activation: torch.dtype,
    quantized: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """``tensor`` in the dtype and on the device the model computes with (the same tensor when nothing changes)."""
    want = runtime_dtype(name, tensor.dtype, dtype, activation, quantized)
    if tensor.dtype != want or torch.device(device) != tensor.device:
        return tensor.to(device=device, dtype=want)
    return tensor
