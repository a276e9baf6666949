"""The sampling kernel (kernels/fused_decoder/sample.cuh, neoxfuse.ops.fused_decoder.sample_token):
temperature, top-k, top-p and the exponential race in one launch, against neoxfuse.sampling's
PyTorch ops (probabilities, then exponential_race), which tests/test_sampling.py checks against
hand-computed distributions.

The kernel and PyTorch compute exp, and top-p's masses, with different roundings; they agree on
every token unless those roundings decide a near tie. The random cases assert that they keep
clear of one (_assert_clear_of_thresholds: the kept set is the same in fp64 with the budget
moved by 1e-5), so an equality that fails is the kernel's error, not the data's. The structured
cases use exact ties, which every rounding keeps. The `test_emulated_*` tests run the kernel on
the CPU (tests/emulator); the GPU test runs it on the device against PyTorch there and on the CPU.
Last, the CPU checks of `neoxfuse bench sample`'s peers.
"""

import argparse
import contextlib
import math

import pytest
import torch

from neoxfuse.bench import sample as sample_bench
from neoxfuse.errors import InvalidInputError, KernelError, UnsupportedModelError
from neoxfuse.ops import fused_decoder as fd
from neoxfuse.sampling import SamplingParams, exponential_race, probabilities

SANITIZE = ("test_sample_token_is_pytorchs_on_the_gpu_and_the_cpu[1001]",)

RULES = {  # the sampling rules of the random cases: temperature, top-k, top-p, and all together
    "t1.0": SamplingParams(temperature=1.0),
    "t0.8-k50": SamplingParams(temperature=0.8, top_k=50),
    "t0.8-p0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "t1.3-k50-p0.95": SamplingParams(temperature=1.3, top_k=50, top_p=0.95),
    "t0.6-k1000-p0.5": SamplingParams(temperature=0.6, top_k=1000, top_p=0.5),
}


def _random_logits(vocab: int, seed: int) -> torch.Tensor:
    """Logits as a model gives them: N(0, 9), [vocab] fp32."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _pytorch_token(logits: torch.Tensor, rng: torch.Tensor, rule: SamplingParams) -> int:
    """neoxfuse.sampling's PyTorch path: the race over probabilities(logits, rule); rng advances."""
    return int(exponential_race(probabilities(logits, rule), rng))


def _kept_fp64(logits: torch.Tensor, rule: SamplingParams, budget_scale: float = 1.0) -> set[int]:
    """The tokens the rule keeps, computed in fp64, with top-p's budget scaled by budget_scale."""
    probs = torch.softmax(logits.double() / rule.temperature, dim=0)
    keep = probs > 0
    if 0 < rule.top_k < probs.numel():
        keep &= probs >= torch.topk(probs, rule.top_k).values[-1]
    if rule.top_p < 1:
        kept_probs = torch.where(keep, probs, torch.zeros_like(probs))
        keep &= _mass_above(kept_probs) < rule.top_p * kept_probs.sum() * budget_scale
    return set(torch.nonzero(keep).flatten().tolist())


def _mass_above(probs: torch.Tensor) -> torch.Tensor:
    """For each entry, the sum of the entries strictly larger than it. [n] fp64."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
    first_of_tie = torch.searchsorted(-sorted_probs, -sorted_probs, side="left")  # ties share their first's mass
    return torch.empty_like(probs).scatter_(0, order, mass_before[first_of_tie])


def _assert_clear_of_thresholds(logits: torch.Tensor, rule: SamplingParams) -> None:
    """The test data is no near tie: the k-th and (k+1)-th probabilities differ, and top-p keeps the
    same tokens with its budget 1e-5 larger or smaller."""
    if 0 < rule.top_k < logits.numel():
        top = torch.topk(logits.double(), rule.top_k + 1).values
        assert top[-2] - top[-1] > 1e-4, "pick another seed: the k-th and (k+1)-th logits nearly tie"
    if rule.top_p < 1:
        assert _kept_fp64(logits, rule, 1 - 1e-5) == _kept_fp64(logits, rule, 1 + 1e-5), \
            "pick another seed: top-p's budget nearly falls on a token"


def _emulated_draws(emulated, logits: torch.Tensor, rule: SamplingParams, draws: int, seed: int, draw: int = 0) -> list[int]:
    """`draws` tokens from the emulated kernel, one after another from rng = [seed, draw], each
    asserted to be PyTorch's for the same random state, and rng to advance by one per draw."""
    rng, want_rng = torch.tensor([seed, draw]), torch.tensor([seed, draw])
    got = []
    for step in range(draws):
        token = torch.full((1,), -1, dtype=torch.long)
        emulated.sample_token(logits, rng, token, rule.temperature, rule.top_k, rule.top_p)
        got.append(int(token))
        assert got[-1] == _pytorch_token(logits, want_rng, rule), step
        assert rng.tolist() == want_rng.tolist() == [seed, draw + step + 1]
    return got


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("vocab", [1, 5, 1001, 50304, 65536])
def test_emulated_sample_token_is_pytorchs(emulated, vocab, rule):
    # Three draws in a row from a seed whose draw counter carries into its high word: the kernel's
    # token is PyTorch's each time, and each draw advances rng[1] by one. 65536: every register slot.
    logits = _random_logits(vocab, seed=vocab)
    _assert_clear_of_thresholds(logits, rule)
    _emulated_draws(emulated, logits, rule, 3, seed=2**63 - 1, draw=2**32 - 2)


@pytest.mark.parametrize("rule, kept", [
    (SamplingParams(temperature=1.0, top_k=3), 5),            # the 3rd is tied with two more
    (SamplingParams(temperature=1.0, top_p=0.55), 5),         # the 3rd reaches the mass; its ties stay
    (SamplingParams(temperature=1.0, top_k=2, top_p=0.5), 1),  # top-p over what top-k kept (alone: 2)
    (SamplingParams(temperature=1.0, top_k=7), 7),
])  # fmt: skip
def test_emulated_sample_token_keeps_ties_and_draws_every_kept_token(emulated, rule, kept):
    # p = 0.3, 0.2, 0.1 (x3), 0.05 (x2) at scattered indices of a 3001-entry vocabulary (so the
    # kept tokens sit in different blocks), the remaining 0.05 spread thinly over the rest. 150
    # draws: the kernel's tokens are PyTorch's, and together they are exactly the kept set.
    probs = torch.full((3001,), 0.05 / 2994)
    tokens = torch.randperm(3001, generator=torch.Generator().manual_seed(kept))[:7]
    probs[tokens] = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    got = _emulated_draws(emulated, probs.log(), rule, 150, seed=17)
    assert set(got) == set(tokens[:kept].tolist())


@pytest.mark.parametrize("rule", [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_k=10),
                                  SamplingParams(temperature=2.0, top_k=10, top_p=0.01)])
def test_emulated_sample_token_with_every_logit_equal_keeps_them_all(emulated, rule):
    # 50304 ties: every one has no mass above it and is tied with the k-th, so each is kept, and
    # each block's histogram has a single full bin (every atomic add on one address).
    got = _emulated_draws(emulated, torch.zeros(50304), rule, 5, seed=3)
    assert len(set(got)) == 5


def test_emulated_sample_token_at_a_low_temperature_keeps_what_does_not_underflow(emulated):
    # At T = 0.03, exp(z / T - max) underflows to 0 for all but a few dozen entries: fewer positive
    # than top_k, so every positive one is kept (as PyTorch's top-k keeps its zero-probability ties).
    logits = _random_logits(50304, seed=8)
    rule = SamplingParams(temperature=0.03, top_k=200)
    assert 1 < int((probabilities(logits, rule) > 0).sum()) < 200
    _emulated_draws(emulated, logits, rule, 5, seed=8)


def test_emulated_sample_token_rounds_the_masses_of_many_tiny_entries(emulated):
    # e = 1 (A), 0.5 (B) and 65534 tiny entries of e x 2^30 = 3.9 (their mass: 2.4e-4). B's mass
    # above is 1; top_p puts the budget 9e-6 above it when the tiny masses are summed as they are
    # or rounded (4 each), but 1e-5 below it if they were truncated (3 each): B must be drawn.
    logits = torch.full((65536,), math.log(3.9 / 2**30))
    logits[[0, 40000]] = torch.tensor([0.0, math.log(0.5)])
    exact_total = 1.5 + 65534 * 3.9 / 2**30
    rule = SamplingParams(temperature=1.0, top_p=(1 - 1e-5) / (1.5 + 2.1e-4))
    assert 1 < rule.top_p * exact_total < 1 + 1e-5 and rule.top_p * (1.5 + 65534 * 3 / 2**30) < 1
    got = _emulated_draws(emulated, logits, rule, 20, seed=6)
    assert set(got) == {0, 40000}


def test_emulated_sample_token_never_draws_what_is_not_a_number_or_minus_infinity(emulated):
    logits = torch.full((4099,), float("-inf"))
    logits[::3] = float("nan")
    logits[[7, 2500]] = torch.tensor([1.0, 1.5])  # only these may be drawn
    rng = torch.tensor([1, 0])
    got = set()
    for rule in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9)):
        for _ in range(30):
            token = torch.zeros(1, dtype=torch.long)
            emulated.sample_token(logits, rng, token, rule.temperature, rule.top_k, rule.top_p)
            got.add(int(token))
    assert got == {7, 2500}
    token = torch.full((1,), -1, dtype=torch.long)
    emulated.sample_token(torch.full((9,), float("-inf")), rng, token, 1.0, 2, 0.5)  # nothing can win: the lowest index
    assert int(token) == 0


def test_emulated_sample_token_reads_each_logit_once_and_ignores_the_schedule(emulated):
    logits = emulated.guarded(_random_logits(50304, seed=1))
    rule = RULES["t1.3-k50-p0.95"]
    tokens = []
    for reverse in (False, True):
        rng, token = emulated.guarded(torch.tensor([11, 5])), emulated.guarded(torch.zeros(1, dtype=torch.long))
        with contextlib.ExitStack() as stack:
            if reverse:
                stack.enter_context(emulated.reverse_schedule())
            count = stack.enter_context(emulated.watch(logits))
            emulated.call_sample_token(logits, rng, token, rule.temperature, rule.top_k, rule.top_p)
        assert count == [4 * 50304]
        tokens.append(int(token))
    assert tokens[0] == tokens[1] == _pytorch_token(logits, torch.tensor([11, 5]), rule)


@pytest.mark.parametrize("vocab, temperature, top_k, top_p, message", [
    (fd.MAX_SAMPLE_VOCAB + 1, 1.0, 0, 1.0, "unsupported"),
    (8, 0.0, 0, 1.0, "invalid argument"),
    (8, float("inf"), 0, 1.0, "invalid argument"),
    (8, 1.0, -1, 1.0, "invalid argument"),
    (8, 1.0, 0, 0.0, "invalid argument"),
    (8, 1.0, 0, 1.5, "invalid argument"),
])  # fmt: skip
def test_emulated_c_abi_refuses_what_the_kernel_cannot_sample(emulated, vocab, temperature, top_k, top_p, message):
    rng, token = torch.zeros(2, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
    with pytest.raises(KernelError, match=message):
        emulated.call_sample_token(torch.zeros(vocab), rng, token, temperature, top_k, top_p)
    assert rng.tolist() == [0, 0] and int(token) == -1


_RNG, _TOKEN = torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("logits, rng, token, rule, error, message", [
    (torch.zeros(8, dtype=torch.float16), _RNG, _TOKEN, (1.0, 0, 1.0), InvalidInputError, "logits must be float32"),
    (torch.zeros(2, 8), _RNG, _TOKEN, (1.0, 0, 1.0), InvalidInputError, "logits must have shape"),
    (torch.zeros(0), _RNG, _TOKEN, (1.0, 0, 1.0), InvalidInputError, "at least one entry"),
    (torch.zeros(8), _RNG.int(), _TOKEN, (1.0, 0, 1.0), InvalidInputError, "rng must be int64"),
    (torch.zeros(8), torch.zeros(3, dtype=torch.long), _TOKEN, (1.0, 0, 1.0), InvalidInputError, "rng must have shape"),
    (torch.zeros(8), _RNG, _TOKEN.int(), (1.0, 0, 1.0), InvalidInputError, "token must be int64"),
    (torch.zeros(8), _RNG, torch.zeros(2, dtype=torch.long), (1.0, 0, 1.0), InvalidInputError, "token must have shape"),
    (torch.zeros(8), _RNG.to("meta"), _TOKEN, (1.0, 0, 1.0), InvalidInputError, "one device"),
    (torch.zeros(8), _RNG, _TOKEN, (0.0, 0, 1.0), InvalidInputError, "greedy decoding"),
    (torch.zeros(8), _RNG, _TOKEN, (-1.0, 0, 1.0), InvalidInputError, "temperature must be >= 0"),
    (torch.zeros(8), _RNG, _TOKEN, (1.0, -2, 1.0), InvalidInputError, "top_k must be an integer"),
    (torch.zeros(8), _RNG, _TOKEN, (1.0, 0, 0.0), InvalidInputError, "top_p must be in"),
    (torch.zeros(fd.MAX_SAMPLE_VOCAB + 1), _RNG, _TOKEN, (1.0, 0, 1.0), UnsupportedModelError, "vocab 65537 is over 65536"),
])  # fmt: skip
def test_bad_sample_arguments_are_named_before_any_launch(logits, rng, token, rule, error, message):
    with pytest.raises(error, match=message):
        fd.sample_token(logits, rng, *rule, out=token)


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("vocab", [50304, 1001])
def test_sample_token_is_pytorchs_on_the_gpu_and_the_cpu(vocab):
    # One seed, one token on every device: the kernel, PyTorch on the GPU and on the CPU; for every
    # rule, four draws in a row from two seeds.
    logits = _random_logits(vocab, seed=3)
    for name, rule in RULES.items():
        _assert_clear_of_thresholds(logits, rule)
        for seed, draw in [(0, 0), (2**63 - 1, 2**32 + 5)]:
            rng = torch.tensor([seed, draw], device="cuda")
            token = torch.full((1,), -1, dtype=torch.long, device="cuda")
            for step in range(4):
                fd.sample_token(logits.cuda(), rng, rule.temperature, rule.top_k, rule.top_p, out=token)
                want_gpu = _pytorch_token(logits.cuda(), torch.tensor([seed, draw + step], device="cuda"), rule)
                want_cpu = _pytorch_token(logits, torch.tensor([seed, draw + step]), rule)
                assert int(token) == want_gpu == want_cpu, (name, seed, draw, step)
            assert rng.tolist() == [seed, draw + 4]


# ------------------------------------------------------------------------------------------------
# neoxfuse bench sample (python/neoxfuse/bench/sample.py): its peers, checked on the CPU.


@pytest.mark.parametrize("text", sample_bench.DEFAULT_RULES)
def test_bench_peers_sample_from_the_distribution_the_kernel_samples_from(text):
    # The hf_eager peer (transformers' warpers, softmax) keeps the tokens neoxfuse.sampling keeps
    # and gives them the same probabilities, so the benchmark compares like with like.
    rule = sample_bench.parse_rule(text)
    logits = _random_logits(50304, seed=4)
    _assert_clear_of_thresholds(logits, rule)
    want = probabilities(logits, rule)
    got = sample_bench.hf_probabilities(logits, rule)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("text", ["0:0:1", "1:0", "1:-1:1", "1:0:0", "x:1:1"])
def test_bench_rules_that_sample_nothing_or_do_not_parse_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="T:K:P|greedy"):
        sample_bench.parse_rule(text)
