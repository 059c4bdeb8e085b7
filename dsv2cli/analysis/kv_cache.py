"""KV-cache arithmetic: what MLA, MHA, GQA and MQA caches hold (paper Table 1; spec §3.3, §10, §11).

Elements per token per layer, with n_h heads, d_h the per-head dim (``qk_nope_head_dim`` for MLA,
the paper's d_h), G key/value groups, d_c = ``kv_lora_rank``, d_h^R = ``qk_rope_head_dim``, d_v = ``v_head_dim``:

* ``mla``           d_c + d_h^R                      latent + rotated rope key, what dsv2 caches (576 for V2)
* ``mla-expanded``  n_h · (d_h + d_h^R + d_v)        per-head K and V, what the original HF remote code caches
* ``mha``           2 · n_h · d_h
* ``gqa:G``         2 · G · d_h
* ``mqa``           2 · d_h

Per token = per layer × layers; bytes = elements × bits / 8, so a 6-bit cache takes 0.75 byte per element.
A scheme's equivalent GQA groups are its elements per layer / (2 · d_h): MLA on DeepSeek-V2 is 576 / 256 = 2.25.
Everything here is integer and float arithmetic on configs (``kv_report.py`` assembles the report); a model
named by the user is resolved to a config first (``checkpoint/resolve.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from dsv2cli.config import ModelConfig
from dsv2cli.errors import ConfigError, InputError

DTYPE_BITS: dict[str, int] = {"float32": 32, "bfloat16": 16, "float16": 16, "fp8": 8, "int8": 8, "int4": 4}
SCHEME_KINDS = ("mla", "mla-expanded", "mha", "gqa", "mqa")
DEFAULT_GQA_GROUPS = (8, 4, 2)
DEFAULT_CONTEXTS = (4096, 32768, 131072)


@dataclass(frozen=True)
class Precision:
    """Bits per cached element: a dtype, or an average bit width of a quantised cache."""

    name: str
    bits: float

    @property
    def bytes_per_element(self) -> float:
        return self.bits / 8

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bits": json_number(self.bits), "bytes_per_element": json_number(self.bytes_per_element)}


def precision(dtype: str | None = None, bits: float | None = None, default: str = "bfloat16") -> Precision:
    """``dtype`` (float32, bfloat16, float16, fp8, int8, int4) or ``bits`` (fractional allowed), not both."""
    if dtype is not None and bits is not None:
        raise InputError("give a dtype or a number of bits, not both")
    if bits is not None:
        if not (math.isfinite(bits) and 0 < bits <= 64):
            raise InputError(f"bits per element must be in (0, 64], not {bits:g}")
        return Precision(f"{bits:g}-bit", float(bits))
    name = (dtype or default).lower()
    if name not in DTYPE_BITS:
        raise InputError(f"unknown dtype '{dtype}'", hint=f"choose one of {', '.join(DTYPE_BITS)}, or give bits")
    return Precision(name, float(DTYPE_BITS[name]))


@dataclass(frozen=True)
class AttentionShape:
    """What the size of a model's cache depends on; the MLA fields are None for plain (MHA/GQA/MQA) attention."""

    name: str
    num_layers: int
    num_heads: int
    head_dim: int
    kv_heads: int | None = None
    kv_lora_rank: int | None = None
    rope_dim: int | None = None
    v_head_dim: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def native_scheme(self) -> Scheme:
        """The scheme this model really caches with."""
        if self.is_mla:
            return Scheme("mla")
        groups = self.kv_heads or self.num_heads
        if groups == self.num_heads:
            return Scheme("mha")
        return Scheme("mqa") if groups == 1 else Scheme("gqa", groups)

    @classmethod
    def from_config(cls, config: ModelConfig, name: str) -> AttentionShape:
        return cls(
            name=name,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.qk_nope_head_dim,
            kv_lora_rank=config.kv_lora_rank,
            rope_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str) -> AttentionShape:
        """Any model's ``config.json``: a DeepSeek-V2-family one (it has ``kv_lora_rank``) or a Llama-style one."""
        if "kv_lora_rank" in hf:
            return cls.from_config(ModelConfig.from_hf(hf), name)
        return cls.from_llama_hf(hf, name)

    @classmethod
    def from_llama_hf(cls, hf: dict[str, Any], name: str) -> AttentionShape:
        """A Llama-style ``config.json``: layers, heads, KV heads (default: heads) and ``head_dim`` (default hidden / heads)."""
        for key in ("num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int) or hf[key] <= 0:
                raise ConfigError(f"baseline config has no positive integer '{key}'", hint="is it a Llama-style config.json?")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if isinstance(hf.get("hidden_size"), int) else None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ConfigError("baseline config has neither 'head_dim' nor 'hidden_size'")
        kv_heads = hf.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or not 1 <= kv_heads <= heads:
            raise ConfigError(f"baseline config value num_key_value_heads={kv_heads!r} must be between 1 and {heads}")
        return cls(name=name, num_layers=hf["num_hidden_layers"], num_heads=heads, head_dim=head_dim, kv_heads=kv_heads)


@dataclass(frozen=True)
class Scheme:
    """One way of caching keys and values; ``groups`` only for ``gqa``."""

    kind: str
    groups: int | None = None

    @property
    def name(self) -> str:
        return f"gqa:{self.groups}" if self.kind == "gqa" else self.kind

    def elements_per_layer(self, s: AttentionShape) -> int:
        """Elements one token adds to one layer's cache (formulas in the module docstring)."""
        if self.kind == "mla":
            return _mla(s)[0] + _mla(s)[1]
        if self.kind == "mla-expanded":
            _, rope, v = _mla(s)
            return s.num_heads * (s.head_dim + rope + v)
        if self.kind == "mha":
            return 2 * s.num_heads * s.head_dim
        if self.kind == "gqa":
            assert self.groups is not None
            return 2 * self.groups * s.head_dim
        return 2 * s.head_dim

    def formula(self, s: AttentionShape) -> str:
        if self.kind == "mla":
            latent, rope, _ = _mla(s)
            return f"d_c + d_R = {latent} + {rope}"
        if self.kind == "mla-expanded":
            _, rope, v = _mla(s)
            return f"n_h·(d_h + d_R + d_v) = {s.num_heads}·({s.head_dim} + {rope} + {v})"
        if self.kind == "mha":
            return f"2·n_h·d_h = 2·{s.num_heads}·{s.head_dim}"
        if self.kind == "gqa":
            return f"2·G·d_h = 2·{self.groups}·{s.head_dim}"
        return f"2·d_h = 2·{s.head_dim}"


def _mla(s: AttentionShape) -> tuple[int, int, int]:
    if s.kv_lora_rank is None or s.rope_dim is None or s.v_head_dim is None:
        raise InputError(f"{s.name} has no MLA attention, so the mla schemes do not apply to it")
    return s.kv_lora_rank, s.rope_dim, s.v_head_dim


def parse_schemes(specs: list[str] | None, num_heads: int) -> list[Scheme]:
    """``["mla,gqa:2,4,8", "mqa"]`` -> schemes. A bare number after ``gqa:G`` is another group count; ``gqa`` alone
    means the default groups. With no specs: every scheme, GQA with the default groups that fit ``num_heads``."""
    default_groups = [g for g in DEFAULT_GQA_GROUPS if g < num_heads] or [1]
    if not specs:
        return [Scheme("mla"), Scheme("mla-expanded"), Scheme("mha"), *(Scheme("gqa", g) for g in default_groups), Scheme("mqa")]
    schemes: list[Scheme] = []
    last_was_gqa = False
    for token in (t.strip().lower() for spec in specs for t in spec.split(",")):
        if not token:
            continue
        if token.isdigit() and last_was_gqa:
            schemes.append(_gqa(token, num_heads))
            continue
        last_was_gqa = token.startswith("gqa")
        if token == "gqa":
            schemes.extend(Scheme("gqa", g) for g in default_groups)
        elif token.startswith("gqa:"):
            schemes.append(_gqa(token[4:], num_heads))
        elif token in SCHEME_KINDS:
            schemes.append(Scheme(token))
        else:
            raise InputError(f"unknown scheme '{token}'", hint="schemes: mla, mla-expanded, mha, gqa:G (e.g. gqa:2,4,8), mqa")
    unique = list(dict.fromkeys(schemes))
    return unique


def _gqa(groups: str, num_heads: int) -> Scheme:
    if not groups.isdigit() or not 1 <= int(groups) <= num_heads:
        raise InputError(f"GQA group count '{groups}' must be an integer between 1 and the {num_heads} attention heads")
    return Scheme("gqa", int(groups))


@dataclass(frozen=True)
class CacheRow:
    """One scheme on one model at one precision."""

    scheme: str
    formula: str
    elements_per_token_per_layer: int
    num_layers: int
    precision: Precision
    equivalent_gqa_groups: float
    fraction_of_mha: float

    @property
    def elements_per_token(self) -> int:
        return self.elements_per_token_per_layer * self.num_layers

    @property
    def bytes_per_token(self) -> float:
        return self.elements_per_token * self.precision.bits / 8

    def bytes_for(self, batch_size: int, context: int) -> float:
        """Bytes of ``batch_size`` sequences of ``context`` tokens each."""
        return self.bytes_per_token * batch_size * context

    def max_tokens(self, available_bytes: float) -> int:
        """Tokens (summed over all sequences) that fit in ``available_bytes``."""
        return max(0, math.floor(available_bytes / self.bytes_per_token))


def cache_row(scheme: Scheme, shape: AttentionShape, prec: Precision) -> CacheRow:
    per_layer = scheme.elements_per_layer(shape)
    return CacheRow(
        scheme=scheme.name,
        formula=scheme.formula(shape),
        elements_per_token_per_layer=per_layer,
        num_layers=shape.num_layers,
        precision=prec,
        equivalent_gqa_groups=per_layer / (2 * shape.head_dim),
        fraction_of_mha=per_layer / Scheme("mha").elements_per_layer(shape),
    )


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_memory(text: str) -> int:
    """``"80GiB"`` -> 85899345920. KB/MB/GB/TB are powers of 1000; K/M/G/T and KiB/MiB/GiB/TiB powers of 1024."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise InputError(f"cannot read '{text}' as an amount of memory", hint="write e.g. 80GiB, 24GB or 1.5TiB")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise InputError(f"`memory` must be positive, not '{text}'")
    return value


def parse_tokens(text: str) -> int:
    """``"4096"``, ``"32k"`` or ``"128K"`` (K = 1024 tokens, M = 1024²) -> tokens; sign kept for the positivity check."""
    match = re.match(r"^\s*(-?[0-9]+)\s*([km]?)\s*$", text, re.IGNORECASE)
    if match is None:
        raise InputError(f"cannot read '{text}' as a number of tokens", hint="write e.g. 4096, 32k or 128K")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]


def json_number(x: float) -> int | float:
    """``2.0`` -> ``2``: whole numbers as JSON integers."""
    return int(x) if float(x).is_integer() else x
