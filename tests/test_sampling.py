"""neoxfuse.sampling: greedy, temperature, top-k, top-p against hand-computed distributions; the
exponential race and its Philox stream (Random123's known answers); seeding."""

import math
import re

import numpy as np
import pytest
import torch

from neoxfuse import sampling
from neoxfuse.errors import InvalidInputError
from neoxfuse.sampling import SamplingParams, choose, exponential_race, next_token, philox4x32_10, probabilities


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
        {"seed": 2**63},
        {"temperature": "0.5"},
        {"temperature": True},
        {"temperature": None},
        {"temperature": torch.tensor(0.5)},
        {"top_p": "1"},
        {"top_p": None},
        {"seed": 1.0},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.2},
        {"repetition_penalty": float("inf")},
        {"repetition_penalty": float("nan")},
        {"repetition_penalty": "1.2"},
        {"repetition_penalty": None},
        {"repetition_penalty": True},
        {"suppress_tokens": "12"},
        {"suppress_tokens": 12},
        {"suppress_tokens": None},
        {"suppress_tokens": [3, -1]},
        {"suppress_tokens": [3, 2.0]},
        {"suppress_tokens": [True]},
        {"presence_penalty": float("nan")},
        {"presence_penalty": float("-inf")},
        {"presence_penalty": None},
        {"frequency_penalty": float("inf")},
        {"frequency_penalty": "0.5"},
        {"frequency_penalty": True},
    ],
)
def test_invalid_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(InvalidInputError):
        SamplingParams(**kwargs)


def test_numpy_numbers_are_taken_as_pythons():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9), seed=np.uint32(7),
                            repetition_penalty=np.float32(1.5))
    assert params == SamplingParams(temperature=0.5, top_k=5, top_p=0.9, seed=7, repetition_penalty=1.5)
    assert [type(v) for v in (params.temperature, params.top_k, params.top_p, params.seed, params.repetition_penalty)] == [
        float, int, float, int, float]


def test_greedy_is_argmax():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(1000, generator=generator) * 3
        assert next_token(logits, SamplingParams()) == int(logits.argmax())
    assert SamplingParams().rng("cpu") is None


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


@pytest.mark.parametrize("top_p, kept", [(0.55, 5), (0.45, 2), (0.65, 5), (0.85, 7)])
def test_top_p_keeps_every_token_tied_with_the_least_likely_kept(top_p, kept):
    # p = 0.3, 0.2, then three tied at 0.1 (mass above them 0.5), two tied at 0.1 - 1/64 (mass above
    # 0.8), the rest: with top_p 0.55 the first 0.1 a sort puts out reaches the mass, and the other
    # two stay too; with 0.85 both of the next tie.
    probs = [0.3, 0.2, 0.1, 0.1, 0.1, 0.1 - 2**-6, 0.1 - 2**-6]
    probs.append(1 - sum(probs))
    logits, order = _shuffled_logits(probs, torch.Generator().manual_seed(kept))
    got = probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert set(torch.nonzero(got).flatten().tolist()) == set(order[:kept].tolist())


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
    rng = params.rng("cpu")
    for _ in range(50):
        logits = torch.randn(200, generator=generator)
        assert next_token(logits, params, rng) == int(logits.argmax())


def test_draws_follow_the_filtered_distribution():
    probs = [0.45, 0.3, 0.15, 0.1]
    logits, order = _shuffled_logits(probs, torch.Generator().manual_seed(8))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=4)  # keeps 0.45, 0.3, 0.15
    rng = params.rng("cpu")
    n = 4000
    counts = torch.bincount(torch.tensor([next_token(logits, params, rng) for _ in range(n)]), minlength=4)
    assert counts[order[3]] == 0
    expected = torch.tensor([0.45, 0.3, 0.15]) / 0.9
    observed = counts[order[:3]].double() / n
    # 4000 draws: each frequency's standard deviation is < 0.008; allow five of them.
    assert torch.allclose(observed, expected.double(), atol=0.04), (observed, expected)


def _draws(seed, n=30):
    params = SamplingParams(temperature=1.0, seed=seed)
    rng = params.rng("cpu")
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 0.5
    return [next_token(logits, params, rng) for _ in range(n)]


def test_seeded_draws_are_reproducible_and_seeds_differ():
    assert _draws(123) == _draws(123)
    assert _draws(123) != _draws(124)


def test_unseeded_streams_differ():
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1000)
    first = [next_token(logits, params, params.rng("cpu")) for _ in range(5)]
    second = [next_token(logits, params, params.rng("cpu")) for _ in range(5)]
    assert first != second


@pytest.mark.parametrize("counter, key, want", [
    # Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key, result.
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])  # fmt: skip
def test_philox_gives_random123s_known_answers(counter, key, want):
    got = philox4x32_10([torch.tensor([c]) for c in counter], [torch.tensor(k) for k in key])
    assert [int(w) for w in got] == want


def test_race_draws_follow_the_weights_over_many_entries():
    # 5000 draws over 12 unnormalised weights, two of them zero: a chi-square test over the ten
    # others (9 degrees of freedom, 99.9% quantile 27.9; every expected count is >= 50).
    weights = torch.tensor([5.0, 0.0, 1.0, 3.0, 0.5, 2.0, 0.0, 4.0, 0.25, 1.5, 6.0, 0.75])
    rng = torch.tensor([99, 0])
    n = 5000
    counts = torch.bincount(torch.cat([exponential_race(weights, rng) for _ in range(n)]), minlength=12).double()
    assert rng.tolist() == [99, n]
    assert counts[weights == 0].sum() == 0
    expected = n * weights[weights > 0].double() / weights.sum()
    chi_square = float(((counts[weights > 0] - expected) ** 2 / expected).sum())
    assert chi_square < 27.9, (counts, expected)


def test_race_uses_fresh_uniforms_at_each_draw_and_entry():
    # Uniform weights: the winner is the entry of the smallest E_i, a uniform pick. Over 2000 draws
    # of 1000 entries: no stuck counter (consecutive winners differ), no favoured index.
    weights = torch.ones(1000)
    rng = torch.tensor([5, 0])
    winners = torch.cat([exponential_race(weights, rng) for _ in range(2000)])
    counts = torch.bincount(winners, minlength=1000)
    assert int(counts.max()) <= 12  # Binomial(2000, 1/1000): P(any of 1000 counts > 12) < 2e-4
    assert abs(float(winners.double().mean()) - 499.5) < 30  # the mean index; its sd is 6.5
    assert (winners[1:] != winners[:-1]).float().mean() > 0.99


def test_race_does_not_read_the_host_and_leaves_the_seed():
    # The draw counter advances in the tensor, by one per draw; the seed stays; nothing else is kept.
    weights = torch.rand(333)
    rng = torch.tensor([2**63 - 1, 2**32 - 1])
    first = exponential_race(weights, rng)
    assert rng.tolist() == [2**63 - 1, 2**32]
    again = exponential_race(weights, torch.tensor([2**63 - 1, 2**32 - 1]))
    assert int(first) == int(again)


def test_sampled_choice_needs_the_random_state():
    with pytest.raises(InvalidInputError, match="random state"):
        choose(torch.randn(10), SamplingParams(temperature=1.0))
    for params in (SamplingParams(repetition_penalty=1.2), SamplingParams(no_repeat_ngram_size=2),
                   SamplingParams(bad_sequences=[(1, 2)])):
        with pytest.raises(InvalidInputError, match="an n-gram ban or bad sequences need the sequence so far"):
            choose(torch.randn(10), params)


@pytest.mark.parametrize("penalty", [1.3, 0.6, 2.0])
def test_repetition_penalty_is_transformers_logits_processor(penalty):
    # transformers' RepetitionPenaltyLogitsProcessor over the sequence's ids (repeats included) is
    # penalize() over the mask of the ids in the history; positive, negative and zero logits.
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=generator) * 4  # [vocab]
    logits[[7, 9]] = 0.0
    ids = torch.tensor([3, 7, 3, 11, 40, 9, 12, 49])  # 3 twice
    params = SamplingParams(repetition_penalty=penalty)
    seen = sampling.tokens_in(params.history(ids.tolist(), 20, "cpu"), 50)
    assert seen.nonzero().flatten().tolist() == sorted(set(ids.tolist()))
    want = RepetitionPenaltyLogitsProcessor(penalty)(ids[None], logits[None].clone())[0]
    assert torch.equal(sampling.penalize(logits, seen, penalty), want)
    assert torch.equal(sampling.penalize(logits.half(), seen, penalty), sampling.penalize(logits.half().float(), seen, penalty))


def test_a_penalized_choice_is_of_the_penalized_logits_and_adds_its_token():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 3.0])
    params = SamplingParams(repetition_penalty=2.0)
    history = params.history([1], 6, "cpu")
    assert history.tolist() == [1, -1, -1, -1, -1, -1]
    assert next_token(logits, params, history=history) == 2  # 5 / 2 < 4
    assert history.tolist() == [1, 2, -1, -1, -1, -1]
    assert next_token(logits, params, history=history) == 4  # 4 / 2 < 3
    assert next_token(logits, params, history=history) == 1  # 5 / 2 > 4 / 2, 3 / 2 and 0
    assert history.tolist() == [1, 2, 4, 1, -1, -1]
    sampled = SamplingParams(temperature=1.0, top_k=2, seed=5, repetition_penalty=2.0)
    rng, history = sampled.rng("cpu"), sampled.history([1, 2], 4, "cpu")
    drawn = next_token(logits, sampled, rng, history)
    seen = torch.tensor([False, True, True, False, False])
    want = exponential_race(probabilities(sampling.penalize(logits, seen, 2.0), sampled), sampled.rng("cpu"))
    assert drawn == int(want) and drawn in (1, 4)  # the top 2 of [0, 2.5, 2, -1, 3]
    assert history.tolist() == [1, 2, drawn, -1] and int(rng[1]) == 1
    assert SamplingParams().history([1], 5, "cpu") is None and not SamplingParams().penalized
    with pytest.raises(InvalidInputError, match="room for the 3 tokens so far and the next; capacity 3"):
        params.history([1, 2, 3], 3, "cpu")


def test_suppressed_tokens_are_never_chosen():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 3.0])
    params = SamplingParams(suppress_tokens=[1, np.int64(2), 1])
    assert params.suppress_tokens == frozenset({1, 2}) and params == SamplingParams(suppress_tokens={2, 1})
    assert params.constraints(5, "cpu").suppressed.tolist() == [False, True, True, False, False]
    assert next_token(logits, params) == 4
    sampled = SamplingParams(temperature=5.0, suppress_tokens=range(4), seed=1)  # only token 4 is left
    rng = sampled.rng("cpu")
    assert [next_token(logits, sampled, rng) for _ in range(5)] == [4] * 5
    assert SamplingParams().constraints(5, "cpu") == (None, None, None, None, None)
    with pytest.raises(InvalidInputError, match=r"suppress_tokens, bad_sequences and sequence_bias are token ids in \[0, 5\); got 5"):
        SamplingParams(suppress_tokens={5}).constraints(5, "cpu")
    with pytest.raises(InvalidInputError, match=r"token ids in \[0, 5\); got 7"):
        next_token(logits, SamplingParams(bad_sequences=[(1, 7)]), history=torch.full((4,), -1))
    with pytest.raises(InvalidInputError, match="must leave tokens to choose from; it holds all 5"):
        next_token(logits, SamplingParams(suppress_tokens=range(5)))


def test_presence_and_frequency_penalties_are_openais_formula_over_the_tokens_chosen():
    # z_i - f c_i - a [c_i > 0], c counting the tokens chosen (the prompt's are not: a history holds
    # them and the counts do not); after the repetition penalty, before the filters.
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(40, generator=generator) * 3  # [vocab]
    chosen = [3, 7, 3, 3, 12, 7]
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.5)
    counts = params.counts(chosen, 40, "cpu")
    assert counts.dtype == torch.int32 and counts.nonzero().flatten().tolist() == [3, 7, 12]
    assert counts[[3, 7, 12]].tolist() == [3, 2, 1] and int(counts.sum()) == 6
    history = params.history([1, 2, 3, *chosen], 20, "cpu")
    penalized = sampling.penalize(logits, sampling.tokens_in(history, 40), 1.5)
    want = penalized.clone()
    for token in set(chosen):
        want[token] -= -0.4 * chosen.count(token) + 0.7
    got = sampling.constrained(logits, params, history, params.constraints(40, "cpu"), counts)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got[[0, 1, 2]], penalized[[0, 1, 2]])  # 1 and 2 only in the prompt: the repetition penalty alone
    assert SamplingParams().counts(chosen, 40, "cpu") is None and not SamplingParams(repetition_penalty=1.5).counts_chosen


def test_a_counted_choice_counts_its_token_and_reads_the_counts():
    logits = torch.tensor([0.0, 5.0, 4.2, -1.0, 3.4])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0)
    counts = params.counts([], 5, "cpu")
    # 5 > 4.2; 5 - 1.5 < 4.2; 3.5 > 4.2 - 1.5 and 3.4; 5 - 2.5 < 3.4; 4.2 - 1.5 > 2.5 and 3.4 - 1.5
    assert [next_token(logits, params, counts=counts) for _ in range(5)] == [1, 2, 1, 4, 2]
    assert counts.tolist() == [0, 2, 2, 0, 1]
    sampled = SamplingParams(temperature=1.0, top_k=1, seed=3, presence_penalty=10.0)
    counts = sampled.counts([1], 5, "cpu")
    assert next_token(logits, sampled, sampled.rng("cpu"), counts=counts) == 2 and counts.tolist() == [0, 1, 1, 0, 0]
    with pytest.raises(InvalidInputError, match="a presence or frequency penalty needs the counts of the tokens chosen"):
        next_token(logits, params)
    with pytest.raises(InvalidInputError, match=r"int32 \[vocab\]"):
        next_token(logits, params, counts=torch.zeros(5))


@pytest.mark.parametrize("temperature, top_k, min_p", [(1.0, 0, 0.1), (0.7, 0, 0.05), (1.5, 20, 0.02), (0.3, 0, 1.0)])
def test_min_p_is_transformers_warper(temperature, top_k, min_p, rng):
    # transformers' temperature, top-k and min-p warpers, then softmax: the probabilities the race
    # draws from; and the draw is the race's over them.
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper

    generator = torch.Generator().manual_seed(rng.randrange(2**32))
    logits = torch.randn(300, generator=generator) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    want = torch.softmax(MinPLogitsWarper(min_p)(None, scores), -1)[0]
    params = SamplingParams(temperature=temperature, top_k=top_k, min_p=min_p, seed=7)
    got = probabilities(sampling.constrained(logits, params, None, params.constraints(300, "cpu")), params)
    assert torch.allclose(got, want, atol=1e-6) and (got == 0).sum() == (want == 0).sum() > 0
    assert next_token(logits, params, params.rng("cpu")) == int(exponential_race(got, params.rng("cpu")))
    greedy = SamplingParams(min_p=0.5)  # no effect on the argmax
    assert torch.equal(sampling.constrained(logits, greedy, None, greedy.constraints(300, "cpu")), logits)


_FILTERS = ["temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"]


@pytest.mark.parametrize("rule", [
    (1.0, 0, 1.0, 0.0, 0.9, 0.0, 0.0), (0.7, 0, 1.0, 0.0, 0.3, 0.0, 0.0), (1.3, 40, 0.95, 0.0, 0.5, 0.0, 0.0),
    (1.0, 0, 1.0, 0.0, 1.0, 3e-3, 0.0), (0.8, 200, 0.98, 0.0, 1.0, 2e-2, 0.0),
    (1.0, 0, 1.0, 0.0, 1.0, 0.0, 3e-3), (2.0, 0, 0.9, 0.0, 1.0, 0.0, 0.05), (1.0, 0, 1.0, 0.0, 1.0, 5e-4, 5e-3),
    (1.0, 0, 0.95, 0.2, 1.0, 0.0, 0.0), (1.5, 100, 0.97, 0.3, 1.0, 0.0, 0.0),
    (2.5, 400, 0.995, 0.01, 0.95, 2e-3, 2e-2),
])  # fmt: skip
def test_filters_after_top_p_are_transformers_warpers_in_their_order(rule, rng):
    # transformers' warpers (temperature, top-k, top-p, min-p, typical, epsilon, eta; each where it
    # is on), then softmax: the probabilities the race draws from, after each warper. The rules
    # are chosen so that the filters after top-p drop tokens top-k and top-p kept (checked against
    # 2000 random logits). The draw is the race's over the probabilities.
    from transformers.generation import logits_process as lp

    rule = dict(zip(_FILTERS, rule))
    generator = torch.Generator().manual_seed(rng.randrange(2**32))
    logits = torch.randn(500, generator=generator) * 2.5
    warpers, dropped = [lp.TemperatureLogitsWarper(rule["temperature"])], {}
    for name, warper in [("top_k", lp.TopKLogitsWarper), ("top_p", lp.TopPLogitsWarper), ("min_p", lp.MinPLogitsWarper),
                         ("typical_p", lp.TypicalLogitsWarper), ("epsilon_cutoff", lp.EpsilonLogitsWarper),
                         ("eta_cutoff", lp.EtaLogitsWarper)]:
        if rule[name] not in (0, 1):
            warpers.append(warper(rule[name]))
            params = SamplingParams(seed=7, **{n: rule[n] for n in _FILTERS[: _FILTERS.index(name) + 1]})
            want = torch.softmax(lp.LogitsProcessorList(warpers)(None, logits[None].clone()), -1)[0]
            got = probabilities(sampling.constrained(logits, params, None, params.constraints(500, "cpu")), params.draw)
            assert torch.allclose(got, want, atol=1e-6) and torch.equal(got == 0, want == 0), name
            dropped[name] = int((want == 0).sum())
    assert list(dropped.values())[-1] > dropped.get("top_p", dropped.get("top_k", 0)), "the filters after top-p drop nothing here"
    assert params.truncates_before_draw == bool(rule["typical_p"] < 1 or rule["epsilon_cutoff"] or rule["eta_cutoff"] or rule["top_p"] < 1)
    assert next_token(logits, params, params.rng("cpu")) == int(exponential_race(got, params.rng("cpu")))
    greedy = SamplingParams(**{n: rule[n] for n in _FILTERS[1:]})  # no effect on the argmax
    assert torch.equal(sampling.constrained(logits, greedy, None, greedy.constraints(500, "cpu")), logits)


def test_typical_keeps_the_tokens_closest_to_the_entropy():
    # p = (0.5, 0.3, 0.1, 0.1): H = 1.168 nats; |-ln p - H| = 0.475, 0.036, 1.135, 1.135, so the
    # order is 0.3, 0.5, then 0.1 and 0.1 (tied: both stay when the second is reached).
    logits, order = _shuffled_logits([0.5, 0.3, 0.1, 0.1], torch.Generator().manual_seed(3))
    for typical_p, kept in [(0.2, [0.0, 1.0, 0.0, 0.0]), (0.3, [0.0, 1.0, 0.0, 0.0]), (0.5, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
                            (0.85, [0.5, 0.3, 0.1, 0.1])]:
        params = SamplingParams(temperature=1.0, typical_p=typical_p)
        got = probabilities(sampling.constrained(logits, params, None, params.constraints(4, "cpu")), params.draw)
        assert torch.allclose(got[order], torch.tensor(kept), atol=1e-6), typical_p


def test_epsilon_keeps_the_most_likely_token_and_eta_lowers_its_cutoff_with_the_entropy():
    logits = torch.zeros(1000)  # near uniform: every p about 1e-3, entropy about ln 1000
    logits[7] = 1e-3
    epsilon, eta = SamplingParams(temperature=1.0, epsilon_cutoff=0.5), SamplingParams(temperature=1.0, eta_cutoff=0.5)
    assert torch.isfinite(sampling.constrained(logits, epsilon, None, sampling.Constraints(None, None))).nonzero().tolist() == [[7]]
    assert torch.isfinite(sampling.constrained(logits, eta, None, sampling.Constraints(None, None))).all()  # min(0.5, sqrt(0.5) / 1000) < 1e-3
    logits[:500] = -3.0  # half the tokens 20 times less likely: eta's cutoff rises above them
    assert torch.isfinite(sampling.constrained(logits, eta, None, sampling.Constraints(None, None))).nonzero().flatten().tolist() == list(range(500, 1000))


def test_the_sampling_kernel_draws_without_the_filters_applied_before_it(monkeypatch):
    # Where the kernel runs, it gets top-k and top-p unless constrained() has applied them (for a
    # filter after them), so that they are not applied twice.
    calls = []

    def sample_token(logits, rng, temperature, top_k, top_p):
        calls.append((temperature, top_k, top_p, torch.isfinite(logits).sum().item()))
        return torch.zeros(1, dtype=torch.long)

    monkeypatch.setattr(sampling, "sample_kernel_runs", lambda device, vocab: True)
    monkeypatch.setattr(sampling.fused_decoder, "sample_token", sample_token)
    logits = torch.randn(500, generator=torch.Generator().manual_seed(5)) * 2.5
    for rule in [SamplingParams(temperature=1.3, top_k=40, top_p=0.8, seed=1), SamplingParams(temperature=1.3, top_k=40, seed=1, min_p=0.1),
                 SamplingParams(temperature=1.3, top_k=40, top_p=0.8, seed=1, typical_p=0.5)]:
        choose(logits, rule, rule.rng("cpu"))
    top_k_top_p = probabilities(logits, SamplingParams(temperature=1.3, top_k=40, top_p=0.8))
    typical = probabilities(sampling.truncated(logits, SamplingParams(temperature=1.3, top_k=40, top_p=0.8, typical_p=0.5)),
                            SamplingParams(temperature=1.3))
    assert calls == [(1.3, 40, 0.8, 500), (1.3, 40, 1.0, calls[1][3]), (1.3, 0, 1.0, int((typical > 0).sum()))]
    assert calls[1][3] < 500 and calls[2][3] < int((top_k_top_p > 0).sum())  # min-p and typical before the kernel


@pytest.mark.parametrize("kwargs, message", [
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"), ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"min_p": "0.1"}, r"min_p must be in \[0, 1\]"), ({"min_p": float("nan")}, r"min_p must be in \[0, 1\]"),
    ({"typical_p": 0.0}, r"typical_p must be in \(0, 1\]"), ({"typical_p": 1.2}, r"typical_p must be in \(0, 1\]"),
    ({"typical_p": None}, r"typical_p must be in \(0, 1\]"), ({"epsilon_cutoff": 1.0}, r"epsilon_cutoff must be in \[0, 1\)"),
    ({"epsilon_cutoff": -1e-3}, r"epsilon_cutoff must be in \[0, 1\)"), ({"eta_cutoff": float("nan")}, r"eta_cutoff must be in \[0, 1\)"),
    ({"eta_cutoff": True}, r"eta_cutoff must be in \[0, 1\)"),
])  # fmt: skip
def test_bad_filters_are_refused(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingParams(**kwargs)


def _hf_processed(processor, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([ids]), logits[None].clone())[0]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_an_ngram_ban_is_transformers_logits_processor(n, rng):
    # Random sequences over 3 tokens repeat n-grams often, against transformers'
    # NoRepeatNGramLogitsProcessor, with the history's spare room after them.
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    processor, params = NoRepeatNGramLogitsProcessor(n), SamplingParams(no_repeat_ngram_size=n)
    rng = torch.Generator().manual_seed(rng.randrange(2**32))
    logits = torch.randn(9, generator=rng)
    banned_somewhere = False
    for _ in range(40):
        ids = torch.randint(0, 3, (int(torch.randint(1, 20, (1,), generator=rng)),), generator=rng).tolist()
        history = params.history(ids, 24, "cpu")
        want = _hf_processed(processor, ids, logits)
        assert torch.equal(sampling.constrained(logits, params, history, params.constraints(9, "cpu")), want), ids
        banned_somewhere |= bool(torch.isinf(want).any())
    assert banned_somewhere
    assert not sampling.repeated_ngram_ends(torch.tensor([1, 2, 1, 2]), 5, 9).any()  # a history shorter than n


def test_bad_sequences_are_transformers_bad_words_processor(rng):
    # transformers' NoBadWordsLogitsProcessor (no eos) over every prefix of random sequences: one-,
    # two- and three-token bad sequences, one a prefix of another, ids sharing last tokens.
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    bad = [[4], [1, 2], [2, 2, 3], [0, 2], [5, 1, 2], [3, 3, 3, 5]]
    processor, params = NoBadWordsLogitsProcessor(bad), SamplingParams(bad_sequences=bad)
    constraints = params.constraints(7, "cpu")
    rng = torch.Generator().manual_seed(rng.randrange(2**32))
    assert constraints.bad_sequences.tolist() == [[-1, -1, 0, 2], [-1, -1, 1, 2], [-1, 2, 2, 3], [3, 3, 3, 5],
                                                  [-1, -1, -1, 4], [-1, 5, 1, 2]]
    logits = torch.randn(7, generator=rng)
    for length in range(1, 12):
        for _ in range(10):
            ids = torch.randint(0, 6, (length,), generator=rng).tolist()
            want = _hf_processed(processor, ids, logits)
            assert torch.equal(sampling.constrained(logits, params, params.history(ids, 13, "cpu"), constraints), want), ids
    history = params.history([0, 1, 3, 3, 3], 8, "cpu")
    assert sampling.bad_sequence_ends(history, constraints.bad_sequences, 7).nonzero().flatten().tolist() == [4, 5]
    assert sampling.bad_sequence_ends(params.history([3, 3], 8, "cpu"), constraints.bad_sequences, 7).nonzero().flatten().tolist() == [4]


def test_sequence_biases_are_transformers_sequence_bias_processor_before_the_penalty(rng):
    # transformers' SequenceBiasLogitsProcessor then RepetitionPenaltyLogitsProcessor (its order) over
    # every prefix of random sequences: one-, two- and three-token sequences, some ending in one token
    # (their biases add up), one biasing a token another bans.
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    bias = {(4,): -3.5, (1, 2): 2.0, (2, 2, 2): 1.25, (0, 2): -0.5, (5,): 4.0, (3, 3, 5): -1.0}
    processors = [SequenceBiasLogitsProcessor({key: value for key, value in bias.items()}), RepetitionPenaltyLogitsProcessor(1.4)]
    params = SamplingParams(sequence_bias=bias, repetition_penalty=1.4)
    constraints = params.constraints(7, "cpu")
    assert params.needs_history and constraints.bias_targets.tolist() == [2, 4, 5]  # (0, 2), (1, 2), (2, 2, 2) end in 2
    assert constraints.bias_sums.tolist() == [[-0.5, 2.0, 1.25, 0, 0, 0], [0, 0, 0, 0, -3.5, 0], [0, 0, 0, -1.0, 0, 4.0]]
    rng = torch.Generator().manual_seed(rng.randrange(2**32))
    logits = torch.randn(7, generator=rng)
    added = set()
    for length in range(1, 12):
        for _ in range(10):
            ids = torch.randint(0, 6, (length,), generator=rng).tolist()
            want = logits
            for processor in processors:
                want = _hf_processed(processor, ids, want)
            got = sampling.constrained(logits, params, params.history(ids, 13, "cpu"), constraints)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=str(ids))
            unbiased = _hf_processed(RepetitionPenaltyLogitsProcessor(1.4), ids, logits)
            added |= set((want - unbiased).tolist())
    assert len(added) > 4  # several biases, and sums of them, came into play
    nested = SamplingParams(sequence_bias={(2,): 0.5, (1, 2): 2.0, (3, 1, 2): 0.25})  # after 3 1, all three add to 2's
    got = sampling.sequence_biases(nested.history([0, 3, 1], 6, "cpu"), nested.constraints(7, "cpu"), 7)
    assert got.tolist() == [0, 0, 2.75, 0, 0, 0, 0]
    alone = SamplingParams(sequence_bias=[((4,), -3.5), ((5,), 4.0)])  # one-token sequences: no history read
    assert not alone.needs_history and alone.history([1], 4, "cpu") is None
    assert next_token(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -3.0, 0.0]), alone) == 5


@pytest.mark.parametrize("sequence_bias, message", [
    ({(): 1.0}, "keys must be non-empty token id sequences"),
    ({(1, -2): 1.0}, "keys must be non-empty token id sequences"),
    ({(1,): float("nan")}, "biases must be finite numbers, got nan for (1,)"),
    ({(1,): float("-inf")}, "biases must be finite numbers"),
    ({(1,): "2"}, "biases must be finite numbers"),
    ([(1, 2.0)], "keys must be non-empty token id sequences"),
    (3, "sequence_bias must map token id sequences to biases"),
])  # fmt: skip
def test_bad_sequence_biases_are_refused(sequence_bias, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        SamplingParams(sequence_bias=sequence_bias)


def test_a_banned_choice_appends_its_token_and_bans_with_it():
    # 0 1 0 chosen greedily by their logits, then 1 would repeat the 2-gram (0, 1): the next best, 2.
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    params = SamplingParams(no_repeat_ngram_size=2)
    history = params.history([0], 4, "cpu")
    assert next_token(logits, params, history=history) == 1
    assert next_token(torch.tensor([5.0, 0.0, 0.0, 0.0]), params, history=history) == 0
    assert next_token(logits, params, history=history) == 2
    assert history.tolist() == [0, 1, 0, 2]
    sampled = SamplingParams(temperature=1.0, seed=3, bad_sequences=[(0, 1)], no_repeat_ngram_size=2)
    rng, history = sampled.rng("cpu"), sampled.history([0], 4, "cpu")
    assert next_token(torch.tensor([0.0, 50.0, 49.0, 0.0]), sampled, rng, history) == 2  # 1 is banned after 0
    assert history.tolist() == [0, 2, -1, -1]


@pytest.mark.parametrize("kwargs, message", [
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
    ({"no_repeat_ngram_size": 2.0}, "no_repeat_ngram_size must be an integer >= 0"),
    ({"no_repeat_ngram_size": True}, "no_repeat_ngram_size must be an integer >= 0"),
    ({"bad_sequences": [[]]}, "bad_sequences must be a collection of non-empty token id sequences"),
    ({"bad_sequences": [1, 2]}, "bad_sequences must be"),
    ({"bad_sequences": "ab"}, "bad_sequences must be"),
    ({"bad_sequences": [[1, -2]]}, "bad_sequences must be"),
    ({"bad_sequences": [[1, 2.5]]}, "bad_sequences must be"),
    ({"bad_sequences": [torch.tensor([1, 2])]}, "bad_sequences must be"),
])  # fmt: skip
def test_bad_bans_are_refused(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingParams(**kwargs)


def test_bans_are_kept_as_sets():
    params = SamplingParams(bad_sequences=[[1, np.int64(2)], (1, 2), [3]], no_repeat_ngram_size=np.int64(3))
    assert params.bad_sequences == frozenset({(1, 2), (3,)}) and type(params.no_repeat_ngram_size) is int
    assert params == SamplingParams(bad_sequences={(3,), (1, 2)}, no_repeat_ngram_size=3) and params.needs_history


@pytest.mark.parametrize("weights, rng, message", [
    (torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.long), "weights must be float32"),
    (torch.zeros(0), torch.zeros(2, dtype=torch.long), "at least one entry"),
    (torch.zeros(4), torch.zeros(2), "rng must be int64"),
    (torch.zeros(4), torch.zeros(1, dtype=torch.long), r"rng must have shape \[2\]"),
])  # fmt: skip
def test_race_names_bad_arguments(weights, rng, message):
    with pytest.raises(InvalidInputError, match=message):
        exponential_race(weights, rng)



@pytest.mark.parametrize("device, capability, vocab, kernel", [
    ("cpu", None, 50304, False), ("cuda", (8, 0), 50304, False), ("cuda", (9, 0), 50304, True),
    ("cuda", (12, 0), 50304, True), ("cuda", (9, 0), 65536, True), ("cuda", (9, 0), 65537, False),
    ("cuda", (10, 0), 50304, False),
])  # fmt: skip
def test_the_sampling_kernel_runs_on_gpus_with_clusters_and_vocabularies_it_holds(pretend_gpu, device, capability,
                                                                                   vocab, kernel):
    # An A100 (sm_80) samples with PyTorch ops: the kernel needs thread-block clusters; so does a
    # vocabulary over the 65536 entries the kernel's registers hold, and a B200 (sm_100), for
    # which the library holds no code.
    if capability is not None:
        pretend_gpu(capability)
    assert sampling.sample_kernel_runs(torch.device(device), vocab) is kernel
