"""neoxfuse.server: OpenAI's completions and chat completions APIs over HTTP against Engine.generate
on a tiny checkpoint with a word tokenizer; streaming, errors, one request at a time; `neoxfuse serve`
end to end."""

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import CHAT_TEMPLATE, neoxfuse_command

import neoxfuse
import neoxfuse.cli
from neoxfuse.cli import main
from neoxfuse.engine import Engine
from neoxfuse.errors import InvalidInputError
from neoxfuse.sampling import SamplingParams
from neoxfuse.server import CompletionServer, CompletionText
from neoxfuse.weights import random_model


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_with_tokenizer) -> Path:
    return tiny_checkpoint_with_tokenizer


@pytest.fixture(scope="module")
def served(checkpoint):
    """(server, engine): a CompletionServer on a free port, serving thread running, and an Engine
    of the same checkpoint to compare with."""
    server = CompletionServer(Engine(str(checkpoint), device="cpu", max_seq_len=64), ("127.0.0.1", 0), "tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, Engine(str(checkpoint), device="cpu", max_seq_len=64)
    server.shutdown()
    server.server_close()


def _request(server, path: str, body: object = None, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _complete(server, **body) -> dict:
    status, data = _request(server, "/v1/completions", body)
    assert status == 200, data
    return json.loads(data)


def _events(server, path: str = "/v1/completions", **body) -> list:
    status, data = _request(server, path, {**body, "stream": True})
    assert status == 200, data
    events = [block for block in data.decode().split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(block[len("data: "):]) for block in events[:-1]]


def test_greedy_completions_are_the_engines_generations(served):
    server, engine = served
    want = engine.generate("hello world w7", 12)
    got = _complete(server, model="tiny", prompt="hello world w7", max_tokens=12, temperature=0)
    choice = got["choices"][0]
    assert got["object"] == "text_completion" and got["model"] == "tiny" and got["id"].startswith("cmpl-")
    assert choice["token_ids"] == want.tokens and choice["text"] == engine.tokenizer.decode(want.tokens, skip_special_tokens=True)
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["logprobs"] is None
    assert got["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0}}
    assert got["timings"]["backend"] == "reference" and got["timings"]["prefill_ms"] > 0
    ids = engine.encode("hello world w7")
    for prompt in (ids, [ids], ["hello world w7"]):  # token ids, or a list of one prompt
        assert _complete(server, prompt=prompt, max_tokens=12, temperature=0)["choices"][0]["token_ids"] == want.tokens
    assert len(_complete(server, prompt="hello", temperature=0)["choices"][0]["token_ids"]) == 16  # OpenAI's default max_tokens


def test_each_completion_is_logged_with_its_tokens_and_timings(served, capsys):
    server, _ = served
    plain = _complete(server, prompt="hello world", max_tokens=4, temperature=0, ignore_eos=True)
    streamed = _events(server, prompt="hello", max_tokens=1, temperature=0)
    log = capsys.readouterr().err
    assert re.search(f"{plain['id']}: prompt_tokens 2 .cached 0., completion_tokens 4, prefill [0-9.]+ ms, tpot [0-9.]+ ms", log)
    assert re.search(f"{streamed[0]['id']}: prompt_tokens 1 .cached 0., completion_tokens 1, prefill [0-9.]+ ms\n", log)


def test_stop_strings_and_stop_tokens_end_a_completion_as_openai_ends_it(served):
    server, engine = served
    greedy = {"prompt": "w9 w10 w11", "max_tokens": 12, "temperature": 0}
    plain = engine.generate("w9 w10 w11", 12).tokens  # w135 w504 w89 w119 w53 w253 ...: no end-of-text
    words = engine.tokenizer.decode(plain).split()
    stop = f"{words[2]} {words[3]}"  # across two tokens
    got = _complete(server, **greedy, stop=[stop, "w999"])["choices"][0]
    assert got["text"] == f"{words[0]} {words[1]} " and got["finish_reason"] == "stop" and got["token_ids"] == plain[:4]
    got = _complete(server, **greedy, stop=["w53", "119 w5"])["choices"][0]  # w53 completes both: the first one found cuts
    assert got["text"] == f"{words[0]} {words[1]} {words[2]} w" and got["token_ids"] == plain[:5]
    # vLLM's include_stop_str_in_output: the text ends after the stop string that ends first.
    got = _complete(server, **greedy, stop=["w53", "119 w5"], include_stop_str_in_output=True)["choices"][0]
    assert got["text"] == f"{words[0]} {words[1]} {words[2]} w119 w5" and got["token_ids"] == plain[:5]
    streamed = _events(server, **greedy, stop=[stop], include_stop_str_in_output=True)
    assert "".join(event["choices"][0]["text"] for event in streamed) == f"{words[0]} {words[1]} {stop}"
    got = _complete(server, **greedy, stop_token_ids=[plain[5]])["choices"][0]
    assert got["token_ids"] == plain[:6] and got["finish_reason"] == "stop" and got["text"].split() == words[:6]
    got = _complete(server, **greedy, min_tokens=6, stop_token_ids=[plain[0]])["choices"][0]["token_ids"]
    assert got[0] != plain[0] and plain[0] not in got[:6]
    # The end-of-text token (here the 11th) ends it too, its text left out; ignore_eos goes on.
    eos = engine.generate("w40 w41", 12).tokens
    assert eos[10] == 0 and 0 not in eos[:10]
    got = _complete(server, prompt="w40 w41", max_tokens=12, temperature=0)["choices"][0]
    assert got["token_ids"] == eos[:11] and got["finish_reason"] == "stop" and got["text"] == engine.tokenizer.decode(eos[:10])
    got = _complete(server, prompt="w40 w41", max_tokens=12, temperature=0, ignore_eos=True)["choices"][0]
    assert got["token_ids"] == eos and got["finish_reason"] == "length" and "endoftext" not in got["text"]
    got = _complete(server, prompt="w40 w41", max_tokens=12, temperature=0, ignore_eos=True, skip_special_tokens=False)
    assert got["choices"][0]["text"] == engine.tokenizer.decode(eos) and "<|endoftext|>" in got["choices"][0]["text"]


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens(served):
    server, engine = served
    want = engine.generate("w12 w13 w14", 6)
    got = _complete(server, prompt="w9 w10 w11 w12 w13 w14", max_tokens=6, temperature=0, truncate_prompt_tokens=3, echo=True)
    choice = got["choices"][0]
    assert choice["token_ids"] == want.tokens and got["usage"]["prompt_tokens"] == 3
    assert choice["text"].startswith("w12 w13 w14") and "w9" not in choice["text"]
    too_long = [5] * 70  # past the 64-position cache, but for its last 10 tokens
    status, _ = _request(server, "/v1/completions", {"prompt": too_long, "max_tokens": 4})
    assert status == 400
    got = _complete(server, prompt=too_long, max_tokens=4, temperature=0, truncate_prompt_tokens=10)
    assert got["choices"][0]["token_ids"] == engine.generate([5] * 10, 4).tokens
    for given in (0, "3", True):
        status, data = _request(server, "/v1/completions", {"prompt": "w9", "truncate_prompt_tokens": given})
        assert status == 400 and "truncate_prompt_tokens must be null or an integer >= 1" in json.loads(data)["error"]["message"]


def test_allowed_token_ids_leave_the_others_out_as_vllms_do(served):
    server, engine = served
    vocab = engine.shape.vocab
    plain = engine.generate("w9 w10 w11", 8).tokens
    allowed = [plain[1], plain[3], 7, 8, 9]  # the greedy first token is not among them
    want = engine.generate("w9 w10 w11", 8, SamplingParams(suppress_tokens=set(range(vocab)) - set(allowed))).tokens
    got = _complete(server, prompt="w9 w10 w11", max_tokens=8, temperature=0, allowed_token_ids=allowed)["choices"][0]["token_ids"]
    assert got == want and set(got) <= set(allowed) and got != plain[: len(got)]
    for given, message in [([], "allowed_token_ids must be a non-empty list of token ids"), ([vocab], "token ids"),
                           ("w9", "allowed_token_ids must be a non-empty list")]:
        status, data = _request(server, "/v1/completions", {"prompt": "w9", "allowed_token_ids": given})
        assert status == 400 and message in json.loads(data)["error"]["message"]


def test_sampled_completions_draw_the_engines_tokens_from_their_seed(served):
    server, engine = served
    rule = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2}
    want = engine.generate("hello world", 20, SamplingParams(seed=11, **rule), stop_token_ids=0).tokens
    assert _complete(server, prompt="hello world", max_tokens=20, seed=11, **rule)["choices"][0]["token_ids"] == want
    assert _complete(server, prompt="hello world", max_tokens=20, seed=12, **rule)["choices"][0]["token_ids"] != want
    unseeded = [_complete(server, prompt="hello world", max_tokens=20)["choices"][0]["token_ids"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # temperature 1 by default, a fresh seed each time


@pytest.mark.parametrize("stop", [[], ["w119 w53"], ["zzz"]])
def test_a_stream_sends_the_completions_text_in_pieces(served, stop, monkeypatch):
    # The pieces (a token each here) add up to the completion's text: with a stop string, text
    # that could begin one ("w119", after "w135 w504 w89 ") is held back until it turns out to (or not).
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", 1)
    server, _ = served
    body = {"prompt": "w9 w10 w11", "max_tokens": 40, "temperature": 0, "stop": stop}
    want = _complete(server, **body)["choices"][0]
    events = _events(server, **body, stream_options={"include_usage": True})
    pieces = [event["choices"][0]["text"] for event in events[:-2]]
    assert "".join(pieces) == want["text"] and all(pieces)
    assert [event["choices"][0]["finish_reason"] for event in events[:-1]] == [None] * len(pieces) + [want["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(want["token_ids"])
    assert len(pieces) > 1
    assert len({event["id"] for event in events}) == 1


@pytest.mark.parametrize("rule", [{"temperature": 0}, {"temperature": 1.3, "top_k": 5, "seed": 4}], ids=["greedy", "sampled"])
def test_logprobs_list_each_new_tokens_text_logprob_and_most_likely_tokens(served, rule):
    server, engine = served
    want = engine.generate("hello world w7", 10, SamplingParams(**rule), stop_token_ids=0, logprobs=2)
    got = _complete(server, prompt="hello world w7", max_tokens=10, logprobs=2, **rule)["choices"][0]
    listing = got["logprobs"]
    assert got["token_ids"] == want.tokens and set(listing) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert listing["tokens"] == [engine.tokenizer.decode([token]) for token in want.tokens]
    assert listing["token_logprobs"] == [entry.logprob for entry in want.logprobs]
    for top, entry in zip(listing["top_logprobs"], want.logprobs, strict=True):
        listed = {engine.tokenizer.decode([token]): value for token, value in entry.top}
        assert top == {**listed, engine.tokenizer.decode([entry.token]): entry.logprob}  # the chosen token too, as OpenAI lists it
    assert listing["text_offset"] == [sum(map(len, listing["tokens"][:i])) for i in range(len(want.tokens))]
    sizes = {len(top) for top in listing["top_logprobs"]}
    assert sizes == ({2} if rule["temperature"] == 0 else {2, 3})  # a draw outside the two most likely: three


def test_echo_puts_the_prompt_and_its_teacher_forced_logprobs_first(served):
    # lm-evaluation-harness's local-completions asks for loglikelihoods this way: the context and
    # continuation as one prompt, echo, logprobs 1 and max_tokens 1, then sums token_logprobs[ctxlen:-1].
    server, engine = served
    ids = engine.encode("hello world w7 w9")
    got = _complete(server, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)["choices"][0]
    new, scored = engine.generate(ids, 1, logprobs=1), engine.prompt_logprobs(ids, 1)
    listing = got["logprobs"]
    assert got["text"] == "hello world w7 w9" + engine.tokenizer.decode(new.tokens) and got["token_ids"] == new.tokens
    assert listing["tokens"][:4] == ["hello", "world", "w7", "w9"]
    assert listing["token_logprobs"] == [None, *(entry.logprob for entry in scored), new.logprobs[0].logprob]
    assert listing["top_logprobs"][0] is None and all(len(top) in (1, 2) for top in listing["top_logprobs"][1:])
    assert listing["text_offset"] == [0, 5, 10, 12, len("hello world w7 w9")]
    assert sum(listing["token_logprobs"][2:-1]) == pytest.approx(engine.loglikelihood(ids[:2], ids[2:]).logprob, abs=1e-5)
    alone = _complete(server, prompt="hello world w7 w9", max_tokens=0, echo=True, logprobs=0)
    choice = alone["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["token_ids"]) == ("hello world w7 w9", "length", [])
    assert choice["logprobs"]["token_logprobs"] == listing["token_logprobs"][:4]
    assert alone["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}
    assert alone["timings"]["tpot_ms"] is None
    streamed = [event["choices"][0] for event in _events(server, prompt="hello world w7 w9", max_tokens=0, echo=True)]
    assert [(choice["text"], choice["finish_reason"]) for choice in streamed] == [("hello world w7 w9", None), ("", "length")]
    plain = _complete(server, prompt="hello world w7 w9", max_tokens=3, temperature=0, echo=True)["choices"][0]
    assert plain["text"] == "hello world w7 w9" + engine.generate(ids, 3).text and plain["logprobs"] is None


def test_a_list_of_prompts_gets_a_choice_each_in_order(served):
    server, engine = served
    prompts = ["hello world w7", engine.encode("w9 w10"), "w40 w41"]
    want = [engine.generate(prompt, 12, stop_token_ids=0) for prompt in prompts]  # the third ends at the end of text
    body = {"prompt": prompts, "max_tokens": 12, "temperature": 0}
    got = _complete(server, **body)
    assert [choice["index"] for choice in got["choices"]] == [0, 1, 2]
    assert [choice["token_ids"] for choice in got["choices"]] == [out.tokens for out in want]
    assert [choice["finish_reason"] for choice in got["choices"]] == ["length", "length", "stop"]
    prompt_tokens, new_tokens = 3 + 2 + 2, sum(len(out.tokens) for out in want)
    assert got["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens, "total_tokens": prompt_tokens + new_tokens,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    events = _events(server, **body)
    choices = [event["choices"][0] for event in events]
    assert [choice["index"] for choice in choices] == sorted(choice["index"] for choice in choices)  # one prompt after the other
    for index, want_choice in enumerate(got["choices"]):
        mine = [choice for choice in choices if choice["index"] == index]
        assert "".join(choice["text"] for choice in mine) == want_choice["text"]
        assert [choice["finish_reason"] for choice in mine] == [None] * (len(mine) - 1) + [want_choice["finish_reason"]]


def test_logit_bias_is_the_engines_one_token_sequence_bias(served):
    server, engine = served
    plain = engine.generate("w9 w10 w11", 8).tokens
    bias = {plain[1]: -100.0, 7: 8.5}
    want = engine.generate("w9 w10 w11", 8, SamplingParams(sequence_bias={(token,): value for token, value in bias.items()}),
                           stop_token_ids=0)
    got = _complete(server, prompt="w9 w10 w11", max_tokens=8, temperature=0, logit_bias={str(k): v for k, v in bias.items()})
    assert got["choices"][0]["token_ids"] == want.tokens != plain and plain[1] not in want.tokens


def test_presence_and_frequency_penalties_are_the_engines(served):
    server, engine = served
    plain = engine.generate("w9 w10 w11", 12, stop_token_ids=0).tokens
    for penalties in [{"presence_penalty": 2.0}, {"frequency_penalty": -1.5}]:
        want = engine.generate("w9 w10 w11", 12, SamplingParams(**penalties), stop_token_ids=0).tokens
        got = _complete(server, prompt="w9 w10 w11", max_tokens=12, temperature=0, **penalties)
        assert got["choices"][0]["token_ids"] == want != plain


def test_completions_end_at_the_generation_configs_end_of_text_tokens(checkpoint, tmp_path):
    # A chat model's generation_config.json may list its end-of-turn token beside the end-of-text
    # one: a completion ends at either (finish_reason "stop"), as vLLM's does; ignore_eos runs on.
    shutil.copytree(checkpoint, tmp_path / "chat")
    plain = Engine(str(checkpoint), device="cpu").generate("w9 w10 w11", 12).tokens
    end = next(token for token in plain[2:] if token not in plain[:2])
    (tmp_path / "chat" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end]}))
    server = CompletionServer(Engine(str(tmp_path / "chat"), device="cpu"), ("127.0.0.1", 0), "tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        choice = _complete(server, prompt="w9 w10 w11", max_tokens=12, temperature=0)["choices"][0]
        assert choice["token_ids"] == plain[: plain.index(end) + 1] and choice["finish_reason"] == "stop"
        assert _complete(server, prompt="w9 w10 w11", max_tokens=12, temperature=0, ignore_eos=True)["choices"][0]["token_ids"] == plain
    finally:
        server.shutdown()
        server.server_close()


def test_n_completions_per_prompt_draw_with_successive_seeds(served):
    server, engine = served
    rule = {"temperature": 1.1, "top_k": 30}
    body = {"prompt": ["hello world", "w9 w10"], "max_tokens": 8, "n": 3, "best_of": 3, "seed": 2**63 - 2, "echo": True, "logprobs": 1}
    got = _complete(server, **body, **rule)
    seeds = [2**63 - 2, 2**63 - 1, 0]  # seed + i, wrapping past 2^63 - 1
    want = [engine.generate(prompt, 8, SamplingParams(seed=seed, **rule), stop_token_ids=0) for prompt in body["prompt"] for seed in seeds]
    assert [choice["index"] for choice in got["choices"]] == list(range(6))
    assert [choice["token_ids"] for choice in got["choices"]] == [out.tokens for out in want]
    assert len({tuple(out.tokens) for out in want}) == 6
    texts = [engine.tokenizer.decode(out.tokens) for out in want]
    prompts = ["hello world"] * 3 + ["w9 w10"] * 3
    assert [choice["text"] for choice in got["choices"]] == [f"{prompt}{text}" for prompt, text in zip(prompts, texts)]
    scored = [choice["logprobs"]["token_logprobs"][:2] for choice in got["choices"]]
    assert scored[:3] == [[None, engine.prompt_logprobs("hello world")[0].logprob]] * 3 and scored[3] == scored[5] != scored[0]
    assert got["usage"]["prompt_tokens"] == 4 and got["usage"]["completion_tokens"] == sum(len(out.tokens) for out in want)
    greedy = _complete(server, prompt="hello world", max_tokens=4, n=2, temperature=0)["choices"]
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"] == engine.generate("hello world", 4).tokens


def test_a_stream_sends_the_echo_then_each_pieces_logprobs(served, monkeypatch):
    # Chunks of 3 tokens; "w119" is held back until the stop string "w119 w53" turns up, but the
    # logprobs of its token go out with its batch.
    monkeypatch.setattr(neoxfuse.engine, "DECODE_CHUNK", 3)
    server, _ = served
    body = {"prompt": "w9 w10 w11", "max_tokens": 10, "temperature": 0, "echo": True, "logprobs": 2, "stop": ["w119 w53"]}
    want = _complete(server, **body)["choices"][0]
    choices = [event["choices"][0] for event in _events(server, **body)]
    assert choices[0]["text"] == "w9 w10 w11" and choices[0]["logprobs"]["tokens"] == ["w9", "w10", "w11"]
    assert "".join(choice["text"] for choice in choices) == want["text"] and want["finish_reason"] == "stop"
    parts = [choice["logprobs"] for choice in choices if choice["logprobs"] is not None]
    assert {name: [value for part in parts for value in part[name]] for name in want["logprobs"]} == want["logprobs"]
    assert any(choice["text"] == "" and choice["logprobs"] for choice in choices)  # a batch whose text was held back


def test_vllms_tokenizer_routes(served):
    server, engine = served
    status, data = _request(server, "/tokenizer_info")
    info = json.loads(data)
    assert status == 200 and info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    assert info["tokenizer_class"] == type(engine.tokenizer).__name__ and info["bos_token"] is None
    got = json.loads(_request(server, "/tokenize", {"prompt": "hello world w7", "add_special_tokens": False})[1])
    assert got == {"count": 3, "max_model_len": 64, "tokens": engine.encode("hello world w7")}
    assert json.loads(_request(server, "/detokenize", {"model": "tiny", "tokens": [1, 2, 9]})[1]) == {"prompt": "hello world w9"}
    for path, body, status, message in [
        ("/tokenize", {"prompt": 5}, 400, "/tokenize takes a prompt (text) and add_special_tokens"),
        ("/tokenize", {"prompt": "w3", "messages": []}, 400, "unknown fields ['messages']: not in /tokenize"),
        ("/detokenize", {"tokens": [1, 999999]}, 400, "token ids must be in [0, "),
        ("/detokenize", {"tokens": "w3"}, 400, "/detokenize takes tokens, a list of token ids"),
        ("/detokenize", {"tokens": [1], "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist here"),
    ]:  # fmt: skip
        got_status, data = _request(server, path, body)
        assert got_status == status and message in json.loads(data)["error"]["message"]


def test_a_model_without_a_tokenizer_lists_token_ids_and_has_no_tokenizer_routes():
    engine = Engine(random_model("tiny", seed=1), device="cpu", max_seq_len=16)
    server = CompletionServer(engine, ("127.0.0.1", 0), "bare")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = _complete(server, prompt=[5, 6, 7], max_tokens=2, temperature=0, echo=True, logprobs=0)["choices"][0]
        tokens = [5, 6, 7, *engine.generate([5, 6, 7], 2).tokens]
        assert got["text"] == "" and got["logprobs"]["tokens"] == [f"token_id:{token}" for token in tokens]
        for path, body in [("/tokenizer_info", None), ("/tokenize", {"prompt": "w3"}), ("/detokenize", {"tokens": [3]})]:
            status, data = _request(server, path, body)
            assert status == 404 and "'bare' has no tokenizer: give prompts as token ids" in json.loads(data)["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "hello", "n": 0}, 400, "n must be an integer >= 1 (completions per prompt), got 0"),
    ({"prompt": "hello", "n": 2, "best_of": 3}, 400, "best_of=3 is not implemented"),
    ({"prompt": "hello", "echo": "yes"}, 400, "echo must be true or false"),
    ({"prompt": "hello", "logprobs": 21}, 400, "logprobs must be null or an integer from 0 to 20, got 21"),
    ({"prompt": "hello", "logprobs": True}, 400, "logprobs must be null or an integer"),
    ({"prompt": "hello", "suffix": "!"}, 400, "suffix='!' is not implemented (GPT-NeoX models are not trained to fill in"),
    ({"prompt": "hello", "frequency_penalty": 2.5}, 400, "frequency_penalty must be a number from -2 to 2, got 2.5"),
    ({"prompt": "hello", "presence_penalty": "1"}, 400, "presence_penalty must be a number from -2 to 2, got '1'"),
    ({"prompt": "hello", "presence_penalty": True}, 400, "presence_penalty must be a finite number"),
    ({"prompt": "hello", "logit_bias": {"5": 101}}, 400, "logit_bias must map token ids to biases from -100 to 100"),
    ({"prompt": "hello", "logit_bias": {"w5": 1}}, 400, "logit_bias must map token ids"),
    ({"prompt": "hello", "logit_bias": [5, 1]}, 400, "logit_bias must map token ids"),
    ({"prompt": "hello", "logit_bias": {"999999": 1}}, 400, "token ids in [0, "),
    ({"prompt": "hello", "max_token": 5}, 400, "unknown fields ['max_token']"),
    ({"prompt": "hello", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist here; this server serves 'tiny'"),
    ({"prompt": ["hello", 5]}, 400, "prompt must be text, a list of token ids, or a list of either"),
    ({"prompt": []}, 400, "the prompt is empty"),
    ({"prompt": ["hello", ""]}, 400, "the prompt is empty"),  # every prompt checked before the first runs
    ({"prompt": [1, 2.5]}, 400, "prompt must be text"),
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"prompt": "hello", "max_tokens": 65}, 400, "need 65 KV cache positions; the cache holds 64"),
    ({"prompt": ["hello", "w3 " * 30], "max_tokens": 40, "echo": True}, 400, "a 30-token prompt and 40 new tokens need 69 KV"),
    ({"prompt": "hello", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1 (or 0 with echo: the prompt alone), got 0"),
    ({"prompt": "hello", "max_tokens": -1, "echo": True}, 400, "max_tokens must be an integer >= 1"),
    ({"prompt": "hello", "max_tokens": 2.0}, 400, "max_tokens must be an integer >= 1"),
    ({"prompt": "hello", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"prompt": "hello", "stop": ["w3", ""]}, 400, "stop must be a non-empty string or a list of them"),
    ({"prompt": "hello", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "hello", "stream_options": {"continuous_usage_stats": True}}, 400, "stream_options takes include_usage only"),
    ({"prompt": [999999]}, 400, "token ids must be in [0, "),
    ({"prompt": "hello", "stop_token_ids": [1.5]}, 400, "stop_token_ids must be token ids (integers)"),
    ({"prompt": "hello", "stop_token_ids": 3}, 400, "stop_token_ids must be a list of token ids"),
    ([1, 2], 400, "the request body must be a JSON object"),
])  # fmt: skip
def test_bad_requests_get_openais_error_objects(served, body, status, message):
    bodies = [body] if not isinstance(body, dict) or "stream" in body else [body, {**body, "stream": True}]
    for sent in bodies:  # a stream's errors too come before its first event: plain error responses
        got_status, data = _request(served[0], "/v1/completions", sent)
        error = json.loads(data)["error"]
        assert got_status == status and message in error["message"], error
        assert error["type"] == ("model_not_found" if status == 404 else "invalid_request_error")


def test_routes_and_bodies_that_are_not_requests(served, monkeypatch):
    server, _ = served
    assert _request(server, "/health") == (200, b'{"status": "ok"}')
    models = json.loads(_request(server, "/v1/models")[1])
    assert [model["id"] for model in models["data"]] == ["tiny"] and models["data"][0]["owned_by"] == "neoxfuse"
    assert json.loads(_request(server, "/v1/models/tiny")[1]) == models["data"][0]  # OpenAI's retrieve
    status, data = _request(server, "/v1/models/tiny2")
    assert status == 404 and json.loads(data)["error"]["type"] == "model_not_found"
    monkeypatch.setattr(server, "model_name", "EleutherAI/pythia-tiny")  # a Hub id: a slash, quoted or not
    for path in ("/v1/models/EleutherAI/pythia-tiny", "/v1/models/EleutherAI%2Fpythia-tiny"):
        assert json.loads(_request(server, path)[1])["id"] == "EleutherAI/pythia-tiny"
    status, data = _request(server, "/v1/embeddings", {"input": "w9"})
    assert status == 404 and "neoxfuse serves /v1/completions and /v1/chat/completions" in json.loads(data)["error"]["message"]
    assert _request(server, "/nothing")[0] == 404
    status, data = _request(server, "/v1/completions", raw=b"{not json")
    assert status == 400 and "the request body is not JSON" in json.loads(data)["error"]["message"]


def test_requests_at_once_are_served_one_after_another(served, monkeypatch):
    # Four clients at once: each gets its own completion, and the engine runs one at a time.
    server, engine = served
    running, most = [], []
    generate = server.engine.generate

    def one_at_a_time(*args, **kwargs):
        running.append(1)
        most.append(len(running))
        time.sleep(0.05)
        try:
            return generate(*args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(server.engine, "generate", one_at_a_time)
    prompts = ["hello", "world w3", "w9 w9 w9", "hello w20"]
    want = [engine.generate(prompt, 10).tokens for prompt in prompts]
    got = [None] * len(prompts)

    def ask(i: int) -> None:
        got[i] = _complete(server, prompt=prompts[i], max_tokens=10, temperature=0, ignore_eos=True)["choices"][0]["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == want and max(most) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_gets_nothing_more_made(served, monkeypatch, stream):
    # A client that leaves while its completion is made (after its first token), or while its
    # request waits for the engine: the engine makes nothing more for it and serves the next one.
    server, engine = served
    calls, chunks, outcomes = [], [], []
    generate, complete = server.engine.generate, server.complete
    started, left, done = threading.Event(), threading.Event(), threading.Event()

    def watched(*args, on_tokens, **kwargs):
        calls.append(1)

        def seen(new: list[int]) -> None:
            chunks.append(len(new))
            started.set()
            left.wait(30)  # until the client has left
            on_tokens(new)

        return generate(*args, on_tokens=seen, **kwargs)

    def recorded(*args, **kwargs):
        try:
            return complete(*args, **kwargs)
        except Exception as err:
            outcomes.append(type(err).__name__)
            raise
        finally:
            done.set()

    monkeypatch.setattr(server.engine, "generate", watched)
    monkeypatch.setattr(server, "complete", recorded)
    body = json.dumps({"prompt": "hello", "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": stream}).encode()

    def send_and_leave(after: threading.Event | None = None) -> None:
        with socket.create_connection(server.server_address[:2]) as client:
            client.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            if after is not None:
                after.wait(30)

    client = threading.Thread(target=send_and_leave, args=(started,))
    client.start()
    client.join()
    time.sleep(0.2)  # the server's end of the connection sees it closed
    left.set()
    assert done.wait(30) and outcomes == ["ConnectionResetError"] and chunks == [1] and len(calls) == 1
    done.clear()
    with server.engine_lock:  # the engine busy while the next client comes and goes
        send_and_leave()
        time.sleep(0.2)
    assert done.wait(30) and outcomes == ["ConnectionResetError"] * 2 and len(calls) == 1  # never started
    got = _complete(server, prompt="hello", max_tokens=5, temperature=0)["choices"][0]["token_ids"]
    assert got == engine.generate("hello", 5).tokens


def test_a_server_refuses_a_request_past_its_queue_with_a_503(checkpoint, monkeypatch):
    server = CompletionServer(Engine(str(checkpoint), device="cpu", max_seq_len=64), ("127.0.0.1", 0), "tiny", max_waiting=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    running, release = threading.Event(), threading.Event()
    generate = server.engine.generate

    def held(*args, **kwargs):
        running.set()
        release.wait(30)
        return generate(*args, **kwargs)

    monkeypatch.setattr(server.engine, "generate", held)
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    replies = {}

    def ask(name: str) -> None:
        replies[name] = _request(server, "/v1/completions", body)

    try:
        first = threading.Thread(target=ask, args=("running",))
        first.start()
        assert running.wait(30)
        second = threading.Thread(target=ask, args=("waiting",))
        second.start()
        deadline = time.monotonic() + 30
        while server._pending < 2 and time.monotonic() < deadline:  # the second waits for the engine
            time.sleep(0.01)
        status, data = _request(server, "/v1/completions", body)
        error = json.loads(data)["error"]
        assert status == 503 and error["code"] == "overloaded" and "one request runs and 1 wait" in error["message"]
        release.set()
        first.join()
        second.join()
        assert replies["running"][0] == replies["waiting"][0] == 200
        assert _request(server, "/v1/completions", body)[0] == 200  # the queue is free again
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    with pytest.raises(InvalidInputError, match="max_waiting must be None or an integer >= 0, got -1"):
        CompletionServer(server.engine, ("127.0.0.1", 0), "tiny", max_waiting=-1)
    with pytest.raises(InvalidInputError, match="the API key is empty"):
        CompletionServer(server.engine, ("127.0.0.1", 0), "tiny", api_key=" ")


def test_an_engine_with_a_prefix_cache_prefills_only_a_turns_new_tokens(checkpoint):
    # A conversation's next turn: the prompt is the last one, its completion and more.
    engine, mirror = (Engine(str(checkpoint), device="cpu", max_seq_len=64, prefix_cache=True) for _ in range(2))
    server = CompletionServer(engine, ("127.0.0.1", 0), "tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        first = _complete(server, prompt="hello world w7", max_tokens=6, temperature=0, ignore_eos=True)
        turn = [*engine.encode("hello world w7"), *first["choices"][0]["token_ids"], *engine.encode("w9 w10")]
        second = _complete(server, prompt=turn, max_tokens=6, temperature=0, ignore_eos=True)
        mirror.generate("hello world w7", 6)
        want = mirror.generate(turn, 6)
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": want.reused_tokens} and want.reused_tokens == 3 + 6 - 1
        assert second["choices"][0]["token_ids"] == want.tokens
    finally:
        server.shutdown()
        server.server_close()


def test_completion_text_holds_back_an_incomplete_character_and_a_possible_stop():
    # A byte-level tokenizer decodes half a character as U+FFFD until its other half comes.
    class Tokenizer:
        def __init__(self):
            self.pieces = {1: "caf", 2: "\ufffd", 3: "\ufffd", 4: "!", 5: " ok", 6: "?"}

        def decode(self, tokens, skip_special_tokens=False):
            return "".join(self.pieces[t] for t in tokens).replace("\ufffd\ufffd", "\u00e9")

    text = CompletionText(Tokenizer(), ("\u00e9!?",))
    seen = []
    for token in [1, 2, 3, 4, 5]:
        text.tokens.append(token)
        seen.append(text.text(final=False))
    assert seen == ["caf", "caf", "caf", "caf", "caf\u00e9! ok"] and text.text(final=True) == "caf\u00e9! ok" and not text.stopped
    text.tokens[-1] = 6
    assert text.text(final=True) == "caf" and text.stopped


def test_neoxfuse_serve_answers_over_http(checkpoint):
    # `python -m neoxfuse serve --port 0`: it says where it listens, and answers there.
    command, env = neoxfuse_command("serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0",
                                    "--served-model-name", "pythia-tiny", "--prefix-cache")
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = next(line for line in process.stderr if "serving" in line)
        assert "serving 'pythia-tiny' at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        server = type("Server", (), {"url": url})
        got = _complete(server, model="pythia-tiny", prompt="hello world w7", max_tokens=5, temperature=0)
        want = Engine(str(checkpoint), device="cpu").generate("hello world w7", 5).tokens
        assert got["choices"][0]["token_ids"] == want
        again = _complete(server, model="pythia-tiny", prompt="hello world w7", max_tokens=5, temperature=0)
        assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}  # --prefix-cache: all but the prompt's last token
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_server_with_an_api_key_answers_only_requests_that_carry_it(checkpoint):
    server = CompletionServer(Engine(str(checkpoint), device="cpu", max_seq_len=64), ("127.0.0.1", 0), "tiny", api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    routes = [("/v1/completions", {"prompt": "hello world", "max_tokens": 3, "temperature": 0}), ("/v1/models", None),
              ("/tokenize", {"prompt": "hello"}), ("/tokenizer_info", None),
              ("/v1/completions", {"prompt": "hello " * 50_000, "max_tokens": 3})]  # refused before its body is read
    try:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cre"}]:
            for path, body in routes:
                status, data = _request(server, path, body, headers=headers)
                error = json.loads(data)["error"]
                assert status == 401 and error["code"] == "invalid_api_key" and "Authorization: Bearer KEY" in error["message"]
        assert _request(server, "/health") == (200, b'{"status": "ok"}')  # for liveness probes
        key = {"Authorization": "Bearer s3cret"}
        assert [_request(server, path, body, headers=key)[0] for path, body in routes[:4]] == [200] * 4
        status, data = _request(server, "/v1/completions", {"prompt": "hello", "max_tokens": 2, "stream": True}, headers=key)
        assert status == 200 and data.decode().endswith("data: [DONE]\n\n")
    finally:
        server.shutdown()
        server.server_close()


def test_serve_warns_when_it_is_reachable_from_other_machines_without_an_api_key(checkpoint, capsys, monkeypatch):
    def stop(self):
        raise KeyboardInterrupt  # Ctrl-C as soon as it serves

    monkeypatch.setattr(CompletionServer, "serve_forever", stop)
    monkeypatch.delenv("NEOXFUSE_API_KEY", raising=False)
    serve = ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0"]
    for args, warned in [([], False), (["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key", "k"], False),
                         (["--host", "localhost"], False)]:
        assert main([*serve, *args]) == 0
        err = capsys.readouterr().err
        assert ("is reachable from other machines and no API key is set" in err) == warned and "neoxfuse: stopped" in err


def test_serve_says_in_one_line_why_it_cannot_listen(checkpoint, served, capsys):
    taken = str(served[0].server_address[1])
    for port, why in [(taken, "Address already in use"), ("70000", "port must be 0-65535")]:
        assert main(["serve", "--model", str(checkpoint), "--device", "cpu", "--port", port]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("neoxfuse: error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"neoxfuse: error: cannot listen on 127.0.0.1:{port}: ") and why in errors[0]


CHAT = [{"role": "system", "content": "w20"}, {"role": "user", "content": "w9 w10"}, {"role": "assistant", "content": "w11"},
        {"role": "user", "content": [{"type": "text", "text": "w12"}, {"type": "text", "text": "w13"}]}]
CHAT_PROMPT = "w3 w20 w4 w9 w10 w5 w11 w4 w12 w13 w6"  # CHAT rendered by CHAT_TEMPLATE


@pytest.fixture
def chat_served(served, monkeypatch):
    monkeypatch.setattr(served[0], "chat_template", CHAT_TEMPLATE)
    return served


def _chat(server, **body) -> dict:
    status, data = _request(server, "/v1/chat/completions", body)
    assert status == 200, data
    return json.loads(data)


def test_chat_completions_are_the_engines_generations_of_the_rendered_messages(chat_served):
    server, engine = chat_served
    want = engine.generate(CHAT_PROMPT, 10, SamplingParams(presence_penalty=1.0), logprobs=3)
    got = _chat(server, model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0, presence_penalty=1.0,
                logprobs=True, top_logprobs=3, ignore_eos=True)
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-") and got["model"] == "tiny"
    choice = got["choices"][0]
    text = engine.tokenizer.decode(want.tokens, skip_special_tokens=True)
    assert choice["message"] == {"role": "assistant", "content": text} and choice["token_ids"] == want.tokens
    assert choice["finish_reason"] == "length" and got["usage"]["prompt_tokens"] == 11 and got["usage"]["completion_tokens"] == 10
    listed = choice["logprobs"]["content"]
    assert [entry["token"] for entry in listed] == [engine.tokenizer.decode([t]) for t in want.tokens]
    assert [entry["logprob"] for entry in listed] == pytest.approx([entry.logprob for entry in want.logprobs], abs=1e-5)
    assert all(entry["bytes"] == list(entry["token"].encode()) for entry in listed)
    for entry, wanted in zip(listed, want.logprobs):  # the three most likely tokens, not the chosen one added
        assert [top["token"] for top in entry["top_logprobs"]] == [engine.tokenizer.decode([t]) for t, _ in wanted.top]
        assert [top["logprob"] for top in entry["top_logprobs"]] == pytest.approx([v for _, v in wanted.top], abs=1e-5)
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "store": False}
    for unasked in ({}, {"logprobs": None}, {"logprobs": False, "top_logprobs": None, "add_generation_prompt": None}, neutral):
        unlisted = _chat(server, messages=CHAT, max_tokens=10, temperature=0, presence_penalty=1.0, ignore_eos=True, **unasked)
        assert unlisted["choices"][0]["logprobs"] is None and unlisted["choices"][0]["token_ids"] == want.tokens
    bare = _chat(server, messages=CHAT, max_tokens=10, temperature=0, presence_penalty=1.0, logprobs=True, ignore_eos=True)
    bare = bare["choices"][0]["logprobs"]["content"]
    assert [entry["top_logprobs"] for entry in bare] == [[]] * 10 and [entry["token"] for entry in bare] == [e["token"] for e in listed]
    unopened = engine.generate(CHAT_PROMPT.removesuffix(" w6"), 4, stop_token_ids=0).tokens
    assert _chat(server, messages=CHAT, max_tokens=4, temperature=0, add_generation_prompt=False)["choices"][0]["token_ids"] == unopened


def test_a_chat_completion_runs_to_the_end_of_the_cache_by_default(chat_served):
    server, engine = chat_served
    got = _chat(server, messages=CHAT, temperature=0, ignore_eos=True)  # 11 prompt tokens, 64 positions
    assert got["usage"]["completion_tokens"] == 64 + 1 - 11 and got["choices"][0]["finish_reason"] == "length"
    assert got["choices"][0]["token_ids"] == engine.generate(CHAT_PROMPT, 54).tokens
    cut = _chat(server, messages=CHAT * 7, temperature=0, ignore_eos=True, truncate_prompt_tokens=5)  # 71 tokens, the last 5 run
    assert cut["usage"]["prompt_tokens"] == 5 and cut["usage"]["completion_tokens"] == 64 + 1 - 5


def test_a_streamed_chat_completion_sends_its_message_in_deltas(chat_served):
    server = chat_served[0]
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0.8, "seed": 5, "n": 2, "logprobs": True,
            "stream_options": {"include_usage": True}}
    whole = _chat(server, **body)
    events = _events(server, "/v1/chat/completions", **body)
    assert {event["object"] for event in events} == {"chat.completion.chunk"} and len({event["id"] for event in events}) == 1
    for index in (0, 1):
        chunks = [event["choices"][0] for event in events if event["choices"] and event["choices"][0]["index"] == index]
        assert chunks[0]["delta"]["role"] == "assistant" and all("role" not in chunk["delta"] for chunk in chunks[1:])
        assert "".join(chunk["delta"].get("content", "") for chunk in chunks) == whole["choices"][index]["message"]["content"]
        assert [entry for chunk in chunks if chunk["logprobs"] for entry in chunk["logprobs"]["content"]] == \
            whole["choices"][index]["logprobs"]["content"]
        assert [chunk["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"] and chunks[-1]["delta"] == {}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "messages must be a non-empty list of {role, content}"),
    ({"messages": [{"role": "user"}]}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "content text or text parts"),
    ({"messages": "w9"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "w9"}]}, "the chat template refused the messages: roles are system, user and"),
    ({"messages": CHAT, "prompt": "w9"}, "unknown fields ['prompt']: not in the chat completions API"),
    ({"messages": CHAT, "echo": True}, "unknown fields ['echo']"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs must be null or an integer from 0 to 20, with logprobs true; got 2"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be null or an integer from 0 to 20"),
    ({"messages": CHAT, "logprobs": 3}, "logprobs must be true or false, got 3"),
    ({"messages": CHAT, "logprobs": 0}, "logprobs must be true or false, got 0"),
    ({"messages": CHAT, "add_generation_prompt": "yes"}, "add_generation_prompt must be true or false"),
    ({"messages": CHAT, "max_completion_tokens": 60}, "a 11-token prompt and 60 new tokens need 70 KV cache positions"),
    ({"messages": CHAT * 7}, "a 71-token prompt and 1 new tokens need 71 KV cache positions"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, '''response_format={'type': 'json_object'} is not implemented (only {"type": "text"} or null)'''),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools=[{'type': 'function'"),
    ({"messages": CHAT, "tool_choice": "auto"}, '''tool_choice='auto' is not implemented (only "none" or null)'''),
    ({"messages": CHAT, "store": True}, "store=True is not implemented (only false or null)"),
    ({"messages": CHAT, "parallel_tool_calls": 1}, "parallel_tool_calls=1 is not implemented (only true or false or null)"),
    ({"messages": CHAT, "audio": {"voice": "x"}}, "unknown fields ['audio']: not in the chat completions API"),
])
def test_bad_chat_requests_are_refused(chat_served, body, message):
    status, data = _request(chat_served[0], "/v1/chat/completions", body)
    assert status == 400 and message in json.loads(data)["error"]["message"]


def test_a_chat_needs_a_template_and_a_tokenizer(served):
    status, data = _request(served[0], "/v1/chat/completions", {"messages": CHAT})  # the word tokenizer has no template
    assert status == 400 and "has no chat template (its tokenizer holds none): give one (--chat-template FILE)" in data.decode()
    bare = CompletionServer(Engine("tiny", device="cpu"), ("127.0.0.1", 0), "bare", chat_template=CHAT_TEMPLATE)
    threading.Thread(target=bare.serve_forever, daemon=True).start()
    try:
        status, data = _request(bare, "/v1/chat/completions", {"messages": CHAT})
        assert status == 400 and "has no tokenizer, which a chat needs" in json.loads(data)["error"]["message"]
    finally:
        bare.shutdown()
        bare.server_close()


def test_neoxfuse_serve_takes_a_chat_template_file(checkpoint, tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    command, env = neoxfuse_command("serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0", "--chat-template", str(template))
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = next(line for line in process.stderr if "serving" in line)
        server = type("Server", (), {"url": line.split(" at ")[1].split()[0].removesuffix("/v1")})
        got = _chat(server, messages=CHAT, max_tokens=5, temperature=0)
        assert got["choices"][0]["token_ids"] == Engine(str(checkpoint), device="cpu").generate(CHAT_PROMPT, 5).tokens
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert main(["serve", "--model", str(checkpoint), "--device", "cpu", "--chat-template", str(tmp_path / "none.jinja")]) == 1
    assert "neoxfuse: error: --chat-template " in capsys.readouterr().err


def test_neoxfuse_serve_passes_its_api_key_and_queue_limit_to_the_server(checkpoint, capsys, monkeypatch):
    keys, queues = [], []

    class Recorder(CompletionServer):
        def __init__(self, engine, address, model_name, chat_template, api_key, max_waiting):
            keys.append(api_key)
            queues.append(max_waiting)
            raise OSError("recorded")

    monkeypatch.setattr(neoxfuse.cli, "CompletionServer", Recorder)
    serve = ["serve", "--model", str(checkpoint), "--device", "cpu"]
    monkeypatch.delenv("NEOXFUSE_API_KEY", raising=False)
    assert main(serve) == 1
    monkeypatch.setenv("NEOXFUSE_API_KEY", "from-env")
    assert main(serve) == 1 and main([*serve, "--api-key", "from-cli", "--max-waiting", "2"]) == 1
    assert keys == [None, "from-env", "from-cli"] and queues == [None, None, 2]
    assert main([*serve, "--max-waiting", "-1"]) == 1
    assert "neoxfuse: error: max_waiting must be None or an integer >= 0, got -1" in capsys.readouterr().err
    for args in (["--api-key", " "], []):
        monkeypatch.setenv("NEOXFUSE_API_KEY", "")
        assert main([*serve, *args]) == 1
        assert "neoxfuse: error: the API key is empty; give one, or none to serve without" in capsys.readouterr().err
    assert len(keys) == 3
