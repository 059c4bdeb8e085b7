"""The one quality metric (checkpoint/quality.py) on logits small enough to check by hand."""

import math

import pytest
import torch

from dsv2cli.checkpoint.quality import compare_logits


def test_compare_logits_by_hand():
    reference = torch.zeros(2, 2)  # p = 1/2 for both tokens at both positions
    candidate = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])  # p(token 0) = 3/4 at the first position
    change = compare_logits(reference, candidate, torch.tensor([0, 1]))
    assert change.tokens == 2
    assert change.reference_logprob == pytest.approx(math.log(0.5))
    assert change.candidate_logprob == pytest.approx((math.log(0.75) + math.log(0.5)) / 2)
    assert change.log_likelihood_change == pytest.approx(math.log(0.75 / 0.5) / 2)
    assert change.top1_agreement == 1.0  # ties go to the first token
    assert change.max_logit_diff == pytest.approx(math.log(3))
    assert set(change.to_json()) == {
        "tokens",
        "reference_mean_logprob",
        "candidate_mean_logprob",
        "log_likelihood_change",
        "top1_agreement",
        "max_logit_diff",
    }


def test_a_model_against_itself_changes_nothing():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    change = compare_logits(logits, logits.clone(), torch.tensor([1, 2, 3, 4, 5]))
    assert change.log_likelihood_change == 0.0 and change.top1_agreement == 1.0 and change.max_logit_diff == 0.0
