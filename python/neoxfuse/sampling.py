"""Choosing the next token from a step's logits: greedy, or sampled with temperature, top-k and top-p.

Given logits z [vocab] (computed in fp32 whatever the model's dtype):

- with a repetition penalty r != 1 (as transformers' RepetitionPenaltyLogitsProcessor), first every
  token already in the sequence (the prompt and the tokens generated so far: seen_i) is made less
  likely for r > 1:  z_i <- z_i / r where z_i > 0, z_i * r where z_i < 0, for each i with seen_i.
  `seen` is a bool tensor [vocab] in device memory that each choice adds its token to.
- suppressed tokens (suppress_tokens, as transformers' option of that name; the engine's
  min_new_tokens suppresses the stop tokens for the first new tokens) get z_i = -inf: never chosen.
- greedy (temperature 0): next = argmax_i z_i.
- sampled: p_i = softmax(z / T)_i, then
  - top-k keeps the k tokens of largest p (k = 0: all; tokens tied with the k-th are kept too),
  - top-p (nucleus) keeps the smallest set of most likely tokens whose mass reaches top_p of
    what top-k kept: token i stays while the mass of the kept tokens more likely than it is
    < top_p x their total (so the most likely token always stays, and so do all tokens tied with
    the least likely one kept; top_p = 1: all),
  - the kept p are renormalised to sum 1, and one token is drawn by an exponential race:

        next = argmax_i p_i / E_i,   E_i = -ln(u_i),   u_i uniform in (0, 1), independent

    The E_i are independent Exp(1) draws, so P(next = i) = p_i (the token with the smallest
    E_i / p_i, an Exp(p_i) arrival time, wins); ties go to the lowest index.

The u_i come from Philox4x32-10, a counter-based generator: u_i = (2 (w >> 9) + 1) / 2^24 with w
word i % 4 of Philox(counter = (i // 4, 0, draw), key = seed), and E_i = -ln(u_i) in fp64 rounded
to fp32. The random state is a tensor rng = [seed, draw] (int64) on the logits' device that every
draw advances by one, in device memory: a CUDA graph that replays a draw draws afresh.

On a GPU the fused decoder is built for (sm_90, sm_12x), a sampled choice is one kernel
(neoxfuse.ops.fused_decoder.sample_token: the softmax, the filters by radix select and the race);
elsewhere it is PyTorch ops (probabilities, then exponential_race). The same probabilities and seed
give the same race winner on every device, so the same logits and seed give the same token on
every device and either way, except where the devices' roundings of exp and of the filters' masses
decide a near tie. The same seed and device give the same tokens every run.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from neoxfuse import _lib
from neoxfuse.checks import check_draw, check_sampling, check_seed, is_integer
from neoxfuse.errors import InvalidInputError, LibraryNotFoundError
from neoxfuse.ops import fused_decoder


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The defaults are greedy decoding.

    temperature: 0 for greedy, else > 0 (logits are divided by it before the softmax).
    top_k: keep the k most likely tokens; 0 keeps all.
    top_p: keep the smallest most-likely set with mass >= top_p, in (0, 1]; 1 keeps all.
    seed: keys the Philox stream tokens are drawn from, in 0 .. 2^63 - 1; None draws a random seed.
    repetition_penalty: > 0; 1 is none, > 1 makes the tokens already in the sequence less likely
        (greedy or sampled; see the module docstring).
    suppress_tokens: token ids never chosen (any collection of them; kept as a frozenset).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    suppress_tokens: frozenset[int] = frozenset()

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        ids = self.suppress_tokens
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable) or not all(is_integer(t) and t >= 0 for t in ids):
            raise InvalidInputError(f"suppress_tokens must be a collection of token ids (integers >= 0), got {ids!r}")
        object.__setattr__(self, "suppress_tokens", frozenset(int(t) for t in ids))
        if self.seed is not None:
            check_seed(self.seed)
        for name, kind in [("temperature", float), ("top_k", int), ("top_p", float), ("seed", int),
                           ("repetition_penalty", float)]:  # NumPy's -> Python's
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seeded(self) -> SamplingParams:
        """These parameters with a concrete seed: their own, else a fresh random one (greedy: as they are)."""
        if self.greedy or self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))

    @property
    def penalized(self) -> bool:
        """Whether a repetition penalty applies (one other than 1)."""
        return self.repetition_penalty != 1

    def seen(self, tokens: Sequence[int], vocab: int, device: torch.device | str) -> torch.Tensor | None:
        """The tokens a repetition penalty applies to at first, `tokens` (the prompt's), as a bool
        mask [vocab] on `device` that choose() adds each chosen token to; None without a penalty."""
        if not self.penalized:
            return None
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(list(tokens), dtype=torch.long, device=device)] = True
        return seen

    def suppressed(self, vocab: int, device: torch.device | str) -> torch.Tensor | None:
        """suppress_tokens as a bool mask [vocab] on `device`, None when there are none; InvalidInputError
        for an id past the vocabulary or for suppressing all of it."""
        if not self.suppress_tokens:
            return None
        if max(self.suppress_tokens) >= vocab or len(self.suppress_tokens) == vocab:
            raise InvalidInputError(f"suppress_tokens must leave tokens to choose from, ids in [0, {vocab}); got "
                                    f"{len(self.suppress_tokens)} ids up to {max(self.suppress_tokens)}")
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[sorted(self.suppress_tokens)] = True
        return mask.to(device)

    def rng(self, device: torch.device | str) -> torch.Tensor | None:
        """The random state tokens are drawn with on `device`: [seed, 0] (int64 [2]; a random seed
        when none is set, see seeded()); None for greedy decoding, which draws nothing."""
        if self.greedy:
            return None
        return torch.tensor([self.seeded().seed, 0], dtype=torch.long, device=device)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The logits with the repetition penalty applied (module docstring): fp32 [vocab], a new tensor.

    logits: [vocab] (any float dtype); seen: bool [vocab], same device.
    """
    z = logits.float()
    return torch.where(seen, torch.where(z > 0, z / penalty, z * penalty), z)


def constrained(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                suppressed: torch.Tensor | None) -> torch.Tensor:
    """The logits a token is chosen from (module docstring): with the repetition penalty applied
    where one applies, and -inf at the suppressed tokens where there are any (else the logits as given).

    logits: [vocab]; seen, suppressed: bool [vocab] (params.seen, params.suppressed), same device.
    """
    if params.penalized:
        logits = penalize(logits, seen, params.repetition_penalty)
    if params.suppress_tokens:
        logits = logits.masked_fill(suppressed, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(z / T), top-k and top-p filtered, renormalised.

    logits: [vocab] (any float dtype). Returns fp32 probabilities [vocab], zero outside the kept set.
    """
    if params.greedy:
        raise InvalidInputError("greedy decoding (temperature 0) has no distribution to draw from; use argmax")
    if logits.dim() != 1:
        raise InvalidInputError(f"logits must have shape [vocab], got {list(logits.shape)}")
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [vocab]
    if params.top_k and params.top_k < probs.numel():
        kth_largest = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth_largest, probs, torch.zeros_like(probs))
    if params.top_p < 1:
        sorted_probs = torch.sort(probs, descending=True).values  # [vocab]
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # [vocab]
        kept = (mass_before < params.top_p * sorted_probs.sum()).sum(dim=0, keepdim=True)  # [1], >= 1
        least_kept = sorted_probs.gather(0, kept - 1)  # [1]; tokens tied with it are kept too
        probs = torch.where(probs >= least_kept, probs, torch.zeros_like(probs))
    return probs / probs.sum()


_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of a * b for a constant a < 2^32 and b (int64, in [0, 2^32)),
    without int64 overflow: a * b = 2^16 q + (a * b_low mod 2^16), q = a * b_high + (a * b_low >> 16) < 2^49."""
    low_product = a * (b & 0xFFFF)  # < 2^48
    q = a * (b >> 16) + (low_product >> 16)
    return q >> 16, ((q & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32_10(counter: list, key: list) -> list[torch.Tensor]:
    """Philox4x32-10 (kernels/common/philox.cuh) on int64 tensors holding 32-bit words.

    counter: 4 words, key: 2 words (tensors or ints that broadcast together). Returns the 4 output words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0 = (k0 + _PHILOX_KEY_INCREMENTS[0]) & _LOW32
            k1 = (k1 + _PHILOX_KEY_INCREMENTS[1]) & _LOW32
        hi0, lo0 = _mul_hi_lo(_PHILOX_MULTIPLIERS[0], c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def exponential_race(weights: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    """The exponential race (module docstring) in PyTorch ops: argmax_i w_i / E_i as a [1] long
    tensor; rng[1] += 1. No host synchronisation, so a CUDA graph can capture it.

    weights: [vocab] fp32 (>= 0; a weight <= 0 or NaN never wins); rng: [2] int64, same device.
    """
    check_draw(weights, rng)
    vocab = weights.numel()
    groups = torch.arange((vocab + 3) // 4, dtype=torch.long, device=weights.device)  # [groups]
    seed, draw = rng[0], rng[1]
    words = philox4x32_10([groups, 0, draw & _LOW32, draw >> 32], [seed & _LOW32, seed >> 32])
    word = torch.stack(words, dim=1).reshape(-1)[:vocab]  # [vocab]: word i % 4 of group i // 4
    u = ((word >> 9) * 2 + 1).double() * 2.0**-24  # [vocab] in (0, 1), exact
    exponential = (-torch.log(u)).float()  # [vocab] Exp(1)
    keys = torch.where(weights > 0, weights / exponential, torch.zeros_like(weights))  # [vocab]
    rng[1:].add_(1)
    return torch.argmax(keys).reshape(1)  # the first of equal maxima


def sample_kernel_runs(device: torch.device, vocab: int) -> bool:
    """Whether the sampling kernel draws from logits of `vocab` entries on `device`: a CUDA device
    with thread-block clusters, the library built with the kernel and with code for the device, and
    a vocabulary it holds."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < fused_decoder.MIN_CAPABILITY:
        return False
    if not 1 <= vocab <= fused_decoder.MAX_SAMPLE_VOCAB:
        return False
    try:
        built = hasattr(_lib.library(), "neoxfuse_fused_sample_token")
    except LibraryNotFoundError:
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return built and _lib.missing_code(index) is None


def check_rng(params: SamplingParams, rng: torch.Tensor | None, seen: torch.Tensor | None = None) -> None:
    """InvalidInputError when sampled decoding is asked for without its random state, or a
    repetition penalty without the tokens it applies to."""
    if not params.greedy and rng is None:
        raise InvalidInputError("sampled decoding needs the random state from params.rng(device)")
    if params.penalized and seen is None:
        raise InvalidInputError("a repetition penalty needs the tokens seen so far, from params.seen(prompt, vocab, device)")


def choose(logits: torch.Tensor, params: SamplingParams, rng: torch.Tensor | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id as a [1] long tensor on the logits' device, without waiting for the device:
    argmax(logits) when greedy, else the exponential race over probabilities(logits, params)
    (module docstring: one kernel on an sm_90 or sm_12x GPU, PyTorch ops elsewhere), of the
    constrained() logits: with a repetition penalty the token is added to seen.

    logits: [vocab]; rng: from `params.rng(logits.device)` (advanced by one when sampled); seen:
    from `params.seen(prompt, vocab, logits.device)` where a penalty applies.
    """
    check_rng(params, rng, seen)
    logits = constrained(logits, params, seen, params.suppressed(logits.shape[-1], logits.device))
    if params.greedy:
        token = torch.argmax(logits).reshape(1)
    elif logits.dim() == 1 and sample_kernel_runs(logits.device, logits.numel()):
        token = fused_decoder.sample_token(logits.float().contiguous(), rng, params.temperature, params.top_k, params.top_p)
    else:
        token = exponential_race(probabilities(logits, params), rng)
    if params.penalized:
        seen.index_fill_(0, token, True)
    return token


def next_token(logits: torch.Tensor, params: SamplingParams, rng: torch.Tensor | None = None,
               seen: torch.Tensor | None = None) -> int:
    """choose(logits, params, rng, seen) as a Python int (waits for the device)."""
    return int(choose(logits, params, rng, seen))
