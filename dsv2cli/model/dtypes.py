"""Float dtypes by name (the one table of them) and ``cast``, a conversion that is free when there is nothing to convert.

``tensor.to(dtype)`` and ``tensor.float()`` go through the dispatcher even when the dtype already
matches (about 1-3 microseconds on CPU); a float32 decode step makes hundreds of such calls.
"""

from __future__ import annotations

import torch

from dsv2cli.errors import InputError

# The float dtypes a model computes and stores weights in, by the name users and config files give them.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is an :class:`InputError` listing the known ones."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype '{name}'", hint=f"choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` itself when it already has ``dtype``, else ``tensor.to(dtype)``."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
