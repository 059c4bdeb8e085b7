"""How much a candidate's next-token predictions differ from a reference's: the one quality metric.

``dsv2 convert --probe`` (``probe.py``) compares a converted checkpoint with its source, and
``inference/quality.py`` a decode path (int8 products, compiled steps, a bfloat16 cache) with a
reference model's forward; both report a :class:`QualityChange` from :func:`compare_logits`, in one
JSON shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class QualityChange:
    """Next-token predictions of a candidate against a reference, over the same ``tokens`` positions."""

    tokens: int  # positions compared (each one a prediction of the next token)
    reference_logprob: float  # mean log p_reference(next token), nats
    candidate_logprob: float  # mean log p_candidate(next token), nats
    top1_agreement: float  # share of positions where both predict the same token
    max_logit_diff: float  # largest |logit difference| over positions and vocabulary

    @property
    def log_likelihood_change(self) -> float:
        """Mean of log p_candidate(next) - log p_reference(next): negative when the candidate is worse."""
        return self.candidate_logprob - self.reference_logprob

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "reference_mean_logprob": round(self.reference_logprob, 6),
            "candidate_mean_logprob": round(self.candidate_logprob, 6),
            "log_likelihood_change": round(self.log_likelihood_change, 6),
            "top1_agreement": round(self.top1_agreement, 4),
            "max_logit_diff": round(self.max_logit_diff, 6),
        }


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> QualityChange:
    """reference, candidate ``[N, V]``: logits predicting ``targets`` ``[N]`` (the next token at each position)."""
    expected = reference.float().log_softmax(-1)  # [N, V]
    got = candidate.float().log_softmax(-1)
    index = targets[:, None]  # [N, 1]
    return QualityChange(
        tokens=int(targets.shape[0]),
        reference_logprob=expected.gather(1, index).mean().item(),
        candidate_logprob=got.gather(1, index).mean().item(),
        top1_agreement=(got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        max_logit_diff=(reference.float() - candidate.float()).abs().max().item(),
    )
