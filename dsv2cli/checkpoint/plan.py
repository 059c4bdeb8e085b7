"""Planning a conversion: which output files hold which tensors, made of which source byte ranges.

A plan is data: output files, each an ordered list of :class:`OutputTensor` (name, dtype, shape and
the source ranges whose rows it concatenates), and, from it, the sequence of :data:`Step` that
``convert.py`` executes: the source read in chunks of whole rows, in the order the output is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

from dsv2cli.checkpoint.files import DTYPE_SIZES, TORCH_TO_ST, TensorInfo
from dsv2cli.checkpoint.hf_keys import ROUTER_SUFFIX, expert_slice, native_name, native_shapes
from dsv2cli.checkpoint.native import expected_tensors, file_for
from dsv2cli.checkpoint.source import Source
from dsv2cli.checkpoint.writer import TensorSpec, alignment_group
from dsv2cli.errors import InputError
from dsv2cli.model.dtypes import DTYPES

ST_DTYPE = {name: TORCH_TO_ST[dtype] for name, dtype in DTYPES.items()}  # "bfloat16" -> "BF16"
ST_NAME = {v: k for k, v in ST_DTYPE.items()}


@dataclass
class OutputTensor:
    """One tensor to write: its spec and the source ranges whose rows it concatenates.

    ``quantize``: int8 rows (or packed int4 rows), whose scales are kept for the scale tensor; ``scale_of``:
    the scales of that weight (its ``pieces`` are the weight's, read again only if the scales come
    first in the file); ``group_size``: int4's, for the weight and its scales (None for int8).
    """

    spec: TensorSpec
    pieces: list[TensorInfo] = field(default_factory=list)
    quantize: bool = False
    scale_of: str | None = None
    group_size: int | None = None


@dataclass
class OutputFile:
    name: str
    tensors: list[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)


def _target_dtype(name: str, stored: str, dtype: str) -> str:
    if dtype == "keep":
        return stored
    return "F32" if name.endswith(ROUTER_SUFFIX) else ST_DTYPE[dtype]


def _float_dtype(tensors: list[OutputTensor], dtype: str, strict: bool) -> str:
    """The one float dtype of the result (the router may differ).

    A source that mixes dtypes needs ``--dtype`` for the native layout (``strict``: its manifest
    names one dtype); the HF layout keeps the mix and reports ``"mixed"``.
    """
    if dtype != "keep":
        return dtype
    kinds = {
        t.spec.dtype
        for t in tensors
        if t.spec.dtype in ST_NAME and t.scale_of is None and not t.spec.name.endswith(ROUTER_SUFFIX)
    }
    if len(kinds) > 1 and not strict:
        return "mixed"
    if len(kinds) != 1:
        raise InputError(
            f"the source mixes dtypes ({', '.join(sorted(kinds))})", hint="pass `dtype=bfloat16`, float16 or float32"
        )
    return ST_NAME[kinds.pop()]


def plan_native(src: Source, dtype: str, quantize: str | None, group_size: int | None = None) -> tuple[list[OutputFile], str]:
    """Output files of the native layout: experts stacked, one file per layer (see ``native.py``); ``group_size``: int4's."""
    config = src.config
    pieces: dict[str, list[TensorInfo]] = {name: [] for name in native_shapes(config)}
    for hf, info in src.tensors.items():
        expert = expert_slice(hf)
        # HF order is expert-major with gate, up, down per expert: stacking keeps [gate_0, up_0, gate_1, ...].
        pieces[native_name(hf) if expert is None else expert.native_name].append(info)
    expected = expected_tensors(config, quantize, group_size=group_size)
    shapes = native_shapes(config)
    groups: dict[str, list[OutputTensor]] = {}
    for name, parts in pieces.items():
        shape = shapes[name]
        group = groups.setdefault(file_for(name, config.num_hidden_layers), [])
        kind = expected.get(name, ((), None))[1]
        if kind in ("I8", "U8"):  # int8, or packed int4 with float16 scales per group
            scale = name.removesuffix("weight") + "scale" if name.endswith(".weight") else f"{name}_scale"
            assert scale in expected, scale
            groups_of = shape[-1] // expected[scale][0][-1] if kind == "U8" else None
            group.append(OutputTensor(TensorSpec(name, kind, expected[name][0]), parts, quantize=True, group_size=groups_of))
            scale_spec = TensorSpec(scale, str(expected[scale][1]), expected[scale][0])
            group.append(OutputTensor(scale_spec, parts, scale_of=name, group_size=groups_of))
        else:
            group.append(OutputTensor(TensorSpec(name, _target_dtype(name, parts[0].dtype, dtype), shape), parts))
    files = [OutputFile(name, _aligned(tensors)) for name, tensors in groups.items()]
    return files, _float_dtype([t for f in files for t in f.tensors], dtype, strict=True)


def _aligned(tensors: list[OutputTensor]) -> list[OutputTensor]:
    return sorted(tensors, key=lambda t: alignment_group(t.spec))


def plan_hf(src: Source, dtype: str, shard_bytes: int) -> tuple[list[OutputFile], str]:
    """Output shards of the HF layout: per-expert tensors in checkpoint order, at most ``shard_bytes`` each."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for name, info in src.tensors.items():
        tensor = OutputTensor(TensorSpec(name, _target_dtype(name, info.dtype, dtype), info.shape), [info])
        if shards[-1] and size + tensor.spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.spec.nbytes
    files = [
        OutputFile(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", _aligned(tensors)) for i, tensors in enumerate(shards)
    ]
    return files, _float_dtype([t for shard in shards for t in shard], dtype, strict=False)


# One step of executing a plan, in file order: start an output file, read some source bytes and
# hand them on, write an int8 weight's collected scales, or finish the file.
Step = Union["Begin", "Read", "WriteScales", "End"]


@dataclass(frozen=True)
class Begin:
    file: OutputFile


@dataclass(frozen=True)
class Read:
    """``rows`` rows of ``piece`` from byte ``offset``: copied (``copy``), cast (``cast``) or quantized.

    ``quantize`` writes the int8 rows, ``scales`` (the pass for a scale tensor that comes before its
    weight) only keeps the scales; either keeps them under ``collect`` unless that is None.
    """

    tensor: OutputTensor
    piece: TensorInfo
    offset: int
    length: int
    rows: int
    mode: str
    collect: str | None = None


@dataclass(frozen=True)
class WriteScales:
    tensor: OutputTensor


@dataclass(frozen=True)
class End:
    file: OutputFile


def steps(files: list[OutputFile], read_bytes: int) -> Iterator[Step]:
    """The plan as a sequence of steps; a read takes at most ``read_bytes`` of whole rows (and so does its output)."""
    for file in files:
        yield Begin(file)
        quantized: set[str] = set()  # int8 weights of this file whose scales are kept
        for tensor in file.tensors:
            if tensor.scale_of is not None:
                if tensor.scale_of not in quantized:  # the weight comes later in this file: one extra pass for its scales
                    yield from _reads(tensor, read_bytes, "scales", tensor.scale_of)
                    quantized.add(tensor.scale_of)
                yield WriteScales(tensor)
            elif tensor.quantize:
                yield from _reads(tensor, read_bytes, "quantize", None if tensor.spec.name in quantized else tensor.spec.name)
                quantized.add(tensor.spec.name)
            else:
                yield from _reads(tensor, read_bytes, "cast")
        yield End(file)


def _reads(tensor: OutputTensor, read_bytes: int, mode: str, collect: str | None = None) -> Iterator[Read]:
    for piece in tensor.pieces:
        kind = "copy" if mode == "cast" and tensor.spec.dtype == piece.dtype else mode
        rows = piece.shape[0] if piece.shape else 1
        row_bytes = piece.nbytes // max(rows, 1)
        out_row_bytes = row_bytes * DTYPE_SIZES[tensor.spec.dtype] // DTYPE_SIZES[piece.dtype] if kind == "cast" else 0
        step = max(1, read_bytes // max(row_bytes, out_row_bytes, 1))
        for first in range(0, rows, step):
            count = min(step, rows - first)
            yield Read(tensor, piece, first * row_bytes, count * row_bytes, count, kind, collect)
