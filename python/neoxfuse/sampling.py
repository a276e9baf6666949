"""Choosing the next token from a step's logits: greedy, or sampled with temperature, top-k, top-p,
min-p, typical, epsilon and eta filters.

Given logits z [vocab] (computed in fp32 whatever the model's dtype):

- with sequence_bias (transformers' SequenceBiasLogitsProcessor; OpenAI's logit_bias is one-token
  sequences), first z_{b_m} += bias for each biased sequence b_1 .. b_m whose b_1 .. b_{m-1} the
  sequence so far s ends with (always, for m = 1), the biases of sequences ending in one token added up.
- with a repetition penalty r != 1 (as transformers' RepetitionPenaltyLogitsProcessor), first every
  token already in the sequence s (the prompt and the tokens generated so far) is made less likely
  for r > 1:  z_i <- z_i / r where z_i > 0, z_i * r where z_i < 0, for each i in s.
- with a presence penalty a or a frequency penalty f (OpenAI's presence_penalty and
  frequency_penalty, which count the tokens chosen, as vLLM does: not the prompt's), then
  z_i <- z_i - f c_i - a [c_i > 0], c_i the number of times token i was chosen so far. The counts
  live in device memory as `counts`, int32 [vocab], that each choice adds its token to.
- banned tokens get z_i = -inf, never chosen:
  - suppressed tokens (suppress_tokens, as transformers' option of that name; the engine's
    min_new_tokens suppresses the stop tokens for the first new tokens);
  - with no_repeat_ngram_size n (transformers' NoRepeatNGramLogitsProcessor), every token that
    would repeat an n-gram of s: s_{j+n-1} for each j with s_j .. s_{j+n-2} equal to the last n-1
    tokens of s (none while s is shorter than n);
  - for each of the bad_sequences b_1 .. b_m (transformers' bad_words_ids, a NoBadWordsLogitsProcessor),
    b_m when s ends with b_1 .. b_{m-1} (always, for m = 1).
  The sequence s lives in device memory as `history`: a long tensor [capacity] holding s and then
  -1s, that each choice appends its token to, so a CUDA graph can replay a choice.
- greedy (temperature 0): next = argmax_i z_i.
- sampled: p_i = softmax(z / T)_i, filtered in the order of transformers' warpers, each filter
  reading the distribution the ones before it leave (renormalised; H = -sum_i p_i ln p_i its entropy):
  - top-k keeps the k tokens of largest p (k = 0: all; tokens tied with the k-th are kept too),
  - top-p (nucleus) keeps the smallest set of most likely tokens whose mass reaches top_p of
    what top-k kept: token i stays while the mass of the kept tokens more likely than it is
    < top_p x their total (so the most likely token always stays, and so do all tokens tied with
    the least likely one kept; top_p = 1: all),
  - min-p (min_p > 0, MinPLogitsWarper) keeps the tokens at least min_p times as likely as the
    most likely one: (z_i - max_j z_j) / T >= ln(min_p),
  - typical (typical_p < 1, TypicalLogitsWarper) keeps the tokens whose surprise -ln p_i is
    closest to H: the fewest, in order of |-ln p_i - H|, whose mass reaches typical_p (at least
    the closest one; tokens tied with the farthest one kept stay too),
  - epsilon (epsilon_cutoff e > 0, EpsilonLogitsWarper) keeps p_i >= e, and eta (eta_cutoff e > 0,
    EtaLogitsWarper) keeps p_i >= min(e, sqrt(e) exp(-H)); both keep the most likely token anyway,
  - the kept p are renormalised to sum 1, and one token is drawn by an exponential race:

        next = argmax_i p_i / E_i,   E_i = -ln(u_i),   u_i uniform in (0, 1), independent

    The E_i are independent Exp(1) draws, so P(next = i) = p_i (the token with the smallest
    E_i / p_i, an Exp(p_i) arrival time, wins); ties go to the lowest index.

The draw applies top-k and top-p itself. The filters after them are -inf logits before it
(constrained()): min-p there keeps what it would keep after top-k (both keep the most likely
tokens, by a cut the other leaves alone), and where a later filter reads what top-p leaves
(typical, epsilon, eta, or min-p with top-p), constrained() applies top-k and top-p first and the
draw none (SamplingParams.draw).

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
import math
import numbers
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from neoxfuse import _lib
from neoxfuse.checks import check_draw, check_sampling, check_seed, is_integer
from neoxfuse.errors import InvalidInputError, LibraryNotFoundError
from neoxfuse.ops import fused_decoder

LATER_FILTERS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")  # transformers' warpers after top-p, in its order
SAMPLED_ONLY = ("top_k", "top_p", *LATER_FILTERS)  # the filters, which a greedy choice ignores


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
    min_p: in [0, 1]; > 0 samples only tokens at least min_p times as likely as the most likely one
        (0 is off).
    no_repeat_ngram_size: n > 0 never lets an n-gram of the sequence occur twice; 0 is off.
    bad_sequences: token sequences never completed (each a non-empty sequence of ids; kept as a
        frozenset of tuples): the last token of one is never chosen right after the others.
    typical_p: in (0, 1]; < 1 samples only the most typical tokens, of mass typical_p (1 is off).
    epsilon_cutoff, eta_cutoff: in [0, 1); > 0 samples only tokens at least that likely (eta: less
        when the distribution is spread out; see the module docstring); 0 is off.
    sequence_bias: {token id sequence: bias} (or (sequence, bias) pairs; kept as a frozenset of
        them): the bias, a finite number, is added to the logit of a sequence's last token where the
        sequence so far ends with the others (greedy or sampled; see the module docstring).
    presence_penalty, frequency_penalty: finite; 0 is none, > 0 makes the tokens chosen so far less
        likely, by presence_penalty once and frequency_penalty per time chosen (greedy or sampled).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    suppress_tokens: frozenset[int] = frozenset()
    min_p: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_sequences: frozenset[tuple[int, ...]] = frozenset()
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    sequence_bias: frozenset[tuple[tuple[int, ...], float]] = frozenset()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.min_p, self.typical_p,
                       self.epsilon_cutoff, self.eta_cutoff, self.presence_penalty, self.frequency_penalty)
        object.__setattr__(self, "suppress_tokens", token_id_set(self.suppress_tokens, "suppress_tokens"))
        if not is_integer(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise InvalidInputError(f"no_repeat_ngram_size must be an integer >= 0 (0 is off), got {self.no_repeat_ngram_size!r}")
        sequences = self.bad_sequences
        if not _is_collection(sequences) or not all(_is_collection(b) and len(b) and all(is_integer(t) and t >= 0 for t in b)
                                                    for b in sequences):
            raise InvalidInputError(f"bad_sequences must be a collection of non-empty token id sequences, got {sequences!r}")
        object.__setattr__(self, "bad_sequences", frozenset(tuple(int(t) for t in b) for b in sequences))
        object.__setattr__(self, "sequence_bias", _sequence_bias(self.sequence_bias))
        if self.seed is not None:
            check_seed(self.seed)
        for name, kind in [("temperature", float), ("top_k", int), ("top_p", float), ("seed", int),
                           ("repetition_penalty", float), ("min_p", float), ("no_repeat_ngram_size", int),
                           ("typical_p", float), ("epsilon_cutoff", float), ("eta_cutoff", float),
                           ("presence_penalty", float), ("frequency_penalty", float)]:  # NumPy's -> Python's
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

    def filters_on(self, names: tuple[str, ...] = SAMPLED_ONLY) -> dict[str, float]:
        """{name: value} of the filters among `names` that are not at their default (off)."""
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(SamplingParams, name)}

    @property
    def truncates_before_draw(self) -> bool:
        """Whether constrained() applies top-k and top-p, for a filter after them that reads what they
        leave (a sampled rule with typical_p, epsilon_cutoff, eta_cutoff, or min_p with top_p < 1)."""
        later = self.typical_p < 1 or self.epsilon_cutoff > 0 or self.eta_cutoff > 0 or (self.min_p > 0 and self.top_p < 1)
        return not self.greedy and later

    @property
    def draw(self) -> SamplingParams:
        """The rule the draw applies to constrained() logits: this one, without top-k and top-p where
        constrained() has applied them (truncates_before_draw)."""
        return dataclasses.replace(self, top_k=0, top_p=1.0) if self.truncates_before_draw else self

    @property
    def penalized(self) -> bool:
        """Whether a repetition penalty applies (one other than 1)."""
        return self.repetition_penalty != 1

    @property
    def counts_chosen(self) -> bool:
        """Whether choosing a token reads how often each token was chosen so far: with a presence or
        a frequency penalty."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def needs_history(self) -> bool:
        """Whether choosing a token reads the sequence so far: with a repetition penalty, an n-gram
        ban, bad sequences or a bias of a sequence longer than one token."""
        return (self.penalized or self.no_repeat_ngram_size > 0 or bool(self.bad_sequences)
                or any(len(sequence) > 1 for sequence, _ in self.sequence_bias))

    def history(self, tokens: Sequence[int], capacity: int, device: torch.device | str) -> torch.Tensor | None:
        """The sequence so far, `tokens` (the prompt's), as choose() reads and extends it: long
        [capacity] on `device`, the tokens then -1s (capacity: room for the whole sequence, the
        tokens to be chosen too); None when no rule reads it (see needs_history)."""
        if not self.needs_history:
            return None
        tokens = list(tokens)
        if not is_integer(capacity) or not len(tokens) < capacity:
            raise InvalidInputError(f"a history needs room for the {len(tokens)} tokens so far and the next; capacity {capacity!r}")
        history = torch.full((capacity,), -1, dtype=torch.long)
        history[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return history.to(device)

    def counts(self, chosen: Iterable[int], vocab: int, device: torch.device | str) -> torch.Tensor | None:
        """How often each token occurs in `chosen` (the tokens chosen so far), as choose() reads and
        extends it: int32 [vocab] on `device`; None when the rule does not read it (counts_chosen)."""
        if not self.counts_chosen:
            return None
        return torch.bincount(torch.tensor(list(chosen), dtype=torch.long), minlength=vocab).to(torch.int32).to(device)

    def check_vocab(self, vocab: int) -> None:
        """InvalidInputError for a suppressed, bad-sequence or biased id past the vocabulary, or for
        suppressing all of it."""
        sequences = [*self.bad_sequences, *(sequence for sequence, _ in self.sequence_bias)]
        ids = self.suppress_tokens | {t for sequence in sequences for t in sequence}
        if ids and max(ids) >= vocab:
            raise InvalidInputError(f"suppress_tokens, bad_sequences and sequence_bias are token ids in [0, {vocab}); got {max(ids)}")
        if len(self.suppress_tokens) == vocab:
            raise InvalidInputError(f"suppress_tokens must leave tokens to choose from; it holds all {vocab}")

    def constraints(self, vocab: int, device: torch.device | str) -> Constraints:
        """What the rule's bans need on `device` (built once per rule, outside any CUDA graph);
        the ids checked against `vocab` (check_vocab)."""
        self.check_vocab(vocab)
        suppressed = None
        if self.suppress_tokens:
            suppressed = torch.zeros(vocab, dtype=torch.bool)
            suppressed[sorted(self.suppress_tokens)] = True
            suppressed = suppressed.to(device)
        biased = sorted(self.sequence_bias)
        targets = sorted({sequence[-1] for sequence, _ in biased})
        bias_sums = bias_targets = None
        if biased:  # [targets, sequences]: row u holds the biases of the sequences that end in targets[u]
            bias_sums = torch.tensor([[bias if sequence[-1] == target else 0.0 for sequence, bias in biased] for target in targets])
            bias_sums, bias_targets = bias_sums.to(device), torch.tensor(targets, dtype=torch.long).to(device)
        return Constraints(suppressed, _right_aligned(sorted(self.bad_sequences), device),
                           _right_aligned([sequence for sequence, _ in biased], device), bias_sums, bias_targets)

    def rng(self, device: torch.device | str) -> torch.Tensor | None:
        """The random state tokens are drawn with on `device`: [seed, 0] (int64 [2]; a random seed
        when none is set, see seeded()); None for greedy decoding, which draws nothing."""
        if self.greedy:
            return None
        return torch.tensor([self.seeded().seed, 0], dtype=torch.long, device=device)


class Constraints(NamedTuple):
    """A rule's bans and biases as device tensors (SamplingParams.constraints)."""

    suppressed: torch.Tensor | None  # bool [vocab]: suppress_tokens
    bad_sequences: torch.Tensor | None  # long [sequences, longest]: each right-aligned, -1 before it
    biased_sequences: torch.Tensor | None = None  # long [sequences, longest]: sequence_bias's sequences, so
    bias_sums: torch.Tensor | None = None  # fp32 [targets, sequences]: each sequence's bias in the row of its last token
    bias_targets: torch.Tensor | None = None  # long [targets]: those last tokens, each once


def _right_aligned(sequences: list[tuple[int, ...]], device: torch.device | str) -> torch.Tensor | None:
    """long [sequences, longest] on `device`: each sequence right-aligned, -1 before it; None for none."""
    if not sequences:
        return None
    longest = max(len(sequence) for sequence in sequences)
    return torch.tensor([[-1] * (longest - len(sequence)) + list(sequence) for sequence in sequences], dtype=torch.long).to(device)


def _sequence_bias(given: object) -> frozenset[tuple[tuple[int, ...], float]]:
    """sequence_bias ({sequence: bias} or (sequence, bias) pairs) as a frozenset of (tuple, float), checked."""
    pairs = given.items() if isinstance(given, Mapping) else given
    if not _is_collection(pairs) or not all(_is_collection(pair) and len(pair) == 2 for pair in pairs):
        raise InvalidInputError(f"sequence_bias must map token id sequences to biases, got {given!r}")
    table = {}
    for sequence, bias in pairs:
        if not _is_collection(sequence) or not len(sequence) or not all(is_integer(t) and t >= 0 for t in sequence):
            raise InvalidInputError(f"sequence_bias's keys must be non-empty token id sequences, got {sequence!r}")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not math.isfinite(bias):
            raise InvalidInputError(f"sequence_bias's biases must be finite numbers, got {bias!r} for {tuple(sequence)}")
        table[tuple(int(t) for t in sequence)] = float(bias)
    return frozenset(table.items())


def token_id_set(ids: Iterable[int], name: str) -> frozenset[int]:
    """A collection of token ids as a frozenset, checked (InvalidInputError naming it `name`)."""
    if not _is_collection(ids) or not all(is_integer(t) and t >= 0 for t in ids):
        raise InvalidInputError(f"{name} must be a collection of token ids (integers >= 0), got {ids!r}")
    return frozenset(int(t) for t in ids)


def _is_collection(value: object) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, torch.Tensor))


def history_length(history: torch.Tensor) -> torch.Tensor:
    """The number of tokens in `history` (the entries >= 0 before its -1s), a 0-d long tensor on its device."""
    return (history >= 0).sum()


def append(history: torch.Tensor, token: torch.Tensor) -> None:
    """Puts token [1] after the last token of history [capacity] (a full history: over its last),
    on the device, without waiting for it."""
    length = history_length(history).clamp(max=history.numel() - 1).reshape(1)
    history.index_put_((length,), token)


def count(counts: torch.Tensor, token: torch.Tensor) -> None:
    """Adds one to the count of token [1] in counts [vocab] (int32: exact and deterministic), on the
    device, without waiting for it."""
    counts.index_add_(0, token, torch.ones_like(token, dtype=torch.int32))


def tokens_in(history: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [vocab]: which tokens occur in history."""
    counts = torch.zeros(vocab, dtype=torch.int32, device=history.device)
    return counts.index_add_(0, history.clamp(min=0), (history >= 0).to(torch.int32)) > 0


def repeated_ngram_ends(history: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """bool [vocab]: the tokens that would make the history's last n-1 tokens and it an n-gram the
    history holds already (module docstring), without waiting for the device.

    history: long [capacity]; n >= 1.
    """
    banned = torch.zeros(vocab, dtype=torch.int32, device=history.device)
    if history.numel() < n:
        return banned > 0
    length = history_length(history)
    windows = history.unfold(0, n, 1)  # [capacity - n + 1, n]: window j = history[j : j + n]
    tail = history[(length - (n - 1) + torch.arange(n - 1, device=history.device)).clamp(min=0)]  # [n - 1]
    complete = torch.arange(windows.shape[0], device=history.device) + n <= length  # [capacity - n + 1]
    matches = (windows[:, :-1] == tail).all(dim=1) & complete
    return banned.index_add_(0, windows[:, -1].clamp(min=0), matches.to(torch.int32)) > 0


def _completable(history: torch.Tensor | None, sequences: torch.Tensor) -> torch.Tensor:
    """bool [sequences]: whether the history ends with all but the last token of each sequence
    (always for a one-token sequence, whatever the history, which may then be None).

    history: long [capacity]; sequences: long [sequences, longest], each right-aligned, -1 before it.
    """
    before = sequences.shape[1] - 1  # the longest prefix
    if before == 0:
        return torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
    length = history_length(history)
    index = length - before + torch.arange(before, device=history.device)  # [before]: the history's last tokens
    tail = torch.where(index >= 0, history[index.clamp(min=0)], -2)  # -2 before the first token: matches no id
    return ((sequences[:, :-1] == tail) | (sequences[:, :-1] < 0)).all(dim=1)


def bad_sequence_ends(history: torch.Tensor, bad_sequences: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [vocab]: the last tokens of the bad sequences the history ends with all but the last
    token of (module docstring), without waiting for the device.

    history: long [capacity]; bad_sequences: long [sequences, longest], each right-aligned, -1 before it.
    """
    banned = torch.zeros(vocab, dtype=torch.int32, device=bad_sequences.device)
    return banned.index_add_(0, bad_sequences[:, -1], _completable(history, bad_sequences).to(torch.int32)) > 0


def sequence_biases(history: torch.Tensor | None, constraints: Constraints, vocab: int) -> torch.Tensor:
    """fp32 [vocab]: the bias added to each token's logit (module docstring): the sum of the biases
    of the sequences it completes, without waiting for the device. Deterministic: the sums are
    reductions over each token's row (not a matmul, which TF32 could round), each token written once
    (no float atomics).

    history: as _completable takes it; constraints: with the rule's biased sequences.
    """
    completed = _completable(history, constraints.biased_sequences).float()  # [sequences]: 1 or 0
    added = (constraints.bias_sums * completed).sum(dim=1)  # [targets]
    return torch.zeros(vocab, device=added.device).index_put_((constraints.bias_targets,), added)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The logits with the repetition penalty applied (module docstring): fp32 [vocab], a new tensor.

    logits: [vocab] (any float dtype); seen: bool [vocab], same device.
    """
    z = logits.float()
    return torch.where(seen, torch.where(z > 0, z / penalty, z * penalty), z)


def constrained(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None,
                constraints: Constraints, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The logits a token is chosen from (module docstring): with the sequence biases and the
    repetition, presence and frequency penalties applied where they apply, and -inf at the banned
    tokens where there are any and, for a sampled rule, at the tokens its filters before the draw
    drop (truncated(); else the logits as given).
    No host synchronisation, so a CUDA graph can capture it.

    logits: [vocab]; history: long [capacity] (params.history) where params.needs_history;
    constraints: params.constraints(vocab, device); counts: int32 [vocab] (params.counts) where
    params.counts_chosen; all on one device.
    """
    vocab = logits.shape[-1]
    if params.sequence_bias:
        logits = logits.float() + sequence_biases(history, constraints, vocab)
    if params.penalized:
        logits = penalize(logits, tokens_in(history, vocab), params.repetition_penalty)
    if params.counts_chosen:
        logits = logits.float() - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    banned = [mask for mask in (
        constraints.suppressed,
        repeated_ngram_ends(history, params.no_repeat_ngram_size, vocab) if params.no_repeat_ngram_size else None,
        bad_sequence_ends(history, constraints.bad_sequences, vocab) if params.bad_sequences else None,
    ) if mask is not None]
    for mask in banned:
        logits = logits.masked_fill(mask, float("-inf"))
    return logits if params.greedy else truncated(logits, params)


def truncated(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """fp32 logits [vocab], -inf at the tokens a sampled rule's filters before the draw drop (module
    docstring): top-k and top-p where params.truncates_before_draw, then min-p, typical, epsilon and
    eta, each reading what the ones before leave. No host synchronisation.

    logits: [vocab], any float dtype.
    """
    z = logits.float()
    temperature = params.temperature
    if params.truncates_before_draw:
        z = _top_k_top_p_masked(z, params)
    if params.min_p:
        z = z.masked_fill((z - z.max()) / temperature < math.log(params.min_p), float("-inf"))
    if params.typical_p < 1:
        z = z.masked_fill(_atypical(z / temperature, params.typical_p), float("-inf"))
    for cutoff, adaptive in [(params.epsilon_cutoff, False), (params.eta_cutoff, True)]:
        if cutoff:
            z = z.masked_fill(_below_cutoff(z / temperature, cutoff, adaptive), float("-inf"))
    return z


def processed_scores(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None,
                     constraints: Constraints, counts: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' scores of a step (model.generate's output_scores): fp32 [vocab], the logits
    after its logits processors and warpers as this rule applies them, that is constrained() (the
    penalty, the bans and the filters before the draw) and, for a sampled rule, top-k and top-p where
    the draw applies them, over the temperature:

        greedy:   constrained(z)
        sampled:  constrained(z) / T, -inf outside what top-k and top-p keep of softmax(constrained(z) / T)

    logits: [vocab]; history, constraints, counts: as constrained() takes them.
    """
    z = constrained(logits, params, history, constraints, counts).float()
    if params.greedy:
        return z
    if not params.truncates_before_draw:
        z = _top_k_top_p_masked(z, params)
    return z / params.temperature


def _top_k_top_p_masked(z: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """fp32 logits z [vocab], -inf at the tokens top-k and top-p drop from softmax(z / T)."""
    kept = top_k_top_p_kept(torch.softmax(z / params.temperature, dim=-1), params.top_k, params.top_p)
    return z.masked_fill(~kept, float("-inf"))


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    """H = -sum_i p_i ln p_i (0-d) of log-probabilities [vocab] (-inf: p_i = 0, no term)."""
    return -(log_p * log_p.exp()).nansum()


def _atypical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """bool [vocab]: the tokens the typical filter drops from softmax(scores) [vocab] (module docstring)."""
    log_p = torch.log_softmax(scores, dim=-1)
    distance, order = torch.sort((-log_p - _entropy(log_p)).abs())  # [vocab] each, closest to H first
    reached = (torch.softmax(scores[order], dim=-1).cumsum(dim=-1) < mass).sum(dim=-1, keepdim=True)  # [1]
    dropped = distance > distance.gather(0, reached.clamp(max=scores.numel() - 1))  # [vocab], in distance order
    return torch.zeros_like(dropped).scatter_(0, order, dropped)


def _below_cutoff(scores: torch.Tensor, cutoff: float, adaptive: bool) -> torch.Tensor:
    """bool [vocab]: the tokens of softmax(scores) [vocab] less likely than the cutoff (adaptive, eta's:
    min(cutoff, sqrt(cutoff) exp(-H))), but not the most likely ones."""
    log_p = torch.log_softmax(scores, dim=-1)
    bound = (math.sqrt(cutoff) * torch.exp(-_entropy(log_p))).clamp(max=cutoff) if adaptive else cutoff
    return (log_p.exp() < bound) & (scores < scores.max())


def top_k_top_p_kept(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """bool [vocab]: the tokens top-k, then top-p, keep of probs [vocab] (fp32, module docstring)."""
    kept = torch.ones_like(probs, dtype=torch.bool)
    if top_k and top_k < probs.numel():
        kept = probs >= torch.topk(probs, top_k).values[-1]
        probs = torch.where(kept, probs, torch.zeros_like(probs))
    if top_p < 1:
        sorted_probs = torch.sort(probs, descending=True).values  # [vocab]
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs  # [vocab]
        count = (mass_before < top_p * sorted_probs.sum()).sum(dim=0, keepdim=True)  # [1], >= 1
        kept = kept & (probs >= sorted_probs.gather(0, count - 1))  # tokens tied with the least likely kept stay too
    return kept


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(z / T), top-k and top-p filtered, renormalised.

    logits: [vocab] (any float dtype). Returns fp32 probabilities [vocab], zero outside the kept set.
    """
    if params.greedy:
        raise InvalidInputError("greedy decoding (temperature 0) has no distribution to draw from; use argmax")
    if logits.dim() != 1:
        raise InvalidInputError(f"logits must have shape [vocab], got {list(logits.shape)}")
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [vocab]
    probs = torch.where(top_k_top_p_kept(probs, params.top_k, params.top_p), probs, torch.zeros_like(probs))
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


def check_rng(params: SamplingParams, rng: torch.Tensor | None, history: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> None:
    """InvalidInputError when sampled decoding is asked for without its random state, a rule that
    reads the sequence so far without it, or one that reads the counts of the tokens chosen without
    them."""
    if not params.greedy and rng is None:
        raise InvalidInputError("sampled decoding needs the random state from params.rng(device)")
    if params.needs_history and history is None:
        raise InvalidInputError("a repetition penalty, an n-gram ban or bad sequences need the sequence so far, from "
                                "params.history(prompt, capacity, device)")
    if params.counts_chosen and (counts is None or counts.dtype != torch.int32 or counts.dim() != 1):
        raise InvalidInputError("a presence or frequency penalty needs the counts of the tokens chosen so far (int32 "
                                "[vocab]), from params.counts(chosen, vocab, device)")


def choose(logits: torch.Tensor, params: SamplingParams, rng: torch.Tensor | None = None,
           history: torch.Tensor | None = None, constraints: Constraints | None = None,
           counts: torch.Tensor | None = None) -> torch.Tensor:
    """The next token id as a [1] long tensor on the logits' device, without waiting for the device:
    argmax(logits) when greedy, else the exponential race over probabilities(logits, params.draw)
    (module docstring: one kernel on an sm_90 or sm_12x GPU, PyTorch ops elsewhere), of the
    constrained() logits; the token is appended to history and counted in counts where the rule
    reads them.

    logits: [vocab]; rng: from `params.rng(logits.device)` (advanced by one when sampled); history:
    from `params.history(prompt, capacity, logits.device)` where params.needs_history;
    constraints: params.constraints(vocab, logits.device) (built here when not given); counts: from
    `params.counts(chosen, vocab, logits.device)` where params.counts_chosen.
    """
    check_rng(params, rng, history, counts)
    if constraints is None:
        constraints = params.constraints(logits.shape[-1], logits.device)
    logits = constrained(logits, params, history, constraints, counts)
    draw = params.draw
    if params.greedy:
        token = torch.argmax(logits).reshape(1)
    elif logits.dim() == 1 and sample_kernel_runs(logits.device, logits.numel()):
        token = fused_decoder.sample_token(logits.float().contiguous(), rng, draw.temperature, draw.top_k, draw.top_p)
    else:
        token = exponential_race(probabilities(logits, draw), rng)
    if params.needs_history:
        append(history, token)
    if params.counts_chosen:
        count(counts, token)
    return token


def next_token(logits: torch.Tensor, params: SamplingParams, rng: torch.Tensor | None = None,
               history: torch.Tensor | None = None, constraints: Constraints | None = None,
               counts: torch.Tensor | None = None) -> int:
    """choose(logits, params, rng, history, constraints, counts) as a Python int (waits for the device)."""
    return int(choose(logits, params, rng, history, constraints, counts))
