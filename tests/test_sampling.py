"""neoxfuse.sampling: greedy, temperature, top-k, top-p against hand-computed distributions; seeding."""

import math

import pytest
import torch

from neoxfuse.errors import InvalidInputError
from neoxfuse.sampling import SamplingParams, next_token, probabilities


def _shuffled_logits(probs: list[float], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits log(p) of a known distribution, in a random token order: (logits [n], order [n])."""
    order = torch.randperm(len(probs), generator=generator)
    logits = torch.empty(len(probs))
    logits[order] = torch.tensor(probs).log()
    return logits, order


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_k": True},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"seed": -3},
        {"seed": "7"},
    ],
)
def test_invalid_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(InvalidInputError):
        SamplingParams(**kwargs)


def test_greedy_is_argmax():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(1000, generator=generator) * 3
        assert next_token(logits, SamplingParams()) == int(logits.argmax())
    assert SamplingParams().generator("cpu") is None


def test_greedy_has_no_distribution():
    with pytest.raises(InvalidInputError, match="greedy"):
        probabilities(torch.randn(8), SamplingParams())


def test_logits_must_be_one_row():
    with pytest.raises(InvalidInputError, match=r"\[vocab\]"):
        probabilities(torch.randn(2, 8), SamplingParams(temperature=1.0))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.7])
def test_temperature_divides_the_logits(temperature):
    logits = torch.randn(301) * 2
    got = probabilities(logits, SamplingParams(temperature=temperature))
    scaled = (logits.double() / temperature).exp()
    torch.testing.assert_close(got.double(), scaled / scaled.sum(), rtol=1e-5, atol=1e-7)


def test_temperature_sharpens_and_flattens():
    logits = torch.randn(500) * 2
    logits[torch.randint(500, ())] = logits.max() + 1  # a clear argmax: at T=0.05 it leads by >= 20

    def entropy(temperature):
        p = probabilities(logits, SamplingParams(temperature=temperature)).double()
        return float(-(p[p > 0] * p[p > 0].log()).sum())

    entropies = [entropy(t) for t in (0.05, 0.5, 1.0, 4.0, 100.0)]
    assert entropies == sorted(entropies)
    assert entropies[0] < 0.2  # nearly all mass on the argmax
    assert entropies[-1] > 0.99 * math.log(500)  # nearly uniform


@pytest.mark.parametrize(
    "top_p, kept",
    [
        # p = 0.5, 0.3, 0.15, 0.05: keep while the mass before a token is < top_p
        (0.3, [0.5]),
        (0.7, [0.5, 0.3]),
        (0.9, [0.5, 0.3, 0.15]),
        (0.99, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    logits, order = _shuffled_logits(probs, torch.Generator().manual_seed(int(top_p * 100)))
    got = probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros(4)
    expected[order[: len(kept)]] = torch.tensor(kept) / sum(kept)
    torch.testing.assert_close(got, expected)


def test_top_k_then_top_p_work_on_the_renormalised_distribution():
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]
    logits, order = _shuffled_logits(probs, torch.Generator().manual_seed(5))
    # top-k 3 leaves 0.4, 0.3, 0.2 -> 4/9, 3/9, 2/9; top-p 0.7: the masses before are 0, 4/9, 7/9 -> keep two
    got = probabilities(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    expected = torch.zeros(5)
    expected[order[:2]] = torch.tensor([4 / 7, 3 / 7])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("top_k", [1, 2, 7])
def test_top_k_keeps_the_k_most_likely(top_k):
    logits = torch.randn(64) * 2
    got = probabilities(logits, SamplingParams(temperature=0.9, top_k=top_k))
    top = torch.topk(logits, top_k).indices
    assert set(torch.nonzero(got).flatten().tolist()) == set(top.tolist())
    expected = torch.softmax(logits[top] / 0.9, dim=0)
    torch.testing.assert_close(got[top], expected)


def test_top_k_one_is_greedy():
    generator = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=1.5, top_k=1, seed=11)
    draw = params.generator("cpu")
    for _ in range(50):
        logits = torch.randn(200, generator=generator)
        assert next_token(logits, params, draw) == int(logits.argmax())


def test_draws_follow_the_filtered_distribution():
    probs = [0.45, 0.3, 0.15, 0.1]
    logits, order = _shuffled_logits(probs, torch.Generator().manual_seed(8))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=4)  # keeps 0.45, 0.3, 0.15
    draw = params.generator("cpu")
    n = 4000
    counts = torch.bincount(torch.tensor([next_token(logits, params, draw) for _ in range(n)]), minlength=4)
    assert counts[order[3]] == 0
    expected = torch.tensor([0.45, 0.3, 0.15]) / 0.9
    observed = counts[order[:3]].double() / n
    # 4000 draws: each frequency's standard deviation is < 0.008; allow five of them.
    assert torch.allclose(observed, expected.double(), atol=0.04), (observed, expected)


def _draws(seed, n=30):
    params = SamplingParams(temperature=1.0, seed=seed)
    draw = params.generator("cpu")
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 0.5
    return [next_token(logits, params, draw) for _ in range(n)]


def test_seeded_draws_are_reproducible_and_seeds_differ():
    assert _draws(123) == _draws(123)
    assert _draws(123) != _draws(124)


def test_unseeded_generators_differ():
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1000)
    first = [next_token(logits, params, params.generator("cpu")) for _ in range(5)]
    second = [next_token(logits, params, params.generator("cpu")) for _ in range(5)]
    assert first != second
