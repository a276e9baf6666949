"""neoxfuse.scoring and Engine.score: teacher-forced NLL and perplexity, windows, against HF's own loss."""

import math

import pytest
import torch

from neoxfuse.engine import Engine, load_hf_model
from neoxfuse.errors import InvalidInputError, SequenceTooLongError, UnsupportedModelError
from neoxfuse.quant import QuantConfig, quantize_gpt_neox, save_gptq_checkpoint
from neoxfuse.quant.hf_gptq import dequantized_gpt_neox
from neoxfuse.scoring import Scores, hf_scores, windows
from neoxfuse.weights import random_model


@pytest.fixture(scope="module")
def hf_model():
    return random_model("tiny", seed=7)


def _tokens(count: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n_tokens, window, spans", [
    (2, 2, [(0, 2)]),
    (5, 3, [(0, 3), (2, 5)]),
    (4, 3, [(0, 3), (2, 4)]),  # the last window is shorter
    (13, 5, [(0, 5), (4, 9), (8, 13)]),
    (7, 100, [(0, 7)]),
])
def test_windows_overlap_by_one_token_so_each_token_but_the_first_is_scored_once(n_tokens, window, spans):
    assert windows(n_tokens, window) == spans
    scored = [t for first, end in spans for t in range(first + 1, end)]
    assert scored == list(range(1, n_tokens))


@pytest.mark.parametrize("n_tokens, window", [(5, 1), (5, 0), (5, True), (5, 2.0), (1, 4), (0, 4)])
def test_windows_refuse_what_scores_nothing(n_tokens, window):
    with pytest.raises(InvalidInputError, match="at least 2"):
        windows(n_tokens, window)


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
    assert scores.windows == 3
    logits = hf_model(ids[None, :5]).logits[0, :-1]  # the first window's predictions of tokens 1..4
    assert scores.top1[:4].tolist() == logits.argmax(-1).tolist()


@torch.inference_mode()
@pytest.mark.parametrize("window", [5, 13, 64])
def test_engine_scores_through_decode_steps_what_hf_scores(hf_model, window):
    tokens = _tokens(13, hf_model.config.vocab_size, seed=1)
    engine = Engine(hf_model, device="cpu", max_seq_len=64)
    got = engine.score(tokens, window=window)
    want = hf_scores(hf_model, tokens, window)
    difference = got.difference(want)
    assert got.tokens == tokens and got.window == window and got.elapsed_ms > 0
    assert difference.max_abs_nll < 1e-4 and difference.top1_agreement == 1.0
    assert difference.relative_perplexity < 1e-5


@torch.inference_mode()
def test_each_window_starts_from_an_empty_cache(hf_model):
    # The second window [4, 9) predicts token 5 from token 4 alone, as a fresh two-token text does.
    tokens = _tokens(9, hf_model.config.vocab_size, seed=2)
    engine = Engine(hf_model, device="cpu", max_seq_len=16)
    scores = engine.score(tokens, window=5)
    assert float(scores.nll[4]) == pytest.approx(float(engine.score(tokens[4:6]).nll[0]), abs=1e-6)
    assert engine.score(tokens).window == 16  # max_seq_len by default


@torch.inference_mode()
def test_scoring_leaves_nothing_for_the_prefix_cache(hf_model):
    engine = Engine(hf_model, device="cpu", max_seq_len=32, prefix_cache=True)
    first = engine.generate([5, 6, 7], 4)
    engine.score([5, 6, 7, *first.tokens, 9], window=8)
    again = engine.generate([5, 6, 7, *first.tokens, 9], 4)
    assert again.reused_tokens == 0
    assert again.tokens == Engine(hf_model, device="cpu", max_seq_len=32).generate([5, 6, 7, *first.tokens, 9], 4).tokens


def test_engine_score_refuses_bad_requests(hf_model):
    engine = Engine(hf_model, device="cpu", max_seq_len=8)
    with pytest.raises(SequenceTooLongError, match="window of 9 tokens is longer than the 8 positions .* the model.s 256"):
        engine.score([1, 2, 3], window=9)
    with pytest.raises(InvalidInputError, match="at least 2"):
        engine.score([1, 2, 3], window=1)
    with pytest.raises(InvalidInputError, match="at least 2 tokens"):
        engine.score([1])
    with pytest.raises(InvalidInputError, match=r"token ids must be in \[0, "):
        engine.score([1, hf_model.config.vocab_size])
    with pytest.raises(InvalidInputError, match="needs a tokenizer"):
        engine.score("some text")
    with pytest.raises(InvalidInputError, match=r"token ids must be in \[0, "):
        hf_scores(hf_model, [1, -1], 4)


def test_differences_are_computed_per_token_and_need_the_same_tokens():
    def scores(nll, top1, tokens=(1, 2, 3), window=4):
        return Scores(list(tokens), window, torch.tensor(nll, dtype=torch.float64), torch.tensor(top1), 1.0)

    a, b = scores([1.0, 2.0], [7, 8]), scores([1.0, 3.0], [7, 9])
    difference = a.difference(b)
    assert difference.max_abs_nll == 1.0 and difference.mean_abs_nll == 0.5 and difference.top1_agreement == 0.5
    assert a.ms_per_token == 0.5 and a.windows == 1
    assert difference.relative_perplexity == pytest.approx(abs(math.exp(1.5) - math.exp(2.0)) / math.exp(2.0))
    with pytest.raises(InvalidInputError, match="same tokens and windows"):
        a.difference(scores([1.0, 2.0], [7, 8], tokens=(1, 2, 4)))
    with pytest.raises(InvalidInputError, match="same tokens and windows"):
        a.difference(scores([1.0, 2.0], [7, 8], window=3))


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
