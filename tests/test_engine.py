"""neoxfuse.Engine: model sources, greedy and sampled generation, the KV cache limit, the backend registry."""

import copy
import itertools
import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextStreamer,
    pipeline,
)
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.streamers import BaseStreamer

from conftest import CHAT_TEMPLATE

import neoxfuse
import neoxfuse.hf
from neoxfuse.engine import (
    BACKENDS,
    Availability,
    Backend,
    Engine,
    ReferenceBackend,
    StepClock,
    backend_availability,
    register_backend,
    resolve_dtype,
)
from neoxfuse.errors import InvalidInputError, NoGPUError, SequenceTooLongError, UnknownModelError, UnsupportedModelError
from neoxfuse.quant import QuantConfig, quantize_gpt_neox, save_gptq_checkpoint
from neoxfuse.quant.hf_gptq import dequantized_gpt_neox
from neoxfuse.reference import ReferenceModel
from neoxfuse.sampling import SamplingParams
from neoxfuse.weights import from_hf, random_model


@pytest.fixture(scope="module")
def hf_model():
    return random_model("tiny", seed=1234)


@pytest.fixture(scope="module")
def engine(hf_model):
    return Engine(hf_model, device="cpu")  # CPU tests compare with CPU computations, GPU or not


def _random_prompt(vocab: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    length = int(torch.randint(1, 12, (1,), generator=generator))
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def _reference_greedy(model: ReferenceModel, prompt: list[int], new_tokens: int) -> list[int]:
    cache = model.new_cache()
    tokens = [int(model.prefill(torch.tensor(prompt), cache)[-1].argmax())]
    while len(tokens) < new_tokens:
        tokens.append(int(model.decode_step(tokens[-1], cache).argmax()))
    return tokens


def test_engine_is_exported_lazily():
    assert neoxfuse.Engine is Engine


@pytest.mark.parametrize("given, device, model_dtype, want", [
    (None, "cpu", torch.bfloat16, torch.float32),
    (None, "cuda", None, torch.float16),  # a Pythia name: made in the dtype chosen
    (None, "cuda", torch.float32, torch.float16),
    (None, "cuda", torch.float16, torch.float16),
    (None, "cuda", torch.bfloat16, torch.bfloat16),  # a bf16 model keeps its range on the GPU
    ("fp16", "cuda", torch.bfloat16, torch.float16),  # asked for: as asked
    (torch.float32, "cuda", torch.bfloat16, torch.float32),
])  # fmt: skip
def test_the_default_dtype_follows_the_device_and_a_bf16_model(given, device, model_dtype, want):
    assert resolve_dtype(given, torch.device(device), model_dtype) == want


@pytest.mark.gpu
def test_a_bf16_model_runs_in_bf16_on_the_gpu(hf_model):
    engine = Engine(copy.deepcopy(hf_model).to(torch.bfloat16))
    assert engine.dtype == torch.bfloat16 and engine.weights.embed_in.dtype == torch.bfloat16


def test_cpu_defaults_to_fp32(engine):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU default")
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.max_seq_len == engine.shape.max_positions


def test_auto_backend_takes_the_fastest_that_can_run_and_says_why(engine):
    assert engine.backend_name == "reference" and isinstance(engine.backend, ReferenceBackend)
    assert engine.backend_reason.startswith("auto: reference; not fused: the fused kernels need a CUDA GPU")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_the_reference_models_greedy(hf_model, engine, seed):
    prompt = _random_prompt(engine.shape.vocab, seed)
    got = engine.generate(prompt, 24)
    assert got.prompt_tokens == prompt
    assert got.tokens == _reference_greedy(ReferenceModel(from_hf(hf_model)), prompt, 24)


def test_greedy_equals_hf_generate(hf_model, engine):
    prompt = _random_prompt(engine.shape.vocab, 7)
    ids = torch.tensor([prompt])
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 eos_token_id=None)  # exactly 40 tokens
    assert engine.generate(prompt, 40).tokens == expected[0, len(prompt) :].tolist()


def test_every_model_source_gives_the_same_model(tmp_path):
    prompt = [5, 17, 300]
    hf_model = random_model("tiny", seed=0)
    expected = Engine(hf_model, device="cpu").generate(prompt, 12).tokens
    hf_model.save_pretrained(tmp_path)
    by_name = Engine("tiny", seed=0, device="cpu")  # random_model("tiny", seed=0) again
    assert by_name.random_init and "random-initialised" in by_name.description
    assert by_name.generate(prompt, 12).tokens == expected
    assert Engine(from_hf(hf_model), device="cpu").generate(prompt, 12).tokens == expected
    assert Engine(str(tmp_path), device="cpu").generate(prompt, 12).tokens == expected
    assert Engine(tmp_path, device="cpu").tokenizer is None
    assert Engine("tiny", seed=1, device="cpu").generate(prompt, 12).tokens != expected


@pytest.mark.gpu
def test_a_model_by_name_is_drawn_on_the_gpu_it_runs_on():
    engine = Engine("tiny", seed=0, backend="reference")
    drawn_there = from_hf(random_model("tiny", seed=0, dtype=engine.dtype, device="cuda"))
    assert engine.weights.embed_in.is_cuda and torch.equal(engine.weights.embed_in, drawn_there.embed_in)


def test_a_gptq_checkpoint_runs_dequantized(hf_model, tmp_path):
    checkpoint = quantize_gpt_neox(hf_model, QuantConfig(group_size=32, sym=False))
    save_gptq_checkpoint(checkpoint, tmp_path)
    engine = Engine(tmp_path, device="cpu")
    assert engine.description == f"{tmp_path} (GPTQ int4, group size 32, dequantized to float32)"
    dequantized = Engine(dequantized_gpt_neox(checkpoint, "cpu", torch.float32), device="cpu")
    assert engine.generate([1, 2, 3], 12).tokens == dequantized.generate([1, 2, 3], 12).tokens


def test_a_quantization_other_than_gptq_is_refused(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'awq' is not GPTQ"):
        Engine(tmp_path, device="cpu")


def test_hf_generate_equals_model_generate(hf_model, monkeypatch):
    ids = torch.tensor([_random_prompt(hf_model.config.vocab_size, 11)])
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 30, "do_sample": False}
    eos = int(hf_model.generate(ids, eos_token_id=None, **greedy)[0, -9])
    monkeypatch.setattr(hf_model.generation_config, "eos_token_id", eos)
    want = hf_model.generate(ids, **greedy)  # stops at that eos
    got = neoxfuse.hf.generate(hf_model, ids, max_new_tokens=30)
    assert got.tolist() == want.tolist() and got.shape[1] < ids.shape[1] + 30
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # a tokenizer's output, as HF users pass it
    assert neoxfuse.hf.generate(hf_model, **inputs, max_new_tokens=30, pad_token_id=eos).tolist() == want.tolist()
    assert neoxfuse.hf._engine(hf_model, "auto") is neoxfuse.hf._engine(hf_model, "auto")  # built once per model


def test_hf_generate_follows_the_model_to_another_dtype(hf_model):
    # The Engine shares the model's weights; model.to(dtype) makes new ones, and a new Engine.
    model = copy.deepcopy(hf_model)
    ids = torch.tensor([[5, 6, 7]])
    neoxfuse.hf.generate(model, ids, max_new_tokens=4)
    assert neoxfuse.hf._engine(model, "auto").dtype == torch.float32
    model.to(torch.bfloat16)
    got = neoxfuse.hf.generate(model, ids, max_new_tokens=4)
    engine = neoxfuse.hf._engine(model, "auto")
    assert engine.dtype == torch.bfloat16 and engine.weights.embed_in.data_ptr() == model.gpt_neox.embed_in.weight.data_ptr()
    assert got[0, 3:].tolist() == Engine(model, device="cpu").generate([5, 6, 7], 4).tokens


def test_hf_generate_samples_with_the_generation_configs_options(hf_model, engine, monkeypatch):
    monkeypatch.setattr(hf_model.generation_config, "top_k", 20)
    ids = torch.tensor([[5, 6, 7]])
    got = neoxfuse.hf.generate(hf_model, ids, max_new_tokens=12, do_sample=True, temperature=0.7, seed=9, eos_token_id=())
    want = engine.generate([5, 6, 7], 12, SamplingParams(temperature=0.7, top_k=20, seed=9)).tokens
    assert got[0, 3:].tolist() == want
    with pytest.raises(InvalidInputError, match=r"input_ids must be a batch of token id sequences \[B, P\]; got \[3\]"):
        neoxfuse.hf.generate(hf_model, torch.zeros(3, dtype=torch.long), max_new_tokens=4)
    for mask in ([[1, 1, 0]], [[1, 0, 1]], [[0, 0, 0]], [[0, 2, 1]]):  # padding on the right or inside, none left, not 0/1
        with pytest.raises(InvalidInputError, match="attention_mask must mark padding .0s. on the left of each row only"):
            neoxfuse.hf.generate(hf_model, ids, torch.tensor(mask), max_new_tokens=4)
    with pytest.raises(InvalidInputError, match=r"attention_mask must have the shape of input_ids, \[1, 3\]; got \[1, 2\]"):
        neoxfuse.hf.generate(hf_model, ids, torch.ones(1, 2), max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="token ids must be integers, got a torch.float32 tensor"):
        neoxfuse.hf.generate(hf_model, ids.float(), max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="do_sample with temperature 0: model.generate refuses it too"):
        neoxfuse.hf.generate(hf_model, ids, max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(InvalidInputError, match="streamer must have put.. and end.., as transformers' streamers do; got builtin"):
        neoxfuse.hf.generate(hf_model, ids, max_new_tokens=4, streamer=print)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
def test_hf_generate_falls_back_on_transformers_defaults(hf_model, engine):
    # Neither the call nor the generation config sets the length or top_k (transformers 5 leaves them
    # None): model.generate makes 20 new tokens, up to the model's 256 positions, and samples from the
    # top 50. The same here.
    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: vars(GenerationConfig()))()  # 5.x, 4.x
    fresh = GenerationConfig()  # where the defaults leave an option out, a fresh config's value (None) is its default
    assert {name: defaults[name] if name in defaults else getattr(fresh, name) for name in neoxfuse.hf._HF_DEFAULTS} == neoxfuse.hf._HF_DEFAULTS
    config = GenerationConfig(eos_token_id=None)
    for prompt_length, new_tokens in [(3, 20), (250, 6)]:
        ids = torch.arange(5, 5 + prompt_length)[None]  # [1, P]
        want = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert want.shape == (1, prompt_length + new_tokens)
        assert neoxfuse.hf.generate(hf_model, ids, generation_config=config).tolist() == want.tolist()
    got = neoxfuse.hf.generate(hf_model, ids[:, :3], generation_config=config, do_sample=True, seed=9)
    assert got[0, 3:].tolist() == engine.generate([5, 6, 7], 20, SamplingParams(temperature=1.0, top_k=50, seed=9)).tokens
    assert neoxfuse.hf.generate(hf_model, ids[:, :3], max_length=8, generation_config=config).shape == (1, 8)  # counts the prompt
    with pytest.raises(InvalidInputError, match="a max_length of 5 leaves no new tokens after a prompt of 6; give max_new_tokens"):
        neoxfuse.hf.generate(hf_model, ids[:, :6], max_length=5)


def test_hf_generate_takes_other_options_where_they_change_nothing(hf_model, monkeypatch):
    ids = torch.tensor([[5, 6, 7]])
    want = neoxfuse.hf.generate(hf_model, ids, max_new_tokens=6)
    neutral = {"num_beams": 1, "renormalize_logits": False, "use_cache": False, "output_attentions": True, "length_penalty": 2.0,
               "return_dict_in_generate": False, "bos_token_id": 3}
    assert neoxfuse.hf.generate(hf_model, ids, max_new_tokens=6, **neutral).tolist() == want.tolist()
    for name, value in [("num_beams", 2), ("renormalize_logits", True), ("forced_bos_token_id", 3), ("max_time", 2.0),
                        ("encoder_no_repeat_ngram_size", 2), ("max_time", 1.0)]:
        with pytest.raises(InvalidInputError, match=re.escape(f"{name}={value!r} (set in the call) would change what model.generate")):
            neoxfuse.hf.generate(hf_model, ids, max_new_tokens=6, **{name: value})
    with pytest.raises(InvalidInputError, match=r"unknown options \['max_new_token'\]"):
        neoxfuse.hf.generate(hf_model, ids, max_new_token=6)
    # What a generation_config passed in leaves unset comes from the model's (here: its eos token).
    eos = int(want[0, -2])
    monkeypatch.setattr(hf_model.generation_config, "eos_token_id", eos)
    passed = GenerationConfig(max_new_tokens=6, do_sample=False)
    got = neoxfuse.hf.generate(hf_model, ids, generation_config=passed)
    assert got.tolist() == hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=passed).tolist()
    assert got.shape[1] < want.shape[1]
    # A checkpoint's generation config that model.generate would follow is refused, not ignored ...
    monkeypatch.setattr(hf_model.generation_config, "num_beams", 3)
    with pytest.raises(InvalidInputError, match=r"num_beams=3 \(set in the generation config\)"):
        neoxfuse.hf.generate(hf_model, ids, max_new_tokens=6)
    # ... unless the call sets it back to where it changes nothing.
    assert neoxfuse.hf.generate(hf_model, ids, max_new_tokens=6, num_beams=1).tolist() == got.tolist()
    assert neoxfuse.hf.generate(hf_model, ids, generation_config=GenerationConfig(max_new_tokens=6, num_beams=1)
                                ).tolist() == got.tolist()


def test_hf_generate_holds_eos_back_and_suppresses_tokens_as_model_generate_does(hf_model, monkeypatch):
    # The eos is a token greedy decoding makes early on (the 3rd and again later); min_new_tokens and
    # min_length (counting the prompt) keep it back for that many new tokens, past a decode chunk
    # of 32 too; suppress_tokens never lets it (or another) come. model.generate's tokens each time.
    ids = torch.tensor([[5, 6, 7]])
    greedy = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": 60}
    plain = hf_model.generate(ids, eos_token_id=None, **greedy)[0, 3:].tolist()
    eos = plain[2]
    for options, eos_third in [({"min_new_tokens": 2}, True), ({"min_new_tokens": 3}, False), ({"min_new_tokens": 40}, False),
                               ({"min_length": 3 + 35}, False), ({"min_new_tokens": 2, "min_length": 3 + 12}, True),  # the first wins
                               ({"suppress_tokens": [eos, plain[0]]}, False),
                               ({"bad_words_ids": [[plain[0]], [plain[3]]]}, False),
                               ({"bad_words_ids": [[eos], [plain[4]]]}, True),  # an eos is no bad word
                               ({"begin_suppress_tokens": [plain[0], plain[3]]}, False),  # the first new token only
                               ({"begin_suppress_tokens": [plain[1]], "min_new_tokens": 2}, True)]:
        want = hf_model.generate(ids, eos_token_id=eos, **greedy, **options)
        got = neoxfuse.hf.generate(hf_model, ids, eos_token_id=eos, **greedy, **options)
        assert got.tolist() == want.tolist(), options
        assert bool(want[0, 5] == eos) == eos_third
    for bad, message in [([3], "bad_words_ids must be a list of token id lists"), ([[]], "list of token id lists"),
                         ([[3, 2.5]], "list of token id lists"), ([[3, hf_model.config.vocab_size]], r"token ids in \[0, ")]:
        with pytest.raises(InvalidInputError, match=message):
            neoxfuse.hf.generate(hf_model, ids, bad_words_ids=bad, **greedy)
    begun = neoxfuse.hf.generate(hf_model, ids, eos_token_id=None, begin_suppress_tokens=[plain[0]], **greedy)[0, 3:].tolist()
    assert begun[0] != plain[0]
    assert neoxfuse.hf.generate(hf_model, ids, eos_token_id=None, begin_suppress_tokens=[plain[1]], **greedy)[0, 3:].tolist() == plain
    assert neoxfuse.hf.generate(hf_model, ids, eos_token_id=None, suppress_tokens=[plain[1]], **greedy)[0, 3:].tolist() != plain
    with pytest.raises(InvalidInputError, match="begin_suppress_tokens must be a collection of token ids"):
        neoxfuse.hf.generate(hf_model, ids, begin_suppress_tokens=3, **greedy)
    monkeypatch.setattr(hf_model.generation_config, "min_new_tokens", 4)
    assert neoxfuse.hf.generate(hf_model, ids, eos_token_id=eos, **greedy).tolist() == hf_model.generate(
        ids, eos_token_id=eos, **greedy).tolist()


def test_hf_generate_returns_the_logits_and_scores_model_generate_returns(hf_model):
    # Greedy with every processor (penalty, n-gram ban, eos held back, suppressed tokens) over 40
    # tokens: model.generate's sequences, logits and scores, and so its transition scores.
    ids = torch.tensor([[5, 6, 7]])
    asked = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True, "attention_mask": torch.ones_like(ids)}
    plain = hf_model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=None)[0, 3:].tolist()
    greedy = {"do_sample": False, "max_new_tokens": 40, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 4,
              "eos_token_id": plain[2], "begin_suppress_tokens": [plain[0]], "suppress_tokens": [plain[5]]}
    want = hf_model.generate(ids, **greedy, **asked)
    got = neoxfuse.hf.generate(hf_model, ids, **greedy, **asked)
    assert isinstance(got, GenerateDecoderOnlyOutput) and got.sequences.tolist() == want.sequences.tolist()
    assert len(got.logits) == len(got.scores) == len(want.scores) == got.sequences.shape[1] - 3 > 8
    torch.testing.assert_close(torch.cat(got.logits), torch.cat(want.logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(got.scores), torch.cat(want.scores), rtol=1e-5, atol=1e-5)  # the -inf where HF's
    assert not torch.equal(torch.cat(got.scores), torch.cat(got.logits))
    torch.testing.assert_close(hf_model.compute_transition_scores(got.sequences, got.scores, normalize_logits=True),
                               hf_model.compute_transition_scores(want.sequences, want.scores, normalize_logits=True))
    # Sampled: the first token's scores (from the prompt alone) are HF's, through temperature and every filter.
    for rule in [{"top_k": 20, "top_p": 0.8}, {"top_k": 0, "min_p": 0.05, "typical_p": 0.7, "eta_cutoff": 1e-3, "repetition_penalty": 0.8}]:
        sampled = {"do_sample": True, "temperature": 0.7, "max_new_tokens": 3, **rule}
        want = hf_model.generate(ids, **sampled, **asked)
        got = neoxfuse.hf.generate(hf_model, ids, seed=1, **sampled, **asked)
        torch.testing.assert_close(got.scores[0], want.scores[0], rtol=1e-5, atol=1e-5)
        assert 1 < int(got.scores[0].isfinite().sum()) < hf_model.config.vocab_size
    only = neoxfuse.hf.generate(hf_model, ids, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
    assert only.scores is None and len(only.logits) == 3 and only.past_key_values is None
    assert isinstance(neoxfuse.hf.generate(hf_model, ids, max_new_tokens=3, output_scores=True), torch.Tensor)  # as model.generate
    assert isinstance(neoxfuse.hf.generate(hf_model, ids, max_new_tokens=3, output_attentions=True), torch.Tensor)
    with pytest.raises(InvalidInputError, match="output_attentions with return_dict_in_generate: neoxfuse.hf.generate returns"):
        neoxfuse.hf.generate(hf_model, ids, max_new_tokens=3, return_dict_in_generate=True, output_attentions=True)


def test_hf_generate_makes_num_return_sequences_drawn_with_successive_seeds(hf_model, engine):
    # Sequence i is the one sequence of seed + i (wrapping past 2^63 - 1), as Engine.generate draws
    # it; those that end early (at eos, or at a stop string with an eos to pad with) are padded to
    # the longest as model.generate pads them: with pad_token_id, else the first eos.
    ids, tokenizer = torch.tensor([[5, 6, 7]]), _byte_bpe_tokenizer(hf_model.config.vocab_size)
    sampled = {"do_sample": True, "top_k": 0, "max_new_tokens": 12}
    seeds = (2**63 - 1, 0, 1)
    plain = [engine.generate([5, 6, 7], 12, SamplingParams(temperature=1.0, seed=seed)).tokens for seed in seeds]
    got = neoxfuse.hf.generate(hf_model, ids, num_return_sequences=3, eos_token_id=None, seed=seeds[0], **sampled)
    assert got.tolist() == [[5, 6, 7, *tokens] for tokens in plain] and len({tuple(tokens) for tokens in plain}) == 3
    eos = next(token for token in plain[1][1:] if token not in plain[1][:1])  # ends the second sequence early
    stop = next(text for text in map(tokenizer.decode, [[token] for token in plain[0][1:]]) if text.isascii() and text.strip())
    cases = []
    for pad, options in [(eos, {}), (1, {"pad_token_id": 1}), (eos, {"stop_strings": stop, "tokenizer": tokenizer})]:
        options = {**sampled, "eos_token_id": [eos, 2], **options}
        ones = [neoxfuse.hf.generate(hf_model, ids, seed=seed, **options)[0, 3:].tolist() for seed in seeds]
        cases.append(ones)
        assert min(map(len, ones)) < 12 and max(map(len, ones)) == 12
        width = max(map(len, ones))
        got = neoxfuse.hf.generate(hf_model, ids, num_return_sequences=3, seed=seeds[0], **options)
        assert got.tolist() == [[5, 6, 7, *tokens, *[pad] * (width - len(tokens))] for tokens in ones]
    assert cases[2] != cases[0]  # the stop string ended a sequence too
    for options, message in [({"do_sample": False}, "num_return_sequences > 1 needs do_sample=True"),
                             ({"streamer": TextStreamer(tokenizer)}, "a streamer takes one sequence"),
                             ({"return_dict_in_generate": True, "output_scores": True}, "output_scores and output_logits come with one"),
                             ({"stop_strings": "w3", "tokenizer": tokenizer, "eos_token_id": None}, "stop_strings with more than one"),
                             ({"num_return_sequences": 0}, "num_return_sequences must be an integer >= 1, got 0")]:
        with pytest.raises(InvalidInputError, match=message):
            neoxfuse.hf.generate(hf_model, ids, **{**sampled, "num_return_sequences": 2, **options})


def test_hf_generate_decodes_a_left_padded_batch_row_by_row_as_model_generate_does(hf_model, engine, word_tokenizer):
    # model.generate decodes the rows together, neoxfuse one after another without their padding:
    # the same tokens, and the same padding (on the left as given; on the right, with pad_token_id,
    # after the rows that end early at eos).
    tokenizer = word_tokenizer(hf_model.config.vocab_size)
    tokenizer.padding_side, tokenizer.pad_token = "left", "w3"
    batch = tokenizer(["hello world w7 w9", "w5", "w8 w30 w4"], padding=True, return_tensors="pt")  # [3, 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]]
    greedy = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 3}
    plain = hf_model.generate(**batch, **greedy, eos_token_id=None)
    assert neoxfuse.hf.generate(hf_model, **batch, **greedy, eos_token_id=None).tolist() == plain.tolist()
    eos = int(plain[1, 4 + 5])  # ends the second row early (and maybe others)
    want = hf_model.generate(**batch, **greedy, eos_token_id=eos)
    got = neoxfuse.hf.generate(hf_model, **batch, **greedy, eos_token_id=eos)
    assert got.tolist() == want.tolist() and (got[1, 4 + 6 :] == 3).all() and got.shape[1] > 4 + 6
    # A stop string is matched in each row as model.generate matches it: here one that begins in the
    # last row's prompt and ends in its first new token.
    bpe = _byte_bpe_tokenizer(hf_model.config.vocab_size)
    ids, mask = torch.tensor([[70, 71, 72, 73], [0, 0, 74, 75], [0, 80, 81, 82]]), batch["attention_mask"]  # "pqr" then "2"
    plain = hf_model.generate(ids, attention_mask=mask, **greedy, eos_token_id=None)
    stop = bpe.decode([82]) + bpe.decode(plain[2, 4:5])
    want = hf_model.generate(ids, attention_mask=mask, **greedy, eos_token_id=2, stop_strings=stop, tokenizer=bpe)
    got = neoxfuse.hf.generate(hf_model, ids, mask, **greedy, eos_token_id=2, stop_strings=stop, tokenizer=bpe)
    assert got.tolist() == want.tolist() and (got[2, 5:] == 3).all()
    # Sampled: sequence i (of prompt i // R) drawn with seed + i, as Engine.generate draws it.
    sampled = {"max_new_tokens": 6, "do_sample": True, "top_k": 0, "eos_token_id": None}
    got = neoxfuse.hf.generate(hf_model, **batch, **sampled, num_return_sequences=2, seed=5)
    prompts = [row[kept.bool()].tolist() for row, kept in zip(batch["input_ids"], batch["attention_mask"])]
    assert got[:, 4:].tolist() == [engine.generate(prompts[i // 2], 6, SamplingParams(temperature=1.0, seed=5 + i)).tokens
                                   for i in range(6)]
    assert got[:, :4].tolist() == batch["input_ids"].repeat_interleave(2, dim=0).tolist()
    for options, message in [({"streamer": TextStreamer(tokenizer)}, "a streamer takes one sequence"),
                             ({"return_dict_in_generate": True, "output_logits": True}, "output_scores and output_logits come with one"),
                             ({"stopping_criteria": [lambda ids, scores: ids[:, -1] == 5]}, "stopping_criteria come with one sequence")]:
        with pytest.raises(InvalidInputError, match=message):
            neoxfuse.hf.generate(hf_model, **batch, **greedy, **options)


def test_hf_generate_biases_sequences_as_model_generate_does(hf_model):
    # One-token biases (OpenAI's logit_bias) and a two-token one that fires only after its first token,
    # with a repetition penalty after them, in both of transformers' forms: its tokens and scores.
    ids = torch.tensor([[5, 6, 7]])
    asked = {"return_dict_in_generate": True, "output_scores": True, "attention_mask": torch.ones_like(ids), "eos_token_id": None}
    plain = hf_model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None)[0, 3:].tolist()
    for bias in [{(plain[1],): -8.0, (plain[4],): 3.0}, [[[plain[0], 9], 6.0], [[11], 2.5]]]:
        greedy = {"do_sample": False, "max_new_tokens": 12, "sequence_bias": bias, "repetition_penalty": 1.2}
        want = hf_model.generate(ids, **greedy, **asked)
        got = neoxfuse.hf.generate(hf_model, ids, **greedy, **asked)
        assert got.sequences.tolist() == want.sequences.tolist() and got.sequences[0, 3:].tolist() != plain
        torch.testing.assert_close(torch.cat(got.scores), torch.cat(want.scores), rtol=1e-5, atol=1e-5)
    assert got.sequences[0, 4] == 9  # the bias of (plain[0], 9) fired after plain[0]
    with pytest.raises(InvalidInputError, match="sequence_bias's biases must be finite numbers"):
        neoxfuse.hf.generate(hf_model, ids, sequence_bias={(3,): float("nan")}, max_new_tokens=2)


@pytest.mark.parametrize("presence, frequency", [(-1.5, 0.6), (2.0, 0.0), (0.0, 1.0)])
def test_presence_and_frequency_penalties_count_the_generated_tokens_only(hf_model, engine, presence, frequency):
    # OpenAI's formula, as vLLM applies it, over HF's logits of the sequence so far: z - f c - a [c > 0],
    # c counting the new tokens (the first, from the prefill, too; the prompt's not), greedy, over
    # more than one decode chunk; and the scores each token was chosen from. The prompt ends with
    # the model's own greedy text, whose tokens it would choose again.
    prompt = [5, 6, 7, *engine.generate([5, 6, 7], 8).tokens]
    got = engine.generate(prompt, 40, SamplingParams(presence_penalty=presence, frequency_penalty=frequency), keep_scores=True)
    tokens, counts, scores = list(prompt), torch.zeros(hf_model.config.vocab_size), []
    with torch.no_grad():
        for _ in range(40):
            logits = hf_model(torch.tensor([tokens])).logits[0, -1].float()  # [vocab]
            scores.append(logits - frequency * counts - presence * (counts > 0).float())
            tokens.append(int(scores[-1].argmax()))
            counts[tokens[-1]] += 1
    assert got.tokens == tokens[len(prompt):]
    assert got.tokens != engine.generate(prompt, 40).tokens  # the penalties changed the choices
    torch.testing.assert_close(got.scores, torch.stack(scores), rtol=1e-5, atol=1e-5)


def test_engine_holds_the_stop_tokens_back_for_min_new_tokens(engine):
    plain = engine.generate([3, 4], 70).tokens
    stop = plain[1]
    assert engine.generate([3, 4], 70, stop_token_ids=stop).tokens == plain[:2]
    held = engine.generate([3, 4], 70, stop_token_ids=stop, min_new_tokens=45)
    assert stop not in held.tokens[:45] and held.tokens[0] == plain[0]
    want = engine.generate([3, 4], 70, SamplingParams(suppress_tokens={stop})).tokens[:45]  # the same rule, chosen alone
    assert held.tokens[:45] == want
    sampled = SamplingParams(temperature=1.0, seed=3)
    tokens = engine.generate([3, 4], 70, sampled, stop_token_ids=range(0, 512, 2), min_new_tokens=50).tokens
    assert len(tokens) > 50 and all(t % 2 for t in tokens[:50]) and tokens[-1] % 2 == 0  # then the first even id ends it
    assert engine.generate([3, 4], 70, stop_token_ids=plain[0], min_new_tokens=1).tokens[0] != plain[0]  # the prefill's choice too
    assert engine.generate([3, 4], 70, stop_token_ids=stop, min_new_tokens=2).tokens[:2] == [plain[0], want[1]]  # the last one held
    assert engine.generate([3, 4], 5, stop_token_ids=[10**6], min_new_tokens=3).tokens == plain[:5]  # past the vocabulary
    for bad in (-1, 2.5, True):
        with pytest.raises(InvalidInputError, match="min_new_tokens must be an integer >= 0"):
            engine.generate([3, 4], 5, min_new_tokens=bad)


def test_hf_generate_takes_an_option_given_as_none_as_transformers_default(hf_model, engine, monkeypatch):
    # model.generate(eos_token_id=None) has no eos, whatever the generation config says; top_k=None
    # is transformers' 50, not the config's 20.
    ids = torch.tensor([[5, 6, 7]])
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 30, "do_sample": False}
    plain = hf_model.generate(ids, eos_token_id=None, **greedy)
    monkeypatch.setattr(hf_model.generation_config, "eos_token_id", int(plain[0, 5]))  # the 3rd new token
    assert hf_model.generate(ids, **greedy).shape[1] == 6 and neoxfuse.hf.generate(hf_model, ids, **greedy).shape[1] == 6
    assert neoxfuse.hf.generate(hf_model, ids, eos_token_id=None, **greedy).tolist() == plain.tolist()
    monkeypatch.setattr(hf_model.generation_config, "top_k", 20)
    got = neoxfuse.hf.generate(hf_model, ids, max_new_tokens=12, do_sample=True, top_k=None, seed=9, eos_token_id=None)
    assert got[0, 3:].tolist() == engine.generate([5, 6, 7], 12, SamplingParams(temperature=1.0, top_k=50, seed=9)).tokens


def test_hf_generate_applies_a_repetition_penalty_as_model_generate_does(hf_model, engine, monkeypatch):
    # Greedy: model.generate's tokens, whether the call or the generation config sets the penalty;
    # the random model repeats itself, so the penalty changes them. Sampled: the Engine's draws.
    ids = torch.tensor([[5, 6, 7, 5]])
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 40, "do_sample": False, "eos_token_id": None}
    plain = hf_model.generate(ids, **greedy)
    for penalty in (1.3, 0.7):
        want = hf_model.generate(ids, repetition_penalty=penalty, **greedy)
        assert want.tolist() != plain.tolist()
        assert neoxfuse.hf.generate(hf_model, ids, repetition_penalty=penalty, **greedy).tolist() == want.tolist()
    monkeypatch.setattr(hf_model.generation_config, "repetition_penalty", 1.3)
    assert neoxfuse.hf.generate(hf_model, ids, **greedy).tolist() == hf_model.generate(ids, **greedy).tolist()
    sampled = {"max_new_tokens": 12, "do_sample": True, "top_k": 0, "seed": 4, "eos_token_id": ()}
    got = neoxfuse.hf.generate(hf_model, ids, repetition_penalty=0.3, **sampled)  # the call's penalty over the config's
    rule = SamplingParams(temperature=1.0, seed=4, repetition_penalty=0.3)
    assert got[0, 4:].tolist() == engine.generate([5, 6, 7, 5], 12, rule).tokens
    assert got.tolist() != neoxfuse.hf.generate(hf_model, ids, repetition_penalty=1.0, **sampled).tolist()


def test_hf_generate_bans_repeated_ngrams_and_bad_sequences_as_model_generate_does(hf_model, engine, monkeypatch):
    # The random model repeats itself within 60 greedy tokens (two decode chunks), so n-gram bans
    # and bad sequences taken from its own output change the tokens: model.generate's each time,
    # whether the call or the generation config sets them. Sampled: the Engine's draws.
    ids = torch.tensor([[5, 6, 7, 5]])
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 60, "do_sample": False, "eos_token_id": None}
    plain = hf_model.generate(ids, **greedy)[0].tolist()
    new = plain[4:]
    bad_words = [[7, 5, new[0]], [new[3], new[4]], [new[40], new[41], new[42]], [new[10]]]  # one across the prompt's end
    for options in [{"no_repeat_ngram_size": 1}, {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 3},
                    {"bad_words_ids": bad_words}, {"bad_words_ids": bad_words, "no_repeat_ngram_size": 4, "repetition_penalty": 0.8}]:
        want = hf_model.generate(ids, **greedy, **options)
        assert want[0].tolist() != plain, options
        assert neoxfuse.hf.generate(hf_model, ids, **greedy, **options).tolist() == want.tolist(), options
    monkeypatch.setattr(hf_model.generation_config, "no_repeat_ngram_size", 2)
    monkeypatch.setattr(hf_model.generation_config, "bad_words_ids", bad_words[:2])
    assert neoxfuse.hf.generate(hf_model, ids, **greedy).tolist() == hf_model.generate(ids, **greedy).tolist()
    sampled = {"max_new_tokens": 40, "do_sample": True, "top_k": 0, "seed": 4, "eos_token_id": (), "repetition_penalty": 0.3}
    got = neoxfuse.hf.generate(hf_model, ids, no_repeat_ngram_size=3, bad_words_ids=[[5, 6]], **sampled)  # the call's over the config's
    rule = SamplingParams(temperature=1.0, seed=4, repetition_penalty=0.3, no_repeat_ngram_size=3, bad_sequences={(5, 6)})
    assert got[0, 4:].tolist() == engine.generate([5, 6, 7, 5], 40, rule).tokens
    unbanned = neoxfuse.hf.generate(hf_model, ids, no_repeat_ngram_size=0, bad_words_ids=None, **sampled)
    assert got.tolist() != unbanned.tolist()
    grams = [tuple(got[0, i : i + 3].tolist()) for i in range(got.shape[1] - 2)]
    assert len(set(grams)) == len(grams) and (5, 6) not in zip(got[0, 3:].tolist(), got[0, 4:].tolist())
    # min_p (sampled only): the Engine's draws with it, and none of the generation config's bans.
    sampled |= {"no_repeat_ngram_size": 0, "bad_words_ids": None}
    min_p = neoxfuse.hf.generate(hf_model, ids, min_p=0.2, **sampled)
    assert min_p[0, 4:].tolist() == engine.generate([5, 6, 7, 5], 40, SamplingParams(temperature=1.0, seed=4, repetition_penalty=0.3,
                                                                                     min_p=0.2)).tokens
    assert min_p.tolist() != neoxfuse.hf.generate(hf_model, ids, **sampled).tolist()
    assert neoxfuse.hf.generate(hf_model, ids, min_p=0.2, **greedy).tolist() == hf_model.generate(ids, min_p=0.2, **greedy).tolist()  # greedy: no effect
    # The filters after top-p (sampled only): the Engine's draws with them, and each changes them.
    filters = [{"top_p": 0.9, "min_p": 0.05}, {"typical_p": 0.8}, {"epsilon_cutoff": 3e-3}, {"eta_cutoff": 3e-3}]
    for options in filters:
        got = neoxfuse.hf.generate(hf_model, ids, **options, **sampled)
        rule = SamplingParams(temperature=1.0, seed=4, repetition_penalty=0.3, **options)
        assert got[0, 4:].tolist() == engine.generate([5, 6, 7, 5], 40, rule).tokens, options
        assert got.tolist() != neoxfuse.hf.generate(hf_model, ids, **sampled).tolist(), options
    # ... from the generation config too.
    filters = {name: value for options in filters for name, value in options.items()}
    got = neoxfuse.hf.generate(hf_model, ids, **filters, **sampled)
    for name, value in filters.items():
        monkeypatch.setattr(hf_model.generation_config, name, value)
    assert neoxfuse.hf.generate(hf_model, ids, **sampled).tolist() == got.tolist()
    assert neoxfuse.hf.generate(hf_model, ids, **greedy).tolist() == hf_model.generate(ids, **greedy).tolist()  # greedy: no effect
    for bad in (-1, 2.5):
        with pytest.raises(InvalidInputError, match="no_repeat_ngram_size must be an integer >= 0"):
            neoxfuse.hf.generate(hf_model, ids, no_repeat_ngram_size=bad, **greedy)


def _byte_bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as GPT-NeoX's is (its tokens' text is what StopStringCriteria reads),
    trained here on a little text: the 256 bytes, "<|endoftext|>" and merges, up to vocab_size ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog, then the dog sleeps"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_hf_generate_ends_at_stop_strings_as_model_generate_does(hf_model, engine):
    # transformers' StopStringCriteria on both sides: a stop string that is a whole new token's text,
    # the first of two, one that ends inside a token, one that begins in the prompt, one that never comes.
    tokenizer = _byte_bpe_tokenizer(hf_model.config.vocab_size)
    ids = torch.tensor([[70, 71, 72]])  # the texts of byte tokens
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 40, "do_sample": False, "eos_token_id": None}
    plain = hf_model.generate(ids, **greedy)[0, 3:].tolist()
    texts = [tokenizer.decode([token]) for token in plain]
    prompt_text = tokenizer.decode(ids[0])
    first, second = [i for i, text in enumerate(texts) if text.isascii() and text.strip()][:2]  # no partial UTF-8
    ends = []
    for stops in [texts[first], [texts[second], "zzz"], texts[second][:1], prompt_text[-1] + texts[0][:1], "never"]:
        want = hf_model.generate(ids, stop_strings=stops, tokenizer=tokenizer, **greedy)
        assert neoxfuse.hf.generate(hf_model, ids, stop_strings=stops, tokenizer=tokenizer, **greedy).tolist() == want.tolist(), stops
        ends.append(want.shape[1] - 3)
    assert ends[0] <= first + 1 and ends[1] <= second + 1 and ends[3] == 1 and ends[-1] == 40
    with pytest.raises(InvalidInputError, match="stop_strings are matched in text: pass the model's tokenizer"):
        neoxfuse.hf.generate(hf_model, ids, stop_strings="w5", **greedy)
    with pytest.raises(InvalidInputError, match="stop_when must be a function of the new tokens"):
        engine.generate([5, 6], 4, stop_when=3)


def test_hf_generate_ends_where_stopping_criteria_say_as_model_generate_does(hf_model):
    # A criterion of the whole sequence (the sum of its last two tokens past a bound: it sees the
    # prompt's last token too), another of its length, and one that never stops, called as
    # model.generate calls them: ends after the first token where one is true, past a decode chunk too.
    ids = torch.tensor([[5, 6, 7]])
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 60, "do_sample": False, "eos_token_id": None}
    plain = hf_model.generate(ids, **greedy)[0].tolist()
    bound = sorted(a + b for a, b in itertools.pairwise(plain[2:]))[-3]  # reached by the third largest pair

    class PairSum(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            assert input_ids.dtype == ids.dtype and input_ids.device == ids.device
            return input_ids[:, -2:].sum(dim=1) >= bound

    seen = []

    def length(input_ids, scores):  # a plain function
        return torch.tensor([input_ids.shape[1] >= 3 + 45])

    def never(input_ids, scores):
        seen.append(input_ids.shape[1])
        return torch.tensor([False])

    ends = []
    for criteria in [[PairSum()], StoppingCriteriaList([length, never]), [never, PairSum()], []]:
        want = hf_model.generate(ids, stopping_criteria=StoppingCriteriaList(criteria), **greedy)
        assert neoxfuse.hf.generate(hf_model, ids, stopping_criteria=criteria, **greedy).tolist() == want.tolist()
        ends.append(want.shape[1] - 3)
    assert ends[0] == ends[2] < 60 and ends[1] == 45 and ends[3] == 60 and 3 + 45 in seen
    with pytest.raises(InvalidInputError, match="stopping_criteria must be a list of transformers' StoppingCriteria, got 3"):
        neoxfuse.hf.generate(hf_model, ids, stopping_criteria=3, **greedy)
    with pytest.raises(InvalidInputError, match="stopping_criteria come with one sequence here"):
        neoxfuse.hf.generate(hf_model, ids, stopping_criteria=[PairSum()], num_return_sequences=2, do_sample=True,
                             max_new_tokens=8, eos_token_id=None)


def test_new_tokens_stream_in_order_and_stop_at_the_stop_token(engine):
    batches = []
    out = engine.generate([3, 4], 70, on_tokens=batches.append)
    assert [len(b) for b in batches] == [1, 32, 32, 5]  # the first token, then chunks of DECODE_CHUNK steps
    assert [t for b in batches for t in b] == out.tokens
    stop = out.tokens[40]
    batches.clear()
    stopped = engine.generate([3, 4], 70, stop_token_ids=(stop,), on_tokens=batches.append)
    assert [t for b in batches for t in b] == stopped.tokens and stopped.tokens[-1] == stop


def test_hf_generate_feeds_a_streamer_as_model_generate_does(hf_model, capsys, word_tokenizer):
    # HF's TextStreamer prints the same text for model.generate and neoxfuse.hf.generate, and a
    # recording streamer sees the prompt, then the new tokens, then end().
    tokenizer = word_tokenizer(hf_model.config.vocab_size)
    ids = torch.tensor([[7, 8, 9]])
    greedy = {"max_new_tokens": 40, "do_sample": False, "eos_token_id": None}
    want = hf_model.generate(ids, attention_mask=torch.ones_like(ids), streamer=TextStreamer(tokenizer, skip_prompt=True), **greedy)
    printed_by_hf = capsys.readouterr().out
    got = neoxfuse.hf.generate(hf_model, ids, streamer=TextStreamer(tokenizer, skip_prompt=True), eos_token_id=(),
                               max_new_tokens=40)
    assert got.tolist() == want.tolist()
    assert capsys.readouterr().out == printed_by_hf and printed_by_hf.strip()

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    recorder = Recorder()
    neoxfuse.hf.generate(hf_model, ids, streamer=recorder, eos_token_id=(), max_new_tokens=40)
    assert recorder.puts[0] == ids.tolist() and recorder.ended == 1
    assert [t for put in recorder.puts[1:] for t in put[0]] == got[0, 3:].tolist()


def test_a_patched_model_generate_runs_transformers_pipelines_on_the_engine(hf_model, word_tokenizer, monkeypatch):
    # transformers' text-generation pipeline calls model.generate itself: patched, the Engine makes
    # the text (one Engine.generate per call) and it is HF's; unpatched, HF makes it again.
    model = copy.deepcopy(hf_model)  # patched in place
    tokenizer = word_tokenizer(model.config.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    tokenizer.padding_side, tokenizer.pad_token = "left", "w3"
    prompts = ["hello world w5", [{"role": "user", "content": "hello w9 world"}]]  # text, and a chat's messages
    batch = ["w9 w10 w11 w12", "hello", "w7 w8"]  # batched by two (left padded), decoded row by row
    want = [pipe(prompt, max_new_tokens=12, do_sample=False) for prompt in prompts]
    want_batched = pipe(batch, batch_size=2, max_new_tokens=12, do_sample=False)
    runs = []
    engine_generate = Engine.generate

    def counted(self, *args, **kwargs):
        runs.append(self)
        return engine_generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counted)
    assert neoxfuse.hf.patch_generate(model) is model
    assert [pipe(prompt, max_new_tokens=12, do_sample=False) for prompt in prompts] == want
    assert pipe(batch, batch_size=2, max_new_tokens=12, do_sample=False) == want_batched
    assert len(runs) == 5 and runs[0].backend_name == "reference"
    assert neoxfuse.hf.unpatch_generate(model) is model and "generate" not in vars(model)
    assert pipe(prompts[0], max_new_tokens=12, do_sample=False) == want[0] and len(runs) == 5


def test_a_patched_model_generate_takes_model_generates_arguments(hf_model):
    model = neoxfuse.hf.patch_generate(copy.deepcopy(hf_model))
    ids = torch.tensor([[5, 6, 7]])
    greedy = {"max_new_tokens": 6, "do_sample": False}
    want = hf_model.generate(ids, attention_mask=torch.ones_like(ids), **greedy).tolist()
    assert model.generate(ids, **greedy).tolist() == want
    assert model.generate(inputs=ids, **greedy).tolist() == want
    assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **greedy).tolist() == want
    assert model.generate(ids, GenerationConfig(**greedy)).tolist() == want  # generation_config, second as in HF
    # No inputs: the sequence starts with the bos token, as model.generate starts it.
    assert model.generate(**greedy).tolist() == hf_model.generate(**greedy).tolist()
    assert model.generate(**greedy, bos_token_id=9).tolist() == hf_model.generate(**greedy, bos_token_id=9).tolist()
    # model.generate's own arguments: taken where they change nothing, refused elsewhere.
    nothing = {"logits_processor": LogitsProcessorList(), "prefix_allowed_tokens_fn": None, "synced_gpus": False,
               "assistant_model": None}
    assert model.generate(ids, **greedy, **nothing).tolist() == want
    for name, value in [("logits_processor", LogitsProcessorList([TemperatureLogitsWarper(0.5)])),
                        ("prefix_allowed_tokens_fn", lambda batch, ids: [1]), ("assistant_model", hf_model)]:
        with pytest.raises(InvalidInputError, match=f"model.generate's {name} is not implemented by neoxfuse.hf.generate"):
            model.generate(ids, **greedy, **{name: value})
    with pytest.raises(InvalidInputError, match="model.generate got both inputs and input_ids: pass one of them"):
        model.generate(ids, input_ids=ids, **greedy)
    with pytest.raises(InvalidInputError, match="no input_ids and no bos_token_id to start from"):
        model.generate(**greedy, bos_token_id=None)
    with pytest.raises(UnsupportedModelError, match="patch_generate takes a GPTNeoXForCausalLM, got LlamaForCausalLM"):
        neoxfuse.hf.patch_generate(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                                                num_attention_heads=2, vocab_size=16)))
    twin = copy.deepcopy(model)  # a copy's patched generate decodes the copy
    assert twin.generate.__self__ is twin and twin.generate(ids, **greedy).tolist() == want
    assert neoxfuse.hf.unpatch_generate(neoxfuse.hf.patch_generate(model)) is model and "generate" not in vars(model)


def test_text_prompts_use_the_checkpoints_tokenizer(hf_model, tmp_path, word_tokenizer):
    hf_model.save_pretrained(tmp_path)
    tokenizer = word_tokenizer(hf_model.config.vocab_size)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine(tmp_path, device="cpu")
    assert engine.tokenizer is not None
    out = engine.generate("hello world", 6)
    assert out.prompt_tokens == [1, 2]
    assert out.tokens == engine.generate([1, 2], 6).tokens
    assert out.text == tokenizer.decode(out.tokens) and out.text.startswith("w")


def test_the_end_of_text_tokens_are_the_tokenizers_and_the_generation_configs(hf_model, tmp_path, word_tokenizer):
    # A chat model's generation_config.json may list its end-of-turn token beside the end-of-text one.
    hf_model.save_pretrained(tmp_path)
    word_tokenizer(hf_model.config.vocab_size).save_pretrained(tmp_path)  # its eos: id 0
    config = tmp_path / "generation_config.json"
    for eos, want in [([7, 9], {0, 7, 9}), (5, {0, 5}), (None, {0}), ([3, 10**6], {0, 3})]:  # ids past the vocabulary: none
        config.write_text(json.dumps({"eos_token_id": eos}))
        assert Engine(tmp_path, device="cpu").eos_token_ids == want
    config.unlink()
    assert Engine(tmp_path, device="cpu").eos_token_ids == {0}
    for text, message in [("[7, 9", "is not a JSON object"), ("[7]", "is not a JSON object"),
                          ('{"eos_token_id": "7"}', "eos_token_id must be a token id or a list of them, got '7'")]:
        config.write_text(text)
        with pytest.raises(InvalidInputError, match=message):
            Engine(tmp_path, device="cpu")
    model = copy.deepcopy(hf_model)
    model.generation_config.eos_token_id = [4, 6]
    assert Engine(model, device="cpu").eos_token_ids == {4, 6} and Engine("tiny", device="cpu").eos_token_ids == frozenset()


def test_text_prompt_without_tokenizer_is_a_clear_error(engine):
    with pytest.raises(InvalidInputError, match="needs a tokenizer"):
        engine.generate("hello", 4)


def test_generation_stops_after_a_stop_token(engine):
    full = engine.generate([3, 4, 5], 16).tokens
    stop = full[5]
    first = full.index(stop)
    for stop_token_ids in ({stop}, [stop, stop], stop, torch.tensor([stop]), np.array([stop])):  # one id or many, any form
        assert engine.generate([3, 4, 5], 16, stop_token_ids=stop_token_ids).tokens == full[: first + 1]


@pytest.mark.parametrize("stop_token_ids", [[2.0], ["2"], [True], True, None, "2", torch.tensor([2.0])])
def test_stop_token_ids_that_would_never_stop_are_refused(engine, stop_token_ids):
    with pytest.raises(InvalidInputError, match="stop_token_ids must be token ids"):
        engine.generate([3, 4, 5], 4, stop_token_ids=stop_token_ids)


def _first_prefix_with(words: list[str], text: str) -> int:
    """The number of leading words whose space-joined text first contains `text`."""
    return next(n for n in range(1, len(words) + 1) if text in " ".join(words[:n]))


@pytest.mark.parametrize("chunk", [32, 4, 3])
def test_generation_stops_after_the_token_that_completes_a_stop_string(hf_model, monkeypatch, word_tokenizer, chunk):
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", chunk)  # 4, 3: the string completes in a later chunk, across chunks
    engine = Engine(hf_model, device="cpu", tokenizer=word_tokenizer(hf_model.config.vocab_size))
    full = engine.generate([3, 4, 5], 24)
    words = full.text.split()  # one word per token
    assert len(words) == 24
    for stop, text in [
        (["never", f"{words[8]} {words[9][:2]}"], f"{words[8]} {words[9][:2]}"),  # across two tokens, inside a word
        (f"{words[10]} {words[11]}", f"{words[10]} {words[11]}"),  # one string, not its characters (its "w" is in every word)
        (words[0][1:], words[0][1:]),  # completed by the first token
    ]:
        kept = _first_prefix_with(words, text)
        batches = []
        out = engine.generate([3, 4, 5], 24, stop=stop, on_tokens=batches.append)
        assert out.tokens == full.tokens[:kept] and text in out.text
        assert [t for batch in batches for t in batch] == out.tokens and len(out.decode_ms) == kept - 1
    for token_at, word_at in [(5, 20), (20, 6)]:  # a stop token and a stop string: whichever comes first ends it
        stop_token = full.tokens[token_at]
        want = min(full.tokens.index(stop_token) + 1, _first_prefix_with(words, words[word_at]))
        assert engine.generate([3, 4, 5], 24, stop_token_ids={stop_token}, stop=words[word_at]).tokens == full.tokens[:want]


def test_stop_strings_are_non_empty_text_and_need_a_tokenizer(engine, hf_model, word_tokenizer):
    with pytest.raises(InvalidInputError, match="stop strings are matched in the new text, which needs a tokenizer"):
        engine.generate([3], 4, stop="w1")
    with_tokenizer = Engine(hf_model, device="cpu", tokenizer=word_tokenizer(hf_model.config.vocab_size))
    for stop in ["", ["w1", ""], [5]]:
        with pytest.raises(InvalidInputError, match="stop strings must be non-empty text"):
            with_tokenizer.generate([3], 4, stop=stop)


def _prefilled_lengths(engine: Engine) -> list[int]:
    """Records the number of tokens each of the engine's prefills runs."""
    lengths, prefill = [], engine.backend.prefill

    def recording(tokens, cache):
        lengths.append(len(tokens))
        return prefill(tokens, cache)

    engine.backend.prefill = recording
    return lengths


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.5, seed=3)], ids=["greedy", "sampled"])
def test_a_prefix_cache_prefills_only_what_the_last_generation_did_not_and_changes_no_token(hf_model, engine, sampling):
    cached = Engine(hf_model, device="cpu", prefix_cache=True)
    prefilled = _prefilled_lengths(cached)
    first_prompt = _random_prompt(engine.shape.vocab, 5) + [7, 8]  # [T >= 3]
    first = cached.generate(first_prompt, 10, sampling)
    assert first.reused_tokens == 0 and first.tokens == engine.generate(first_prompt, 10, sampling).tokens

    # The next turn: everything so far, then new tokens. The cache holds all of it but the last new
    # token, which was never fed back.
    turn = first_prompt + first.tokens + [11, 12, 13]
    vocab = engine.shape.vocab
    diverging = first_prompt[:2] + [(first_prompt[2] + 1) % vocab] + first_prompt[3:]
    for prompt, reused in [
        (turn, len(first_prompt) + 9),
        (turn, len(turn) - 1),  # the same prompt again: its last token still runs, its logits choose
        (turn[:5], 4),  # a shorter prompt inside the cache
        (diverging, 2),  # the cache is cut back to where the prompt differs
        ([(first_prompt[0] + 1) % vocab], 0),  # a one-token prompt runs whole
        (turn, 0),  # the cache now starts with another token
    ]:
        prefilled.clear()
        got = cached.generate(prompt, 10, sampling)
        assert (got.reused_tokens, prefilled) == (reused, [len(prompt) - reused])
        assert got.tokens == engine.generate(prompt, 10, sampling).tokens


def test_a_prefix_cache_keeps_no_step_run_after_a_stop_token(hf_model, engine, monkeypatch):
    # With chunks of 8 decode steps, a stop at the second new token leaves seven steps run past it.
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", 8)
    cached = Engine(hf_model, device="cpu", prefix_cache=True)
    prompt = [3, 4, 5]
    full = engine.generate(prompt, 16).tokens
    stopped = cached.generate(prompt, 16, stop_token_ids={full[1]})
    assert stopped.tokens == full[:2]
    turn = prompt + stopped.tokens + [9, 9]
    got = cached.generate(turn, 12)
    assert got.reused_tokens == len(prompt) + len(stopped.tokens) - 1
    assert got.tokens == engine.generate(turn, 12).tokens


def test_a_generation_that_fails_midway_leaves_nothing_to_reuse(hf_model, engine):
    cached = Engine(hf_model, device="cpu", prefix_cache=True)
    first = cached.generate([3, 4, 5, 6], 8)

    def interrupt(tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after its prefill wrote positions 2.. of the cache
        cached.generate([3, 4, 9, 9, 9], 8, on_tokens=interrupt)
    turn = [3, 4, 5, 6] + first.tokens
    got = cached.generate(turn, 8)
    assert got.reused_tokens == 0 and got.tokens == engine.generate(turn, 8).tokens


def test_without_a_prefix_cache_every_prompt_is_prefilled_whole(hf_model):
    engine = Engine(hf_model, device="cpu")
    prefilled = _prefilled_lengths(engine)
    first = engine.generate([3, 4, 5], 6)
    assert engine.generate([3, 4, 5, *first.tokens], 6).reused_tokens == 0
    engine.prefix_cache = True
    first = engine.generate([3, 4, 5], 6)
    assert engine.generate([3, 4, 5, *first.tokens], 6).reused_tokens == 8
    engine.prefix_cache = False
    assert engine.generate([3, 4, 5, *first.tokens], 6).reused_tokens == 0
    assert prefilled == [3, 9, 3, 1, 9]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.5, seed=3)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("stop_at", [None, 2, 4, 6, 13])
def test_decode_chunks_change_nothing_and_stop_at_the_first_stop_token(engine, monkeypatch, sampling, stop_at):
    # Tokens are chosen on the device DECODE_CHUNK at a time; with chunks of 4 a stop token may
    # fall at a chunk's end (index 3), inside one or in a later chunk.
    prompt = _random_prompt(engine.shape.vocab, 3)
    full = engine.generate(prompt, 19, sampling).tokens
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", 4)
    stops = set() if stop_at is None else {full[stop_at]}
    want = full if stop_at is None else full[: full.index(full[stop_at]) + 1]
    out = engine.generate(prompt, 19, sampling, stop_token_ids=stops)
    assert out.tokens == want
    assert len(out.decode_ms) == len(want) - 1


def _hf_logprobs(hf_model, tokens: list[int]) -> torch.Tensor:
    """log softmax of HF's fp32 logits over `tokens`, teacher forced: [T, vocab], row t predicting token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.7, top_k=20, repetition_penalty=0.4, seed=3)],
                         ids=["greedy", "sampled"])
def test_logprobs_are_the_models_where_each_token_was_chosen_before_the_rule(hf_model, engine, monkeypatch, sampling):
    # The first token's come from the prefill, the others from decode steps, 4 to a chunk; all are
    # the model's own log-probabilities, not the rule's (temperature, top-k's -inf, the penalty).
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", 4)
    prompt = [5, 9, 2]
    out = engine.generate(prompt, 11, sampling, logprobs=3)
    want = _hf_logprobs(hf_model, prompt + out.tokens)[len(prompt) - 1 : -1]  # [11, vocab]
    assert [entry.token for entry in out.logprobs] == out.tokens
    for entry, row in zip(out.logprobs, want):
        values, ids = row.topk(3)
        assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-5)
        assert [token for token, _ in entry.top] == ids.tolist()
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    if sampling.greedy:  # the chosen token is the most likely, with the very same number
        assert all(entry.top[0] == (entry.token, entry.logprob) for entry in out.logprobs)
    else:
        assert any(entry.top[0][0] != entry.token for entry in out.logprobs)
    assert engine.generate(prompt, 11, sampling).tokens == out.tokens  # asking for them changes no token


def test_logprobs_stream_before_their_tokens_and_end_with_them(engine, monkeypatch):
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", 4)
    prompt = _random_prompt(engine.shape.vocab, 3)
    full = engine.generate(prompt, 19).tokens
    events = []
    out = engine.generate(prompt, 19, stop_token_ids=[full[6]], logprobs=0, on_tokens=lambda tokens: events.append(("tokens", tokens)),
                          on_logprobs=lambda listed: events.append(("logprobs", [entry.token for entry in listed])))
    assert out.tokens == full[: full.index(full[6]) + 1] and [entry.token for entry in out.logprobs] == out.tokens
    assert all(entry.top == () for entry in out.logprobs)
    batches = 1 + -(-(len(out.tokens) - 1) // 4)  # the first token, then chunks of 4 (the last cut at the stop token)
    assert [kind for kind, _ in events] == ["logprobs", "tokens"] * batches
    assert [tokens for _, tokens in events[0::2]] == [tokens for _, tokens in events[1::2]]


@pytest.mark.parametrize("kwargs, message", [
    ({"logprobs": -1}, "logprobs must be None or an integer from 0 to 20"),
    ({"logprobs": 21}, "from 0 to 20"),
    ({"logprobs": 2.0}, "from 0 to 20"),
    ({"logprobs": True}, "from 0 to 20"),
    ({"on_logprobs": print}, "on_logprobs must be a function of a list of TokenLogprobs, and needs logprobs"),
    ({"logprobs": 1, "on_logprobs": 3}, "on_logprobs must be a function"),
])
def test_bad_logprobs_requests_are_clear_errors(engine, kwargs, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        engine.generate([1, 2], 3, **kwargs)


def test_step_clock_marks_each_step():
    clock = StepClock(torch.device("cpu"))
    for _ in range(3):
        clock.mark()
    intervals = clock.intervals_ms()
    assert len(intervals) == 3 and all(ms >= 0 for ms in intervals)


def test_timings_are_reported(engine):
    out = engine.generate([1, 2, 3], 10)
    assert out.prefill_ms > 0
    assert len(out.decode_ms) == 9 and all(ms > 0 for ms in out.decode_ms)
    assert out.tpot_ms == pytest.approx(sum(out.decode_ms) / 9)
    assert engine.generate([1], 1).tpot_ms is None


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    prompt = [9, 8, 7]

    def sample(seed):
        return engine.generate(prompt, 20, SamplingParams(temperature=1.0, top_p=0.95, seed=seed)).tokens

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_an_unseeded_sample_reports_the_seed_that_redraws_it(engine):
    prompt = [9, 8, 7]
    first = engine.generate(prompt, 12, SamplingParams(temperature=1.2))
    assert isinstance(first.seed, int) and 0 <= first.seed < 2**63
    again = engine.generate(prompt, 12, SamplingParams(temperature=1.2, seed=first.seed))
    assert again.tokens == first.tokens and again.seed == first.seed
    assert engine.generate(prompt, 12, SamplingParams(temperature=1.2)).seed != first.seed
    assert engine.generate(prompt, 4).seed is None  # greedy draws nothing


def test_top_k_one_sampling_equals_greedy(engine):
    prompt = [40, 41]
    sampled = engine.generate(prompt, 20, SamplingParams(temperature=0.7, top_k=1, seed=3)).tokens
    assert sampled == engine.generate(prompt, 20).tokens


def test_the_request_must_fit_the_kv_cache(hf_model):
    engine = Engine(hf_model, device="cpu", max_seq_len=8)
    assert len(engine.generate([1, 2, 3], 6).tokens) == 6  # 3 + 6 - 1 = 8 positions: fits exactly
    with pytest.raises(SequenceTooLongError, match="need 9 KV cache positions"):
        engine.generate([1, 2, 3], 7)
    with pytest.raises(SequenceTooLongError):
        engine.generate(list(range(9)), 1)


def test_a_full_cache_refuses_another_token(hf_model):
    backend = ReferenceBackend(from_hf(hf_model), max_seq_len=4)
    cache = backend.new_cache()
    backend.prefill(torch.tensor([1, 2, 3]), cache)
    backend.decode_step(4, cache)
    with pytest.raises(SequenceTooLongError):
        backend.decode_step(5, cache)


@pytest.mark.parametrize(
    "prompt, new_tokens, message",
    [
        ([], 4, "empty"),
        ([1, 512], 4, r"\[0, 512\)"),
        ([-1], 4, r"\[0, 512\)"),
        ([1], 0, "max_new_tokens"),
        ([1], 2.5, "max_new_tokens"),
        ([1.5, 2.0], 4, r"token ids must be integers, got \[1.5, 2.0\]"),  # not cut to [1, 2]
        ([3, True], 4, r"token ids must be integers, got \[True\]"),
        (["5", "6"], 4, "token ids must be integers"),
        ([[1, 2], [3, 4]], 4, "token ids must be integers"),
        (torch.tensor([1.5, 2.5]), 4, "token ids must be integers, got a torch.float32 tensor"),
        (torch.tensor([True]), 4, "token ids must be integers, got a torch.bool tensor"),
        (torch.tensor([[1, 2], [3, 4]]), 4, r"one sequence, \[T\] or \[1, T\]; got \[2, 2\] \(neoxfuse decodes batch 1\)"),
        (torch.tensor(7), 4, r"one sequence, \[T\] or \[1, T\]; got \[\]"),
        (np.array([[1, 2], [3, 4]]), 4, r"got \[2, 2\]"),
        (np.array([1.0]), 4, "token ids must be integers, got a torch.float64 tensor"),
        (None, 4, "a prompt is text, a sequence of token ids or an integer tensor or array; got NoneType"),
        (7, 4, "got int"),
        (b"ab", 4, "got bytes"),
        ({1, 2}, 4, "got set"),
    ],
)
def test_bad_requests_are_clear_errors(engine, prompt, new_tokens, message):
    with pytest.raises(InvalidInputError, match=message):
        engine.generate(prompt, new_tokens)
    if new_tokens == 4:
        with pytest.raises(InvalidInputError, match=message):
            engine.score(prompt)


@pytest.mark.parametrize("prompt", [(5, 9, 2), range(5, 8, 2), torch.tensor([5, 7]), torch.tensor([[5, 7]], dtype=torch.int32),
                                    np.array([5, 7]), np.array([[5, 7]]), [np.int64(5), 7]])
def test_prompts_of_integer_ids_in_any_one_sequence_form(engine, prompt):
    tokens = [int(t) for t in np.asarray(prompt).reshape(-1)]
    assert engine.generate(prompt, 3).prompt_tokens == tokens
    assert engine.generate(prompt, 3).tokens == engine.generate(tokens, 3).tokens


@pytest.mark.parametrize("kwargs, message", [
    ({"max_seq_len": 0}, "max_seq_len must be an integer >= 1, got 0"),
    ({"max_seq_len": True}, "max_seq_len must be an integer >= 1, got True"),
    ({"max_seq_len": 2.5}, "max_seq_len must be an integer >= 1, got 2.5"),
    ({"max_seq_len": "8"}, "max_seq_len must be an integer >= 1, got '8'"),
    ({"max_seq_len": 257}, r"max_seq_len must be in 1..256 \(the model's positions\), got 257"),
    ({"seed": "x"}, r"seed must be an integer in 0 .. 2\^63 - 1, got 'x'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": -1}, "seed must be an integer"),
    ({"tokenizer": "gpt2"}, "tokenizer must be a tokenizer object with encode and decode .* got str"),
])
def test_bad_engine_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        Engine("tiny", device="cpu", **kwargs)


def test_bad_generate_arguments_are_clear_errors(engine):
    with pytest.raises(InvalidInputError, match="sampling must be a SamplingParams, got dict"):
        engine.generate([1, 2], 3, {"temperature": 1.0})
    with pytest.raises(InvalidInputError, match="on_tokens must be a function of a list of token ids, got list"):
        engine.generate([1, 2], 3, on_tokens=[])


def test_unknown_backend_lists_the_available_ones(hf_model):
    with pytest.raises(InvalidInputError, match="unknown backend 'nope'; available backends: .*reference"):
        Engine(hf_model, backend="nope")


class _CountingBackend(ReferenceBackend):
    """A backend added the way the fused one will be: subclass, register, select by name."""

    name = "counting"
    summary = "the reference, counting decode steps"
    steps = 0

    def decode_step(self, token, cache):
        type(self).steps += 1
        return super().decode_step(token, cache)


class _NeverBackend(ReferenceBackend):
    name = "never"
    summary = "cannot run anywhere"

    @classmethod
    def available(cls, device, dtype, shape=None):
        return Availability(False, "built for no GPU at all")


@pytest.fixture
def extra_backends():
    register_backend(_CountingBackend)
    register_backend(_NeverBackend)
    yield
    del BACKENDS["counting"], BACKENDS["never"]


def test_a_registered_backend_is_selectable(hf_model, engine, extra_backends):
    assert issubclass(_CountingBackend, Backend)
    counted = Engine(hf_model, backend="counting", device="cpu")
    assert counted.generate([1, 2], 5).tokens == engine.generate([1, 2], 5).tokens
    assert _CountingBackend.steps == 4


def test_an_unavailable_backend_says_why(hf_model, extra_backends):
    availability = backend_availability(torch.device("cpu"), torch.float32)
    assert availability["reference"] and not availability["never"]
    with pytest.raises(InvalidInputError, match="cannot run on cpu in float32: built for no GPU at all"):
        Engine(hf_model, backend="never", device="cpu")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="pythia-2.8b.*tiny"):
        Engine("pythia-7b")


def test_a_model_that_is_not_gpt_neox_is_refused():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT-NeoX"):
        Engine(llama)
    with pytest.raises(InvalidInputError, match="a model is"):
        Engine(42)
    with pytest.raises(UnsupportedModelError, match="neoxfuse.hf.generate takes a GPTNeoXForCausalLM, got LlamaForCausalLM"):
        neoxfuse.hf.generate(llama, torch.tensor([[1, 2]]), max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="takes a GPTNeoXForCausalLM, got str"):
        neoxfuse.hf.generate("tiny", torch.tensor([[1, 2]]), max_new_tokens=2)


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="is a file"):
        Engine(path)


def test_bad_device_and_dtype_are_clear_errors(hf_model):
    with pytest.raises(InvalidInputError, match="dtype"):
        Engine(hf_model, dtype="int8")
    with pytest.raises(InvalidInputError, match="device"):
        Engine(hf_model, device="tpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_a_gpu_is_a_clear_error(hf_model):
    with pytest.raises(NoGPUError, match="needs a CUDA GPU"):
        Engine(hf_model, device="cuda")


@pytest.mark.gpu
def test_gpu_defaults_and_fp32_tokens_match_the_cpu(hf_model):
    gpu = Engine(hf_model)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    assert gpu.backend_name == "reference" and "head_dim 16" in gpu.backend_reason  # the tiny shape: not fused
    out = gpu.generate([1, 2, 3], 16, SamplingParams(temperature=0.8, seed=1))
    assert len(out.tokens) == 16 and all(0 <= t < gpu.shape.vocab for t in out.tokens)
    # fp32 on the GPU (no TF32 by default) agrees with the CPU to ~1e-6: the same greedy tokens.
    cpu_tokens = Engine(hf_model, device="cpu").generate([1, 2, 3], 24).tokens
    assert Engine(hf_model, device="cuda", dtype="fp32").generate([1, 2, 3], 24).tokens == cpu_tokens
