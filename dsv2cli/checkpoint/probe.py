"""What a conversion costs in quality: next-token log-likelihood of a fixed probe, source vs result.

Both checkpoints run the same probe tokens layer by layer (one layer's weights in memory at a
time, read as they are stored: a bfloat16 checkpoint runs in bfloat16, an int8 one through its int8
matmuls), and the report compares the mean log-probability of each next token, the top-1
agreement and the largest logit difference (``quality.py``'s metric, the one every quality report uses).

The probe reads both checkpoints again, so it costs about as much as the conversion's own reading
(DeepSeek-V2-Lite: 31 GB of source and 16 GB of int8), and ``dsv2 convert`` runs it only with
``--probe``. :func:`probe_need` is the memory it holds at once, checked before anything is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch.nn import functional as F

from dsv2cli import kernels
from dsv2cli.checkpoint import fit
from dsv2cli.checkpoint.files import ST_TO_TORCH, CheckpointFiles, find_problems, problems_error
from dsv2cli.checkpoint.loader import read_hf_state_dict
from dsv2cli.checkpoint.native import file_for, is_native, read_manifest
from dsv2cli.checkpoint.quality import QualityChange, compare_logits
from dsv2cli.checkpoint.source import open_source
from dsv2cli.config import ModelConfig, load_config
from dsv2cli.model import ForwardOptions
from dsv2cli.model.int4 import dequantize_groups, quantize_int4
from dsv2cli.model.norm import RMSNorm
from dsv2cli.model.quantized import dequantize_rows, quantize_int8
from dsv2cli.model.rope import RotaryEmbedding
from dsv2cli.model.transformer import Block

PROBE_TEXT = (
    "DeepSeek-V2 compresses keys and values into a small latent vector, so the cache it keeps for each token "
    "is much smaller than in multi-head attention, and its feed-forward layers route every token to a few "
    "of many small experts. The quick brown fox jumps over the lazy dog; 1, 2, 3, 5, 8, 13, 21."
)
PROBE_LENGTH = 64
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class ProbeReport:
    """The converted checkpoint (candidate) against its source (reference) on the probe tokens."""

    change: QualityChange
    token_source: str  # "tokenizer" or "seeded ids"

    def to_json(self) -> dict:
        return {**self.change.to_json(), "token_source": self.token_source}


def probe_tokens(directory: Path, config: ModelConfig) -> tuple[torch.Tensor, str]:
    """``[1, S]`` probe ids: :data:`PROBE_TEXT` through the checkpoint's tokenizer, else seeded ids."""
    path = directory / "tokenizer.json"
    if path.is_file():
        ids = Tokenizer.from_file(str(path)).encode(PROBE_TEXT, add_special_tokens=False).ids[: PROBE_LENGTH - 1]
        if config.bos_token_id is not None:
            ids = [config.bos_token_id, *ids]
        if len(ids) > 2 and max(ids) < config.vocab_size:
            return torch.tensor([ids]), "tokenizer"
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, PROBE_LENGTH), generator=generator), "seeded ids"


class LayerwiseWeights:
    """The weights of one checkpoint (HF or native, float or int8), one part at a time."""

    def __init__(self, directory: Path, config: ModelConfig) -> None:
        self.directory = directory
        self.config = config
        self.quantization: str | None = None
        self.group_size: int | None = None
        self.files: CheckpointFiles | None = None
        if is_native(directory):
            manifest = read_manifest(directory)
            self.quantization, self.group_size = manifest.quantization, manifest.group_size
        else:
            self.files, problems = find_problems(directory, config)
            if problems:
                raise problems_error(directory, problems)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose dsv2 name starts with ``prefix`` (in its stored dtype; experts stacked)."""
        if self.files is None:
            name = file_for(prefix, self.config.num_hidden_layers)
            return {k: v for k, v in load_file(str(self.directory / name)).items() if k.startswith(prefix)}
        subset = CheckpointFiles(self.directory)
        subset.tensors = {k: v for k, v in self.files.tensors.items() if k.removeprefix("model.").startswith(prefix)}
        stored = next(iter(subset.tensors.values())).dtype
        return read_hf_state_dict(subset, self.config, ST_TO_TORCH[stored])

    def block(self, index: int) -> Block:
        prefix = f"layers.{index}."
        state = {k.removeprefix(prefix): v for k, v in self.part(prefix).items()}
        with torch.device("meta"):
            block = Block(self.config, index)
        if self.quantization == "int8":
            quantize_int8(block)
            dtype = next(v.dtype for k, v in state.items() if k.endswith("layernorm.weight"))
            state = {k: v.to(dtype) if k.endswith("scale") else v for k, v in state.items()}
        elif self.quantization == "int4":
            quantize_int4(block, self.group_size or 32)  # its float16 scales stay as stored
        block.load_state_dict(state, strict=True, assign=True)
        return block.eval()


@torch.no_grad()
def _logits(weights: LayerwiseWeights, tokens: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    config = weights.config
    embed = weights.part("embed_tokens.")["embed_tokens.weight"]
    x = F.embedding(tokens, embed)  # [1, S, D]
    positions = torch.arange(tokens.shape[1])[None]
    cos, sin = rotary.cos_sin(positions)
    # int8 blocks run their products as generation does: through dsv2's kernels where they build.
    options = ForwardOptions(kernels.load()) if weights.quantization in ("int8", "int4") else ForwardOptions()
    for index in range(config.num_hidden_layers):
        block = weights.block(index)
        x = block(x, cos, sin, None, None, "absorbed", None, options)
        del block
    head = weights.part("norm.") | ({} if config.tie_word_embeddings else weights.part("lm_head."))
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.weight = torch.nn.Parameter(head["norm.weight"], requires_grad=False)
    lm_head = embed if config.tie_word_embeddings else head["lm_head.weight"]
    if "lm_head.scale" in head and weights.quantization == "int4":
        lm_head = dequantize_groups(lm_head, head["lm_head.scale"], x.dtype)
    elif "lm_head.scale" in head:
        lm_head = dequantize_rows(lm_head, head["lm_head.scale"], x.dtype)
    return F.linear(norm(x), lm_head.to(x.dtype)).float()[0]  # [S, V]


def _part(name: str) -> str:
    layer = _LAYER.search(name)
    if layer is not None:
        return f"layers.{layer.group(1)}"
    return "embed" if "embed_tokens" in name else "head"


def probe_need(config: ModelConfig, *checkpoints: Iterable[tuple[str, int]]) -> int:
    """Bytes the probe holds at once, from each checkpoint's ``(tensor name, bytes)``.

    One checkpoint at a time: its embedding (kept for the whole pass), its largest layer, its head
    twice (an int8 head is dequantized), plus the probe's activations and logits (``working_bytes``).
    """
    largest = 0
    for tensors in checkpoints:
        parts: dict[str, int] = {}
        for name, nbytes in tensors:
            parts[_part(name)] = parts.get(_part(name), 0) + nbytes
        layers = [n for part, n in parts.items() if part.startswith("layers.")]
        largest = max(largest, parts.get("embed", 0) + max(layers, default=0) + 2 * parts.get("head", 0))
    logits = 2 * PROBE_LENGTH * config.vocab_size * 4  # [S, V] float32: the reference's, kept, and the result's
    return largest + logits + fit.working_bytes(config, torch.float32, tokens=PROBE_LENGTH)


def require_probe_memory(config: ModelConfig, *checkpoints: Iterable[tuple[str, int]]) -> None:
    """Raise ``InsufficientMemoryError`` (one line: needed vs available) unless the probe fits in memory."""
    fit.require(
        fit.MemoryNeed(0, 0, probe_need(config, *checkpoints)),
        "the quality probe",
        hint="convert without `probe` (the conversion itself needs well under 1 GB), or free some memory",
    )


def probe_quality(source: Path, result: Path) -> ProbeReport:
    """Run the probe through ``source`` and ``result`` (same config) and compare; checks memory first."""
    config = load_config(source)
    require_probe_memory(config, *(((n, t.nbytes) for n, t in open_source(path).tensors.items()) for path in (source, result)))
    tokens, kind = probe_tokens(source, config)
    rotary = RotaryEmbedding(config)
    reference = _logits(LayerwiseWeights(source, config), tokens, rotary)
    converted = _logits(LayerwiseWeights(result, config), tokens, rotary)
    return ProbeReport(compare_logits(reference[:-1], converted[:-1], tokens[0, 1:]), kind)  # [S-1, V] each
