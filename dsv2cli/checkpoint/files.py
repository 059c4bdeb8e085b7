"""Finding and checking the weight files of a HF-layout checkpoint, without loading any weights.

Every problem found (missing shard, truncated or corrupt file, index pointing outside
the directory, pickled weights, missing / unexpected / wrongly shaped tensors) is
collected and reported in one :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from dsv2cli.checkpoint.hf_keys import IGNORABLE, hf_tensor_shapes
from dsv2cli.config import ModelConfig
from dsv2cli.errors import CheckpointError
from dsv2cli.model.dtypes import DTYPES
from dsv2cli.untrusted import Fields, parse_json, read_json

INDEX_NAME = "model.safetensors.index.json"
# Files besides the weights that dsv2 reads from a checkpoint directory: config, generation defaults, tokenizer,
# chat template. `dsv2 download` fetches these beside the safetensors; `dsv2 convert` copies them (and a few more).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# safetensors' names of the dtypes dsv2 stores: the float ones of model.dtypes.DTYPES, int8, and packed int4 (uint8).
TORCH_TO_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8", torch.uint8: "U8"}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
FLOAT_DTYPES = tuple(TORCH_TO_ST[dtype] for dtype in DTYPES.values())
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute byte positions in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class CheckpointFiles:
    """The tensors of a checkpoint: name -> where it is, with its dtype and shape."""

    directory: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it as strictly as the safetensors library does.

    Every tensor's entry is type-checked, the byte ranges must tile the data exactly (no overlaps, no
    gaps, nothing after the last one) and ``__metadata__`` must map strings to strings; then the
    library itself opens the file, so that whatever it would refuse later is refused here.
    Raises ``ValueError`` with a short reason for a corrupt or truncated file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file is shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header claims {header_len} bytes but the file has {size}: corrupt or truncated")
        raw = f.read(header_len)
    try:
        header = parse_json(raw, "header", CheckpointError)
    except CheckpointError as exc:
        raise ValueError(exc.message) from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_size = size - 8 - header_len
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    metadata = header.get("__metadata__", {})
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("header field '__metadata__' must map strings to strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_entry(path, name, entry, data_start, data_size)
    end = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != data_start + end:
            raise ValueError("header's data offsets overlap or leave gaps between tensors")
        end = info.end - data_start
    if end != data_size:
        raise ValueError(f"tensor data ends at byte {end} but the file has {data_size} data bytes")
    _library_accepts(path)
    return tensors


def _tensor_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ValueError(f"header entry for '{name}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor '{name}' has unsupported dtype {str(dtype)[:20]}")
    if not (isinstance(shape, list) and all(_count(s) for s in shape)):
        raise ValueError(f"tensor '{name}' has a malformed shape (needs a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise ValueError(f"tensor '{name}' has malformed data_offsets (needs two non-negative integers)")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise ValueError(f"tensor '{name}' has data offsets that do not match its shape")
    if end > data_size:
        raise ValueError(f"file is truncated: tensor '{name}' ends at byte {end} of {data_size} data bytes")
    return TensorInfo(path, dtype, tuple(shape), data_start + begin, data_start + end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _library_accepts(path: Path) -> None:
    """Open the file with the safetensors library (header only, memory-mapped); its refusal as a ValueError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except OSError:
        raise
    except Exception as exc:  # SafetensorError is a plain Exception in safetensors 0.8
        raise ValueError(f"the safetensors library refuses it: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def _inside(directory: Path, relative: str) -> Path | None:
    """The file ``relative`` inside ``directory``, or None when it would point elsewhere.

    The check is on the path as written (``..`` and absolute paths are refused), not on where
    symlinks lead: in the HF cache every file is a symlink into ``blobs/``.
    """
    if Path(relative).is_absolute():
        return None
    root = Path(os.path.normpath(directory.absolute()))
    candidate = Path(os.path.normpath(root / relative))
    if candidate != root and root in candidate.parents:
        return candidate
    return None


def outside_link(directory: Path, path: Path) -> str | None:
    """Why ``path`` may not be read as part of the checkpoint in ``directory``: a symlink leading out of it.

    Links inside the directory are fine, and so are the HF cache's links from ``snapshots/REV/`` into
    the repository's ``blobs/``.
    """
    if not path.is_symlink():
        return None
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    target = path.resolve()
    if root in target.parents:
        return None
    return f"{path.name} is a symbolic link to {target}, outside the checkpoint directory"


def _shard_list(directory: Path, problems: list[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight map if there is one."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = Fields(read_json(index_path, CheckpointError), INDEX_NAME, CheckpointError).object("weight_map")
        except CheckpointError as exc:
            problems.append(f"{exc.message} (a shard index needs a 'weight_map' object)")
            return [], None
        wrong = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if wrong is not None:
            problems.append(
                f"{INDEX_NAME}: field 'weight_map.{wrong}' must name a file, not {json.dumps(weight_map[wrong])[:40]}"
            )
            return [], None
        shards: list[Path] = []
        for relative in sorted(set(weight_map.values())):
            shard = _inside(directory, str(relative))
            if shard is None:
                problems.append(f"{INDEX_NAME}: names '{relative}', which is outside the checkpoint directory")
            elif not shard.is_file():
                problems.append(f"missing shard '{relative}' (named by {INDEX_NAME})")
            elif link := outside_link(directory, shard):
                problems.append(link)
            else:
                shards.append(shard)
        return shards, {k: str(v) for k, v in weight_map.items()}
    shards = sorted(directory.glob("*.safetensors"))
    for shard in list(shards):
        if link := outside_link(directory, shard):
            problems.append(link)
            shards.remove(shard)
    if not shards:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            problems.append(f"weights only in pickle form ({', '.join(pickled)}); dsv2 never unpickles weights")
        else:
            problems.append("no safetensors weights (model.safetensors or a shard index) in the directory")
    return shards, None


def inspect_checkpoint(directory: str | Path, config: ModelConfig) -> CheckpointFiles:
    """Check a HF-layout checkpoint against its config; raise one error listing every problem."""
    directory = Path(directory)
    found, problems = find_problems(directory, config)
    if problems:
        raise problems_error(directory, problems)
    return found


def problems_error(directory: Path, problems: list[str]) -> CheckpointError:
    """One error that lists every problem found in ``directory``."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return CheckpointError(
        f"checkpoint {directory} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n{lines}",
        hint="re-download the files that are named, or check that config.json belongs to these weights",
    )


def find_problems(directory: Path, config: ModelConfig, strict_index: bool = False) -> tuple[CheckpointFiles, list[str]]:
    """The tensors of a HF-layout checkpoint and every problem with its files (empty when it is sound).

    ``strict_index`` also reports what loading can ignore: tensors and ``*.safetensors`` files that the
    index does not name.
    """
    problems: list[str] = []
    shards, weight_map = _shard_list(directory, problems)
    found = CheckpointFiles(directory)
    unreadable: set[Path] = set()
    for shard in shards:
        try:
            tensors = read_safetensors_header(shard)
        except (OSError, ValueError) as exc:
            problems.append(f"{shard.name}: {exc}")
            unreadable.add(shard)
            continue
        for name, info in tensors.items():
            if weight_map is not None and name in weight_map and _inside(directory, weight_map[name]) != shard:
                continue  # the index assigns this tensor to another shard
            found.tensors[name] = info
    if weight_map is not None:
        for name, relative in weight_map.items():
            shard = _inside(directory, relative)
            if shard is not None and name not in found.tensors and shard in shards and shard not in unreadable:
                problems.append(f"{relative}: has no tensor '{name}' although {INDEX_NAME} says so")
    if weight_map is not None and strict_index:
        for name, info in found.tensors.items():
            if name not in weight_map and not IGNORABLE.match(name):
                problems.append(f"{info.file.name}: tensor '{name}' is not listed in {INDEX_NAME}")
        listed = {shard.name for shard in shards}
        for stray in sorted(p.name for p in directory.glob("*.safetensors") if p.name not in listed):
            problems.append(f"{stray}: not named by {INDEX_NAME}")
    if shards:
        # Tensors of an unreadable shard are already accounted for by that shard's problem.
        if weight_map is not None:
            hidden = {name for name, relative in weight_map.items() if _inside(directory, relative) in unreadable}
        else:
            hidden = set(hf_tensor_shapes(config)) if unreadable else set()
        _check_tensors(found, config, problems, hidden)
    return found, problems


def _check_tensors(found: CheckpointFiles, config: ModelConfig, problems: list[str], hidden: set[str]) -> None:
    expected = hf_tensor_shapes(config)
    missing = [name for name in expected if name not in found.tensors and name not in hidden]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(f"missing tensor{'s' if len(missing) > 1 else ''}: {shown}")
    for name, info in found.tensors.items():
        if name not in expected:
            if not IGNORABLE.match(name):
                problems.append(f"{info.file.name}: unexpected tensor '{name}' (not part of this config)")
        elif info.shape != expected[name]:
            problems.append(
                f"{info.file.name}: tensor '{name}' has shape {list(info.shape)}, config needs {list(expected[name])}"
            )
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(
                f"{info.file.name}: tensor '{name}' has dtype {info.dtype}; expected one of {', '.join(FLOAT_DTYPES)}"
            )
