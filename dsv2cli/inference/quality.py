"""How much a model's decode path changes next-token log-likelihoods against a reference model.

Used to state the cost of the int8 decode path (int8 weights, and in eager decoding int8 x int8
matmuls on a quantized token) and of a bfloat16 latent cache: the
reference scores every position in one forward; the candidate reads the same tokens one decode
step at a time through its latent cache, the way `dsv2 generate` runs it (eagerly, or through a
:class:`~dsv2cli.inference.compiled.CompiledDecoder` as `dsv2 generate --compile` does). The metric
is ``checkpoint/quality.py``'s, the one ``dsv2 convert --probe`` reports.
"""

from __future__ import annotations

import torch

from dsv2cli.checkpoint.quality import QualityChange, compare_logits
from dsv2cli.inference.compiled import CompiledDecoder, round_capacity
from dsv2cli.model import DeepseekV2, ForwardOptions


@torch.inference_mode()
def teacher_forced_decode_change(
    reference: DeepseekV2,
    candidate: DeepseekV2,
    tokens: torch.Tensor,
    decoder: CompiledDecoder | None = None,
    cache_dtype: torch.dtype | None = None,
    options: ForwardOptions = ForwardOptions(),
) -> QualityChange:
    """tokens ``[1, S]``: the reference's one forward against the candidate's S - 1 decode steps.

    With ``decoder`` (compiled for ``candidate``) the first token is the prefill and the rest are compiled steps
    (both with the decoder's options); without, every step is eager with ``options``.
    The candidate's latent cache holds ``cache_dtype`` values (default: its own dtype).
    """
    expected = reference(tokens)[0, :-1]  # [S-1, V]
    if decoder is None:
        cache = candidate.new_cache(1, tokens.shape[1], dtype=cache_dtype)
        steps = [candidate(tokens[:, t : t + 1], cache=cache, options=options)[0, -1] for t in range(tokens.shape[1] - 1)]
    else:
        cache = candidate.new_cache(1, round_capacity(tokens.shape[1]), dtype=cache_dtype)
        steps = [candidate(tokens[:, :1], cache=cache, options=decoder.options)[0, -1]]
        decoder.prepare(cache)
        steps += [decoder.step(tokens[:, t : t + 1], cache)[0, -1] for t in range(1, tokens.shape[1] - 1)]
    return compare_logits(expected, torch.stack(steps), tokens[0, 1:])  # [S-1, V] each
