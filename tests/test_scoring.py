"""neoxfuse.scoring and Engine.score: teacher-forced NLL and perplexity, windows, against HF's own loss."""

import math

import pytest
import torch

from neoxfuse.engine import Engine, load_hf_model
from neoxfuse.errors import InvalidInputError, SequenceTooLongError, UnsupportedModelError
from neoxfuse.quant import QuantConfig, quantize_gpt_neox, save_gptq_checkpoint
from neoxfuse.quant.hf_gptq import dequantized_gpt_neox
from neoxfuse.scoring import CorpusScores, Scores, hf_scores, windows
from neoxfuse.weights import random_model


@pytest.fixture(scope="module")
def hf_model():
    return random_model("tiny", seed=7)


def _tokens(count: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n_tokens, window, stride, spans", [
    (2, 2, None, [(0, 1, 2)]),
    (5, 3, None, [(0, 1, 3), (2, 3, 5)]),
    (4, 3, None, [(0, 1, 3), (1, 3, 4)]),  # the last window ends at the end, with all the context it holds
    (13, 5, None, [(0, 1, 5), (4, 5, 9), (8, 9, 13)]),
    (13, 5, 4, [(0, 1, 5), (4, 5, 9), (8, 9, 13)]),  # the default stride: window - 1
    (14, 5, None, [(0, 1, 5), (4, 5, 9), (8, 9, 13), (9, 13, 14)]),
    (7, 100, None, [(0, 1, 7)]),
    (9, 5, 2, [(0, 1, 5), (2, 5, 7), (4, 7, 9)]),  # each later window scores its last 2 tokens
    (10, 5, 2, [(0, 1, 5), (2, 5, 7), (4, 7, 9), (5, 9, 10)]),
    (6, 4, 1, [(0, 1, 4), (1, 4, 5), (2, 5, 6)]),
    (8, 6, 3, [(0, 1, 6), (2, 6, 8)]),
])
def test_windows_score_each_token_but_the_first_once(n_tokens, window, stride, spans):
    assert windows(n_tokens, window, stride) == spans
    for start, scored, end in spans:
        assert start < scored < end == start + min(window, n_tokens)  # each window as full as the text allows
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(1, n_tokens))


def _rolling_windows(tokens: list[int], prefix_token: int, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's rolling loglikelihood windows (one token of context), as (tokens run,
    tokens predicted): the first predicts the first max_seq_len tokens from the prefix token and the
    tokens before each; each later one predicts the next (up to) max_seq_len tokens, running the
    max_seq_len tokens before its last prediction."""
    pairs = [([prefix_token, *tokens[: min(max_seq_len, len(tokens)) - 1]], tokens[:max_seq_len])]
    predicted = len(pairs[0][1])
    while predicted < len(tokens):
        end = min(predicted + max_seq_len, len(tokens))
        pairs.append((tokens[end - max_seq_len - 1 : end - 1], tokens[predicted:end]))
        predicted = end
    return pairs


@pytest.mark.parametrize("n_tokens, positions", [(1, 4), (3, 4), (4, 4), (5, 4), (9, 4), (10, 4), (13, 3), (700, 256)])
def test_the_default_windows_after_a_prefix_token_are_lm_evaluation_harnesss(n_tokens, positions):
    tokens = _tokens(n_tokens, 1000, seed=n_tokens)
    run = [9999, *tokens]  # the prefix token, then the text
    spans = windows(len(run), positions + 1)  # the engine's default window for a cache of `positions`
    assert [(run[start : end - 1], run[scored:end]) for start, scored, end in spans] == _rolling_windows(tokens, 9999, positions)


@pytest.mark.parametrize("n_tokens, window, stride, message", [
    (5, 1, None, "at least 2"), (5, 0, None, "at least 2"), (5, True, None, "at least 2"), (5, 2.0, None, "at least 2"),
    (1, 4, None, "at least 2 tokens"), (0, 4, None, "at least 2 tokens"),
    (5, 4, 4, "from 1 to the window's 4 tokens minus one"), (5, 4, 0, "stride"), (5, 4, -1, "stride"),
    (5, 4, 2.0, "stride"), (5, 4, True, "stride"),
])
def test_windows_refuse_what_scores_nothing(n_tokens, window, stride, message):
    with pytest.raises(InvalidInputError, match=message):
        windows(n_tokens, window, stride)


@torch.inference_mode()
def test_hf_scores_are_hfs_own_loss_per_window(hf_model):
    # HF's loss (labels = input ids) is the mean NLL of each window's predictions: hf_scores' mean,
    # weighted by the tokens each window scores.
    tokens = _tokens(13, hf_model.config.vocab_size)
    scores = hf_scores(hf_model, tokens, 5)
    ids = torch.tensor(tokens)
    losses = [(end - first - 1, float(hf_model(ids[None, first:end], labels=ids[None, first:end]).loss))
              for first, end in [(0, 5), (4, 9), (8, 13)]]
    assert scores.nll.shape == (12,) and scores.nll.dtype == torch.float64
    assert scores.mean_nll == pytest.approx(sum(n * loss for n, loss in losses) / 12, rel=1e-6)
    assert scores.perplexity == pytest.approx(math.exp(scores.mean_nll), rel=1e-12)
    assert scores.windows == 3 and scores.stride == 4
    logits = hf_model(ids[None, :5]).logits[0, :-1]  # the first window's predictions of tokens 1..4
    assert scores.top1[:4].tolist() == logits.argmax(-1).tolist()


@torch.inference_mode()
@pytest.mark.parametrize("window, stride", [(5, 2), (8, 3), (6, 5)])
def test_hf_scores_with_a_stride_are_the_fixed_length_perplexity_recipe(hf_model, window, stride):
    # HF's "perplexity of fixed-length models": windows [begin, begin + window) every `stride`
    # tokens, the labels of tokens an earlier window scored set to -100, each window's loss
    # weighted by the tokens it scores; but the last window, [len - window, len), has a full window
    # of context where the recipe would start it on the stride.
    tokens = _tokens(23, hf_model.config.vocab_size, seed=3)
    ids = torch.tensor(tokens)[None]
    nll_sum, n_scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        if begin + window >= len(tokens):
            begin = len(tokens) - window
        end = min(begin + window, len(tokens))
        labels = ids[:, begin:end].clone()
        labels[:, : -(end - previous_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += float(hf_model(ids[:, begin:end], labels=labels).loss) * scored
        n_scored, previous_end = n_scored + scored, end
        if end == len(tokens):
            break
    scores = hf_scores(hf_model, tokens, window, stride)
    assert n_scored == 22 and scores.stride == stride
    assert scores.mean_nll == pytest.approx(nll_sum / n_scored, rel=1e-6)
    assert scores.windows == len(windows(23, window, stride)) > 2


@torch.inference_mode()
@pytest.mark.parametrize("window, stride", [(5, None), (13, None), (64, None), (5, 2), (6, 1), (9, 4)])
def test_engine_scores_through_decode_steps_what_hf_scores(hf_model, window, stride):
    tokens = _tokens(13, hf_model.config.vocab_size, seed=1)
    engine = Engine(hf_model, device="cpu", max_seq_len=64)
    got = engine.score(tokens, window=window, stride=stride)
    want = hf_scores(hf_model, tokens, window, stride)
    difference = got.difference(want)
    assert got.tokens == tokens and got.window == window and got.stride == (stride or window - 1) and got.elapsed_ms > 0
    assert difference.max_abs_nll < 1e-4 and difference.top1_agreement == 1.0
    assert difference.relative_perplexity < 1e-5


@torch.inference_mode()
def test_the_default_window_runs_the_models_every_position(hf_model):
    # 256 positions: windows of 257 tokens, each predicting 256 (the first from the prefix token alone),
    # as lm-evaluation-harness's rolling windows do; HF runs the same 256 tokens per window.
    positions = hf_model.config.max_position_embeddings
    tokens = _tokens(2 * positions + 10, hf_model.config.vocab_size, seed=6)
    got = Engine(hf_model, device="cpu").score(tokens, prefix_token=0)
    want = hf_scores(hf_model, tokens, positions + 1, prefix_token=0)
    assert got.window == positions + 1 and got.stride == positions and got.windows == 3
    assert got.difference(want).max_abs_nll < 1e-4
    ids = torch.tensor([[0, *tokens[: positions - 1]]])  # the first window: HF's loss is its mean NLL
    assert float(got.nll[: positions - 1].mean()) == pytest.approx(float(hf_model(ids, labels=ids).loss), abs=1e-5)


@torch.inference_mode()
def test_each_window_starts_from_an_empty_cache(hf_model):
    # The second window [4, 9) predicts token 5 from token 4 alone, as a fresh two-token text does.
    tokens = _tokens(9, hf_model.config.vocab_size, seed=2)
    engine = Engine(hf_model, device="cpu", max_seq_len=16)
    scores = engine.score(tokens, window=5)
    assert float(scores.nll[4]) == pytest.approx(float(engine.score(tokens[4:6]).nll[0]), abs=1e-6)
    assert engine.score(tokens).window == 17  # max_seq_len + 1 by default: the last token only predicted


@torch.inference_mode()
def test_a_strided_window_scores_its_tokens_from_all_its_context(hf_model):
    # With window 5 and stride 2 the second window [2, 7) scores tokens 5 and 6 from tokens 2..4 and
    # 2..5 (its context prefilled): as the last two predictions of tokens[2:7] scored on their own.
    tokens = _tokens(9, hf_model.config.vocab_size, seed=4)
    engine = Engine(hf_model, device="cpu", max_seq_len=16)
    scores = engine.score(tokens, window=5, stride=2)
    alone = engine.score(tokens[2:7])
    assert scores.nll[4:6].tolist() == pytest.approx(alone.nll[-2:].tolist(), abs=1e-6)
    assert scores.top1[4:6].tolist() == alone.top1[-2:].tolist()


@torch.inference_mode()
def test_scoring_leaves_nothing_for_the_prefix_cache(hf_model):
    engine = Engine(hf_model, device="cpu", max_seq_len=32, prefix_cache=True)
    first = engine.generate([5, 6, 7], 4)
    engine.score([5, 6, 7, *first.tokens, 9], window=8)
    again = engine.generate([5, 6, 7, *first.tokens, 9], 4)
    assert again.reused_tokens == 0
    assert again.tokens == Engine(hf_model, device="cpu", max_seq_len=32).generate([5, 6, 7, *first.tokens, 9], 4).tokens


@torch.inference_mode()
def test_prompt_logprobs_are_the_scores_with_hfs_most_likely_tokens(hf_model):
    # 40 tokens through a 16-position cache: three windows, each from an empty cache.
    tokens = _tokens(40, hf_model.config.vocab_size, seed=4)
    engine = Engine(hf_model, device="cpu", max_seq_len=16)
    got = engine.prompt_logprobs(tokens, 4)
    scores = engine.score(tokens)
    assert [entry.token for entry in got] == tokens[1:]
    assert [entry.logprob for entry in got] == (-scores.nll).tolist()
    spans = windows(len(tokens), 17)
    assert len(spans) == 3
    for span in spans:
        logits = hf_model(torch.tensor([tokens[span.start : span.end - 1]])).logits[0, span.scored - 1 - span.start :]
        values, ids = torch.log_softmax(logits.float(), dim=-1).topk(4)  # [scored tokens, 4]
        for entry, want_values, want_ids in zip(got[span.scored - 1 : span.end - 1], values, ids):
            assert [token for token, _ in entry.top] == want_ids.tolist()
            assert [value for _, value in entry.top] == pytest.approx(want_values.tolist(), abs=1e-5)
    assert [entry.top for entry in engine.prompt_logprobs(tokens[:9], 1)] == [entry.top[:1] for entry in got[:8]]
    assert engine.prompt_logprobs(tokens[:1], 4) == [] and all(entry.top == () for entry in engine.prompt_logprobs(tokens[:5]))
    with pytest.raises(InvalidInputError, match="top must be an integer from 0 to 20, got 21"):
        engine.prompt_logprobs(tokens, 21)
    with pytest.raises(InvalidInputError, match="the prompt is empty"):
        engine.prompt_logprobs([], 1)


def test_engine_score_refuses_bad_requests(hf_model):
    engine = Engine(hf_model, device="cpu", max_seq_len=8)
    with pytest.raises(SequenceTooLongError, match="window of 10 tokens runs the model on 9 positions .* more than the 8 of "
                                                   "the KV cache: use a window of at most 9 tokens .* the model.s 256"):
        engine.score([1, 2, 3], window=10)
    with pytest.raises(SequenceTooLongError, match="window of 258 tokens runs the model on 257 positions .* more than the "
                                                   "model's 256: use a window of at most 257"):
        hf_scores(hf_model, [1, 2, 3], 258)
    with pytest.raises(InvalidInputError, match="at least 2"):
        engine.score([1, 2, 3], window=1)
    with pytest.raises(InvalidInputError, match="stride"):
        engine.score([1, 2, 3], window=4, stride=4)
    with pytest.raises(InvalidInputError, match="at least 2 tokens"):
        engine.score([1])
    with pytest.raises(InvalidInputError, match="the text is empty"):
        engine.score([])
    with pytest.raises(InvalidInputError, match=r"token ids must be in \[0, "):
        engine.score([1, hf_model.config.vocab_size])
    with pytest.raises(InvalidInputError, match="needs a tokenizer"):
        engine.score("some text")
    with pytest.raises(InvalidInputError, match=r"token ids must be in \[0, "):
        hf_scores(hf_model, [1, -1], 4)
    with pytest.raises(InvalidInputError, match=r"token ids must be integers, got \[2.5\]"):  # not cut to 2
        hf_scores(hf_model, [1, 2.5], 4)


@torch.inference_mode()
@pytest.mark.parametrize("window, stride", [(64, None), (5, None), (5, 2)])
def test_a_prefix_token_scores_the_texts_first_token_too(hf_model, window, stride):
    tokens = _tokens(11, hf_model.config.vocab_size, seed=5)
    engine = Engine(hf_model, device="cpu", max_seq_len=64)
    got = engine.score(tokens, window=window, stride=stride, prefix_token=0)
    want = hf_scores(hf_model, tokens, window, stride, prefix_token=0)
    assert got.tokens == [0, *tokens] and got.prefix_token == 0 and len(got.nll) == len(tokens)
    assert want.tokens == got.tokens and want.prefix_token == 0
    assert got.difference(want).max_abs_nll < 1e-4
    first = -torch.log_softmax(hf_model(torch.tensor([[0]])).logits[0, -1].float(), -1)[tokens[0]]
    assert float(got.nll[0]) == pytest.approx(float(first), abs=1e-5)  # the text's first token, predicted after the prefix
    if window == 64:  # one window: HF's own loss over [prefix, text] is the mean NLL of the text's tokens
        ids = torch.tensor([[0, *tokens]])
        assert got.mean_nll == pytest.approx(float(hf_model(ids, labels=ids).loss), abs=1e-5)


def test_text_measures_put_the_total_nll_per_word_and_per_byte():
    def scores(nll, prefix_token=0):
        tokens = list(range(len(nll) + 1))
        return Scores(tokens, 8, 7, torch.tensor(nll, dtype=torch.float64), torch.zeros(len(nll), dtype=torch.long), 1.0,
                      prefix_token)

    measures = scores([1.0, 2.0, 3.0]).text_measures("one two  three")  # 3 words, 14 bytes, a total NLL of 6
    assert (measures.words, measures.bytes) == (3, 14)
    assert measures.word_perplexity == pytest.approx(math.exp(6 / 3))
    assert measures.byte_perplexity == pytest.approx(math.exp(6 / 14))
    assert measures.bits_per_byte == pytest.approx(6 / 14 / math.log(2))
    # lm-evaluation-harness's counts: words split at whitespace runs (leading and trailing whitespace
    # each make an empty word), bytes of UTF-8 (é is two).
    assert (scores([1.0]).text_measures(" caf\u00e9 au\tlait\n").words, scores([1.0]).text_measures("caf\u00e9").bytes) == (5, 5)
    with pytest.raises(InvalidInputError, match="score it after a prefix token"):
        scores([1.0, 2.0], prefix_token=None).text_measures("one two")
    with pytest.raises(InvalidInputError, match="a str; got list"):
        scores([1.0, 2.0]).text_measures([1, 2])


@pytest.mark.parametrize("prefix_token", [-1, "vocab", 2.0, True, "0"])
def test_a_bad_prefix_token_is_refused(hf_model, prefix_token):
    vocab = hf_model.config.vocab_size
    prefix_token = vocab if prefix_token == "vocab" else prefix_token
    engine = Engine(hf_model, device="cpu", max_seq_len=8)
    with pytest.raises(InvalidInputError, match=rf"prefix_token must be a token id in \[0, {vocab}\)"):
        engine.score([1, 2], prefix_token=prefix_token)
    with pytest.raises(InvalidInputError, match=rf"prefix_token must be a token id in \[0, {vocab}\)"):
        hf_scores(hf_model, [1, 2], 4, prefix_token=prefix_token)


def test_differences_are_computed_per_token_and_need_the_same_tokens():
    def scores(nll, top1, tokens=(1, 2, 3), window=4, stride=3):
        return Scores(list(tokens), window, stride, torch.tensor(nll, dtype=torch.float64), torch.tensor(top1), 1.0)

    a, b = scores([1.0, 2.0], [7, 8]), scores([1.0, 3.0], [7, 9])
    difference = a.difference(b)
    assert difference.max_abs_nll == 1.0 and difference.mean_abs_nll == 0.5 and difference.top1_agreement == 0.5
    assert a.ms_per_token == 0.5 and a.windows == 1
    assert difference.relative_perplexity == pytest.approx(abs(math.exp(1.5) - math.exp(2.0)) / math.exp(2.0))
    with pytest.raises(InvalidInputError, match="same tokens and windows"):
        a.difference(scores([1.0, 2.0], [7, 8], tokens=(1, 2, 4)))
    with pytest.raises(InvalidInputError, match="same tokens and windows"):
        a.difference(scores([1.0, 2.0], [7, 8], window=3, stride=2))
    with pytest.raises(InvalidInputError, match="same tokens and windows"):
        a.difference(scores([1.0, 2.0], [7, 8], stride=2))


def test_a_corpus_sums_its_documents_nll_over_all_their_tokens_words_and_bytes():
    def scores(nll, top1=None, prefix_token=0, elapsed_ms=1.0):
        top1 = [0] * len(nll) if top1 is None else top1
        return Scores(list(range(len(nll) + 1)), 8, 7, torch.tensor(nll, dtype=torch.float64), torch.tensor(top1), elapsed_ms,
                      prefix_token)

    corpus = CorpusScores((scores([1.0, 2.0, 3.0]), scores([4.0], elapsed_ms=3.0)))  # a total NLL of 10 over 4 tokens
    assert corpus.nll.tolist() == [1.0, 2.0, 3.0, 4.0] and corpus.mean_nll == 2.5 and corpus.ms_per_token == 1.0
    assert corpus.perplexity == pytest.approx(math.exp(2.5))  # not the mean of the documents' perplexities
    assert corpus.prefix_token == 0
    measures = corpus.text_measures(["one two  three", "caf\u00e9"])  # 3 + 1 words, 14 + 5 bytes
    assert (measures.words, measures.bytes) == (4, 19)
    assert measures.word_perplexity == pytest.approx(math.exp(10 / 4))
    assert measures.byte_perplexity == pytest.approx(math.exp(10 / 19))
    assert measures.bits_per_byte == pytest.approx(10 / 19 / math.log(2))
    with pytest.raises(InvalidInputError, match="the texts of its 2 documents, in order; got 1 texts"):
        corpus.text_measures(["one two three"])
    with pytest.raises(InvalidInputError, match="got a str"):
        corpus.text_measures("ab")
    with pytest.raises(InvalidInputError, match="each a str; got str, int"):
        corpus.text_measures(["a", 1])
    unprefixed = CorpusScores((scores([1.0]), scores([2.0], prefix_token=None)))
    assert unprefixed.prefix_token is None
    with pytest.raises(InvalidInputError, match="score each after a prefix token"):
        unprefixed.text_measures(["a", "b"])
    other = CorpusScores((scores([1.0, 2.0, 5.0], top1=[0, 1, 0]), scores([4.0])))
    difference = corpus.difference(other)
    assert difference.max_abs_nll == 2.0 and difference.mean_abs_nll == 0.5 and difference.top1_agreement == 0.75
    assert difference.relative_perplexity == pytest.approx(abs(math.exp(2.5) - math.exp(3.0)) / math.exp(3.0))
    with pytest.raises(InvalidInputError, match="same documents; got 2 and 1"):
        corpus.difference(CorpusScores((scores([1.0]),)))
    with pytest.raises(InvalidInputError, match="same tokens and windows"):
        corpus.difference(CorpusScores((scores([1.0, 2.0, 3.0]), scores([4.0, 5.0]))))
    for bad in [(), [], (corpus,), ("scores",)]:
        with pytest.raises(InvalidInputError, match="one Scores per document"):
            CorpusScores(bad)


@torch.inference_mode()
def test_a_corpus_scored_by_the_engine_is_hfs_loss_summed_over_its_documents(hf_model):
    # Each document from an empty context, after the prefix token: HF's loss over [prefix, document]
    # times its tokens, summed over the documents, is the corpus's total NLL.
    documents = [_tokens(n, hf_model.config.vocab_size, seed=n) for n in (5, 1, 12)]
    engine = Engine(hf_model, device="cpu", max_seq_len=16)
    corpus = CorpusScores(tuple(engine.score(document, prefix_token=0) for document in documents))
    total = 0.0
    for document in documents:
        ids = torch.tensor([[0, *document]])
        total += float(hf_model(ids, labels=ids).loss) * len(document)
    assert float(corpus.nll.sum()) == pytest.approx(total, rel=1e-5)
    assert corpus.perplexity == pytest.approx(math.exp(total / 18), rel=1e-5)
    texts = ["a b c d e", "f", "g h i j k l m n o p q r"]
    assert corpus.text_measures(texts).word_perplexity == pytest.approx(math.exp(total / 18), rel=1e-5)


def test_load_hf_model_loads_what_the_engine_loads(tmp_path):
    # A name: the weights the Engine draws for the seed; a directory: transformers' own loading of it;
    # a GPTQ directory: its dequantized model.
    named, description = load_hf_model("tiny", seed=4)
    assert description == "tiny (random-initialised)"
    assert torch.equal(named.gpt_neox.embed_in.weight, Engine("tiny", device="cpu", seed=4).weights.embed_in)
    model = random_model("tiny", seed=5)
    model.save_pretrained(tmp_path / "dense")
    loaded, description = load_hf_model(tmp_path / "dense", dtype=torch.float16)
    assert loaded.dtype == torch.float16 and not loaded.training and description == str(tmp_path / "dense")
    assert all(torch.equal(p.half(), q) for p, q in zip(model.parameters(), loaded.parameters()))
    checkpoint = quantize_gpt_neox(model, QuantConfig(group_size=32))
    save_gptq_checkpoint(checkpoint, tmp_path / "gptq")
    dequantized, description = load_hf_model(tmp_path / "gptq")
    assert description.startswith(str(tmp_path / "gptq")) and "dequantized" in description
    want = dequantized_gpt_neox(checkpoint, "cpu", torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(want.parameters(), dequantized.parameters()))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        load_hf_model(tmp_path / "llama")


@torch.inference_mode()
def test_a_continuations_loglikelihood_is_hfs(hf_model):
    # log p(continuation | context) from HF's logits over context + continuation; a context cut from
    # the left to fit max_seq_len + 1 tokens; greedy where the continuation is the model's own argmax.
    engine = Engine(hf_model, device="cpu", max_seq_len=8)
    context, continuation = _tokens(5, hf_model.config.vocab_size, seed=8), _tokens(3, hf_model.config.vocab_size, seed=9)

    def hf_logprob(tokens, n):
        log_probs = torch.log_softmax(hf_model(torch.tensor([tokens[:-1]])).logits[0].float(), -1)
        return float(log_probs[-n:].gather(-1, torch.tensor(tokens[-n:])[:, None]).sum())

    got = engine.loglikelihood(context, continuation)
    assert got.logprob == pytest.approx(hf_logprob(context + continuation, 3), abs=1e-4)
    assert not got.greedy and got.context_tokens == 5
    long_context = _tokens(20, hf_model.config.vocab_size, seed=10)
    cut = engine.loglikelihood(long_context, continuation)
    assert cut.context_tokens == 9 - 3 and cut.logprob == pytest.approx(hf_logprob((long_context + continuation)[-9:], 3), abs=1e-4)
    own = engine.generate(context, 3).tokens
    assert engine.loglikelihood(context, own).greedy
    with pytest.raises(SequenceTooLongError, match="a continuation of 9 tokens needs as many KV cache positions"):
        engine.loglikelihood([1], list(range(9)))
    with pytest.raises(InvalidInputError, match="the context is empty"):
        engine.loglikelihood([], [1])
    with pytest.raises(InvalidInputError, match="the continuation is empty"):
        engine.loglikelihood([1], [])


@torch.inference_mode()
def test_the_choices_of_a_question_share_one_prefill_of_its_context(hf_model, monkeypatch):
    # Loglikelihoods of one context's continuations (a multiple-choice question's, as lm-eval asks
    # them) prefill the context once: the same numbers, bitwise, as an engine that prefills it each
    # time. A generation or another context in between writes the cache: the context is prefilled again.
    vocab = hf_model.config.vocab_size
    engine, fresh = Engine(hf_model, device="cpu", max_seq_len=24), Engine(hf_model, device="cpu", max_seq_len=24)
    prefills = []
    prefill = engine.backend.prefill
    monkeypatch.setattr(engine.backend, "prefill", lambda tokens, cache: prefills.append(len(tokens)) or prefill(tokens, cache))
    context, other = _tokens(9, vocab, seed=11), _tokens(6, vocab, seed=12)
    choices = [_tokens(n, vocab, seed=20 + n) for n in (1, 4, 2)]
    asked = [(context, choices[0]), (context, choices[1]), (context, choices[2]), (other, choices[1]), (context, choices[2]),
             (context, choices[0]), ("generate", None), (context, choices[1]), (context[:5], choices[0]),
             (context[:5] + context[6:], choices[0]), ("score", None), (context, choices[1]), (_tokens(30, vocab, seed=13), choices[1]),
             (context, choices[1])]
    ran = []  # the prefills each ran, by length
    for question, choice in asked:
        before = len(prefills)
        if question == "generate":
            engine.generate(other, 4)  # writes the cache from position 0
        elif question == "score":
            engine.score(context + choices[1], window=11, stride=3)  # prefills tokens 2..9 for its second window
        else:
            fresh._prefilled = None  # prefills every time
            got, want = engine.loglikelihood(question, choice), fresh.loglikelihood(question, choice)
            assert got == want, (question, choice)
        ran.append(prefills[before:])
    assert ran == [[8], [], [], [5], [8], [], [6], [8], [4], [7], [8], [8], [20], [8]]
