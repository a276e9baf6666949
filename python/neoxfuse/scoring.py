r"""Teacher-forced scoring: how well a model predicts a given text, token by token, and its perplexity.

    scores = engine.score(text_or_ids)                                     # the backend's decode steps
    hf = hf_scores(hf_model, scores.tokens, scores.window, scores.stride)   # HF: one forward per window
    scores.perplexity, scores.difference(hf).relative_perplexity

A text of T tokens is cut into windows of up to W tokens that start every S tokens (the stride,
1 <= S <= W-1): [0, W), [S, S+W), [2S, 2S+W), ..., but the last one, which ends at the text's end
and starts W tokens before it, [T-W, T), so that it too has all the context a window holds (when the
text has fewer than W tokens: one window, [0, T)). Each window scores the tokens no earlier window
scored, each predicted from the tokens before it in its window, so every token but the first is
scored exactly once:

    nll_t = -log softmax(logits_{t-1})[x_t]       (natural log, from fp32 logits), t = 1 .. T-1
    mean NLL = sum_t nll_t / (T-1)                 perplexity = exp(mean NLL)

By default S = W-1: the windows overlap by one token, one model step per token, and a token has 1
to W-1 tokens of context. The model runs a window's first W-1 tokens (its last is only predicted),
so W can be one more than the model's positions; through the engine it is by default, each window
then predicting as many tokens as the model has positions. With a prefix token (below) these default
windows are exactly lm-evaluation-harness's rolling windows, the last one aligned to the end too.
A smaller stride gives every token after the first window at least W-S tokens of context, at the
price of running those again (HF's "perplexity of fixed-length models" recipe with its stride S, but
for the last window, which that recipe starts on the stride, with less context). Through the engine
each window runs from an empty KV cache and every scored prediction is a decode step, so on the
fused backend every scored logit comes from the decode kernels: the same text scored by HF (an
independent implementation, loading the checkpoint itself) says whether the kernels are right on
real text, not only on random tokens.

With a prefix token P (for GPT-NeoX, the end-of-text id) the tokens scored are [P, x_0, ..., x_{n-1}],
so every token of the text is scored, the first too, as lm-evaluation-harness's rolling
loglikelihood does. Then the text's total NLL can be put per word and per byte of the text
(Scores.text_measures: its wikitext measures, comparable across tokenizers):

    word_perplexity = exp(sum_t nll_t / words)      words = len(re.split(r"\s+", text))
    byte_perplexity = exp(sum_t nll_t / bytes)      bytes = len(text.encode("utf-8"))
    bits_per_byte   = sum_t nll_t / (bytes * ln 2)

A corpus (a dataset's documents, e.g. wikitext's pages) is scored one document at a time, each from
an empty context, and summed over documents as lm-evaluation-harness does (CorpusScores): its
perplexity and word and byte measures put the NLL of all documents over all their tokens, words and
bytes, so a long document weighs more than a short one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from neoxfuse.checks import check_token_ids, is_integer
from neoxfuse.device import synchronize
from neoxfuse.errors import InvalidInputError, SequenceTooLongError


class Span(NamedTuple):
    """One window: the model runs tokens [start, end - 1) and scores its predictions of tokens [scored, end)."""

    start: int
    scored: int  # > start: the token before it is context
    end: int


def resolve_stride(window: int, stride: int | None) -> int:
    """`stride`, or window - 1 (windows overlapping by one token) when None."""
    return window - 1 if stride is None else stride


def windows(n_tokens: int, window: int, stride: int | None = None) -> list[Span]:
    """The windows over `n_tokens` tokens: up to `window` tokens each, starting every `stride` tokens
    (window - 1 by default: overlapping by one token) but the last, which ends at the last token and
    holds `window` tokens where there are that many; each scores the tokens after the last one
    scored before it."""
    if not is_integer(window) or window < 2:
        raise InvalidInputError(f"a scoring window holds the tokens predicted and their context: at least 2; got {window!r}")
    stride = resolve_stride(window, stride)
    if not is_integer(stride) or not 1 <= stride <= window - 1:
        raise InvalidInputError(f"the stride between scoring windows must be an integer from 1 to the window's {window} "
                                f"tokens minus one (a window must start before the first token it scores); got {stride!r}")
    if n_tokens < 2:
        raise InvalidInputError(f"scoring needs at least 2 tokens (the first is only context); got {n_tokens}")
    spans = [Span(0, 1, min(window, n_tokens))]
    while spans[-1].end < n_tokens:
        start = min(spans[-1].start + stride, n_tokens - window)  # the second: the last window's, where it ends at the end
        spans.append(Span(start, spans[-1].end, min(start + window, n_tokens)))
    return spans


def with_prefix(tokens: list[int], prefix_token: int | None, vocab: int) -> list[int]:
    """[prefix_token] + tokens (checked ids), or just tokens when it is None; the prefix is checked
    to be an id in [0, vocab)."""
    if prefix_token is None:
        return tokens
    if not is_integer(prefix_token) or not 0 <= prefix_token < vocab:
        raise InvalidInputError(f"prefix_token must be a token id in [0, {vocab}), got {prefix_token!r}")
    return [int(prefix_token), *tokens]


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [n] fp32, top1 [n] long) of logits [n, vocab] for targets [n]: -log softmax(logits)[target],
    and the most likely token, where each target was predicted."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets[:, None])[:, 0], logits.argmax(dim=-1)


def top_logprobs(logits: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [n, top] fp32, ids [n, top] long): the `top` most likely tokens under logits [n, vocab],
    most likely first, and their log softmax(logits) (computed as token_scores computes a target's)."""
    return torch.log_softmax(logits.float(), dim=-1).topk(top, dim=-1)


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability where it was predicted, log softmax(logits)[token] (natural log, from
    the model's fp32 logits as they are, before a sampling rule's temperature, penalties or filters),
    and the most likely tokens there with theirs (OpenAI's and vLLM's logprobs of a token)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the most likely tokens, most likely first


def token_logprobs(tokens: Sequence[int], nll: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor) -> list[TokenLogprobs]:
    """One TokenLogprobs per token, from its nll [n] (token_scores) and the top_logprobs() [n, top] where
    it was predicted."""
    return [TokenLogprobs(token, -loss, tuple(zip(ids, values)))
            for token, loss, ids, values in zip(tokens, nll.tolist(), top_ids.tolist(), top_values.tolist())]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprobs]:
    """The TokenLogprobs of tokens [n] (long) under logits [n, vocab], each with its `top` most likely
    tokens (one log-softmax for both, as token_scores and top_logprobs compute it)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    values, ids = log_probs.topk(top, dim=-1)  # [n, top] each
    return token_logprobs(tokens.tolist(), -log_probs.gather(-1, tokens[:, None])[:, 0], values, ids)


@dataclass(frozen=True)
class ScoreDifference:
    """How far two scorings of the same tokens are apart."""

    relative_perplexity: float  # |perplexity - other's| / other's
    max_abs_nll: float  # max_t |nll_t - other's nll_t|
    mean_abs_nll: float
    top1_agreement: float  # the fraction of positions where both put the same token first


@dataclass(frozen=True)
class TextMeasures:
    """A scored text's NLL per word and per byte (see the module docstring for the formulas)."""

    words: int
    bytes: int
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float


@dataclass(frozen=True)
class Loglikelihood:
    """How likely a continuation is after a context (Engine.loglikelihood): lm-evaluation-harness's
    (logprob, is_greedy) of a request."""

    logprob: float  # sum of log p(token | the tokens before it) over the continuation's tokens (natural log)
    greedy: bool  # whether every continuation token is the most likely one where it is predicted
    context_tokens: int  # the context's tokens it was predicted after (fewer than given where they did not fit)


class _PerToken:
    """The measures per token scored of scores with `nll` [n] and `elapsed_ms`."""

    @property
    def mean_nll(self) -> float:
        """Nats per token."""
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return float(self.nll.mean().exp())

    @property
    def ms_per_token(self) -> float:
        """elapsed_ms over the tokens scored."""
        return self.elapsed_ms / len(self.nll)


@dataclass(frozen=True)
class Scores(_PerToken):
    """Teacher-forced scores of `tokens` in windows of up to `window` tokens, `stride` tokens apart
    (see the module docstring)."""

    tokens: list[int]  # the T tokens run: prefix_token (if set), then the text's
    window: int
    stride: int
    nll: torch.Tensor  # [T-1] fp64 on the CPU: nll[i] = -log p(tokens[i+1] | its window's tokens before it)
    top1: torch.Tensor  # [T-1] long on the CPU: the most likely token where tokens[i+1] was predicted
    elapsed_ms: float  # the time the scoring took (the device's work included)
    prefix_token: int | None = None  # when set, tokens[0]: put before the text so that its first token is scored too

    @property
    def windows(self) -> int:
        return len(windows(len(self.tokens), self.window, self.stride))

    def text_measures(self, text: str) -> TextMeasures:
        """Word and byte perplexity and bits per byte of `text`, whose tokens these scores are (after the
        prefix token, which they need: without one the text's first token is not scored)."""
        if self.prefix_token is None:
            raise InvalidInputError("per-word and per-byte measures need every token of the text scored, the first too: "
                                    "score it after a prefix token (prefix_token=, e.g. the tokenizer's end-of-text id)")
        return _text_measures(float(self.nll.sum()), [text])

    def difference(self, other: Scores) -> ScoreDifference:
        """How far these scores are from `other`'s, which must score the same tokens in the same windows."""
        if (other.tokens, other.window, other.stride) != (self.tokens, self.window, self.stride):
            raise InvalidInputError(f"scores compare over the same tokens and windows; got {len(self.tokens)} tokens in windows of "
                                    f"{self.window} every {self.stride} and {len(other.tokens)} tokens in windows of "
                                    f"{other.window} every {other.stride}")
        return _difference(self, other)


@dataclass(frozen=True)
class CorpusScores(_PerToken):
    """The scores of a corpus's documents, each scored on its own, and lm-evaluation-harness's sums
    over them. With nll_dt the NLL of token t of document d and n_d the tokens scored in d:

        perplexity      = exp(sum_dt nll_dt / sum_d n_d)
        word_perplexity = exp(sum_dt nll_dt / sum_d words_d)      (text_measures; byte perplexity and
                                                                   bits per byte likewise over bytes)
    """

    documents: tuple[Scores, ...]

    def __post_init__(self):
        if not self.documents or not all(isinstance(scores, Scores) for scores in self.documents):
            raise InvalidInputError(f"a corpus's scores are one Scores per document, at least one; got {self.documents!r:.80}")
        object.__setattr__(self, "documents", tuple(self.documents))

    @property
    def nll(self) -> torch.Tensor:
        """[sum_d n_d] fp64: the documents' nll, one after the other."""
        return torch.cat([scores.nll for scores in self.documents])

    @property
    def top1(self) -> torch.Tensor:
        """[sum_d n_d] long: the documents' top1, one after the other."""
        return torch.cat([scores.top1 for scores in self.documents])

    @property
    def elapsed_ms(self) -> float:
        """The time the documents' scorings took, together."""
        return sum(scores.elapsed_ms for scores in self.documents)

    @property
    def prefix_token(self) -> int | None:
        """The prefix token every document was scored after, else None."""
        prefixes = {scores.prefix_token for scores in self.documents}
        return prefixes.pop() if len(prefixes) == 1 else None

    def text_measures(self, texts: Sequence[str]) -> TextMeasures:
        """Word and byte perplexity and bits per byte of the corpus whose documents' texts, in order,
        are `texts`: the NLL of all documents over all their words and bytes. Every document must
        have been scored after a prefix token (see Scores.text_measures)."""
        if isinstance(texts, str) or len(texts) != len(self.documents):
            raise InvalidInputError(f"a corpus's measures take the texts of its {len(self.documents)} documents, in order; got "
                                    f"{'a str' if isinstance(texts, str) else f'{len(texts)} texts'}")
        if any(scores.prefix_token is None for scores in self.documents):
            raise InvalidInputError("per-word and per-byte measures need every token of every document scored, the first too: "
                                    "score each after a prefix token (prefix_token=, e.g. the tokenizer's end-of-text id)")
        return _text_measures(float(self.nll.sum()), texts)

    def difference(self, other: CorpusScores) -> ScoreDifference:
        """How far these scores are from `other`'s, which must score the same documents in the same
        windows: over all the tokens (relative_perplexity: of the corpus's perplexities)."""
        if len(other.documents) != len(self.documents):
            raise InvalidInputError(f"corpus scores compare over the same documents; got {len(self.documents)} and "
                                    f"{len(other.documents)} documents")
        for mine, theirs in zip(self.documents, other.documents):
            mine.difference(theirs)  # checks that they score the same tokens in the same windows
        return _difference(self, other)


def _text_measures(total_nll: float, texts: Sequence[str]) -> TextMeasures:
    """The measures of texts whose every token's NLL sums to total_nll (module docstring)."""
    if not all(isinstance(text, str) for text in texts):
        raise InvalidInputError(f"text measures take the texts that were scored, each a str; got "
                                f"{', '.join(type(text).__name__ for text in texts)}")
    words = sum(len(re.split(r"\s+", text)) for text in texts)
    size = sum(len(text.encode("utf-8")) for text in texts)
    return TextMeasures(words=words, bytes=size, word_perplexity=math.exp(total_nll / words),
                        byte_perplexity=math.exp(total_nll / size), bits_per_byte=total_nll / (size * math.log(2)))


def _difference(mine: Scores | CorpusScores, theirs: Scores | CorpusScores) -> ScoreDifference:
    """The difference of two scorings of the same tokens (checked by the caller)."""
    gap = (mine.nll - theirs.nll).abs()
    return ScoreDifference(relative_perplexity=abs(mine.perplexity - theirs.perplexity) / theirs.perplexity,
                           max_abs_nll=float(gap.max()), mean_abs_nll=float(gap.mean()),
                           top1_agreement=float((mine.top1 == theirs.top1).double().mean()))


@torch.inference_mode()
def hf_scores(model: torch.nn.Module, tokens: Sequence[int], window: int, stride: int | None = None,
              prefix_token: int | None = None) -> Scores:
    """The scores of `tokens` (after `prefix_token`, if given) by an HF causal LM (a GPTNeoXForCausalLM),
    one forward pass per window, on the model's device and in its dtype."""
    vocab = model.config.vocab_size
    tokens = with_prefix(check_token_ids(list(tokens), vocab), prefix_token, vocab)
    spans = windows(len(tokens), window, stride)
    if window - 1 > (positions := model.config.max_position_embeddings):
        raise SequenceTooLongError(f"a scoring window of {window} tokens runs the model on {window - 1} positions (its last token "
                                   f"is only predicted), more than the model's {positions}: use a window of at most {positions + 1}")
    device = next(model.parameters()).device
    ids = torch.tensor(tokens, device=device)  # [T]
    nll = torch.empty(len(tokens) - 1, device=device)  # [T-1]: nll[t - 1] scores tokens[t]
    top1 = torch.empty(len(tokens) - 1, dtype=torch.long, device=device)  # [T-1]
    synchronize(device)
    start = time.perf_counter()
    for span in spans:
        logits = model(ids[None, span.start : span.end - 1]).logits[0, span.scored - 1 - span.start :]  # [end - scored, vocab]
        nll[span.scored - 1 : span.end - 1], top1[span.scored - 1 : span.end - 1] = token_scores(logits, ids[span.scored : span.end])
    synchronize(device)
    return Scores(tokens, window, resolve_stride(window, stride), nll.double().cpu(), top1.cpu(),
                  (time.perf_counter() - start) * 1e3, None if prefix_token is None else tokens[0])
