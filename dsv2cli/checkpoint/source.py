"""A checkpoint to read from, in either layout, seen as HF-named byte ranges.

Conversion and probing never need whole tensors: every HF tensor (``model.layers.3.mlp.experts.7.up_proj.weight``)
is a contiguous byte range of some file. In a HF directory that is the tensor itself; in a native
directory it is one expert's rows of a stacked tensor (``[E, 2I, D]`` is laid out expert by expert,
gate rows then up rows).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dsv2cli.checkpoint.files import (
    INDEX_NAME,
    MODEL_FILES,
    TensorInfo,
    find_problems,
    outside_link,
    problems_error,
    read_safetensors_header,
)
from dsv2cli.checkpoint.hf_keys import IGNORABLE, expert_slice, hf_tensor_shapes, native_name
from dsv2cli.checkpoint.native import MANIFEST_NAME, header_problems, is_native, read_manifest
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.errors import CheckpointError

# Files besides the weights that a checkpoint directory carries along: the ones dsv2 reads, and the tokenizer's
# other forms, code, license and model card, which a conversion keeps.
AUX_PATTERNS = (*MODEL_FILES, "added_tokens.json", "vocab.json", "merges.txt", "*.py", "LICENSE*", "README.md")


@dataclass
class Source:
    """A checked checkpoint: its layout, config, quantization and every HF tensor as a byte range."""

    directory: Path
    layout: str  # "hf" or "native"
    config: ModelConfig
    quantization: str | None
    tensors: dict[str, TensorInfo]  # HF name -> byte range, in hf_tensor_shapes order (native names when int8)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def aux_files(self) -> list[Path]:
        found = {p for pattern in AUX_PATTERNS for p in self.directory.glob(pattern) if p.is_file()}
        links = [problem for p in sorted(found) if (problem := outside_link(self.directory, p))]
        if links:  # copying one would put a file from elsewhere on this machine into OUTPUT
            raise problems_error(self.directory, links)
        return sorted(found - {self.directory / MANIFEST_NAME, self.directory / INDEX_NAME})


def open_source(directory: Path) -> Source:
    """Read and check a checkpoint directory (HF or native); every problem is reported in one error."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = load_config(directory)
    if is_native(directory):
        manifest = read_manifest(directory)
        problems = header_problems(directory, manifest, config)
        if problems:
            raise problems_error(directory, problems)
        stored: dict[str, TensorInfo] = {}
        for file in sorted({t["file"] for t in manifest.tensors.values()}):
            stored.update(read_safetensors_header(directory / file))
        # int8 tensors have no HF form; they keep their native names (only loading and probing read them).
        tensors = stored if manifest.quantization else _split_experts(stored, config)
        return Source(directory, "native", config, manifest.quantization, tensors)
    found, problems = find_problems(directory, config)
    if problems:
        raise problems_error(directory, problems)
    order = hf_tensor_shapes(config)
    tensors = {name: found.tensors[name] for name in order}
    extra = [name for name in found.tensors if name not in order and not IGNORABLE.match(name)]
    assert not extra, extra  # find_problems reports unexpected tensors
    return Source(directory, "hf", config, None, tensors)


def _split_experts(stored: dict[str, TensorInfo], config: ModelConfig) -> dict[str, TensorInfo]:
    """Native (stacked) tensors -> HF names and byte ranges, in checkpoint order."""
    tensors: dict[str, TensorInfo] = {}
    for name in hf_tensor_shapes(config):
        expert = expert_slice(name)
        if expert is None:
            tensors[name] = stored[native_name(name)]
            continue
        stacked = stored[expert.native_name]
        per_expert = stacked.nbytes // stacked.shape[0]
        begin = stacked.begin + expert.expert * per_expert
        if expert.part == "down":
            tensors[name] = replace(stacked, shape=stacked.shape[1:], begin=begin, end=begin + per_expert)
        else:
            half = per_expert // 2  # gate rows first, then up rows
            start = begin + (half if expert.part == "up" else 0)
            tensors[name] = replace(stacked, shape=(stacked.shape[1] // 2, stacked.shape[2]), begin=start, end=start + half)
    return tensors
