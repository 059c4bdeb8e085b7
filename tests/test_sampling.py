import math

import pytest
import torch

from dsv2cli.errors import InputError
from dsv2cli.inference.sampling import SamplingParams, apply_repetition_penalty, choose_tokens, filter_logits, row_generators

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().view(-1).tolist()


def test_top_k():
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_k=2))) == [0, 1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.6))) == [0, 1]
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))) == [0, 1]
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.71))) == [0, 1, 2]
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.1))) == [0]


def test_min_p_is_relative_to_the_top_token():
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))) == [0, 1, 2]
    assert _kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, min_p=0.5))) == [0]


def test_temperature_scales_logits():
    scaled = filter_logits(LOGITS, SamplingParams(temperature=2.0))
    assert torch.allclose(scaled, LOGITS / 2)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_takes_argmax_and_penalty_can_change_it():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert choose_tokens(logits, SamplingParams(), None).tolist() == [0]
    seen = torch.tensor([[True, False, False]])
    assert choose_tokens(logits, SamplingParams(repetition_penalty=2.0), None, seen).tolist() == [1]


def test_seeded_sampling_is_reproducible_per_row():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    runs = [
        [choose_tokens(logits, params, gens).tolist() for _ in range(5)]
        for gens in (row_generators(7, [0, 1, 2]), row_generators(7, [0, 1, 2]))
    ]
    assert runs[0] == runs[1]
    alone = [choose_tokens(logits[1:2], params, gens).tolist() for gens in [row_generators(7, [1])] for _ in range(5)]
    assert [r[1] for r in runs[0]] == [a[0] for a in alone]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    gens = row_generators(0, [0])
    draws = [choose_tokens(probs.log(), SamplingParams(temperature=1.0), gens).item() for _ in range(2000)]
    assert math.isclose(draws.count(0) / 2000, 0.7, abs_tol=0.05)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": 1.0}, {"repetition_penalty": 0}]
)
def test_bad_values_are_input_errors(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)
