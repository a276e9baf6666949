"""OpenAI's completions and chat completions APIs over HTTP, served by one Engine: `neoxfuse serve`.

    neoxfuse serve --model /ckpt/pythia-2.8b --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
    lm_eval --model local-completions --tasks arc_easy \\
        --model_args model=/ckpt/pythia-2.8b,base_url=http://127.0.0.1:8000/v1/completions

Routes: GET /v1/models (and /v1/models/NAME), GET /health, POST /v1/completions, POST
/v1/chat/completions, and vLLM's tokenizer routes POST /tokenize, POST /detokenize and GET
/tokenizer_info (which lm-evaluation-harness's local-completions model finds and then tokenizes
with). Batch 1: the Engine decodes one sequence at a time, so requests are served one after another
(the others wait for it), each at the Engine's speed. A client that closes its connection (a
timeout, say) takes its request with it: one that is still waiting never runs, and one that runs
stops at the Engine's next chunk of new tokens (up to 32), so abandoned requests do not hold up
those behind them. With max_waiting N (`neoxfuse serve --max-waiting N`), a request that would be
the N+1-th to wait is refused at once (503). The server's log (stderr) has a line per completion:
its id, prompt_tokens (cached), completion_tokens, prefill and TPOT.

A completion request (JSON) takes OpenAI's fields: prompt (text or token ids, or a list of them), n
(completions per prompt, default 1; choice p * n + i is prompt p's i-th, drawn with seed + i when
seeded), max_tokens (default 16; 0 with echo: the prompt only), temperature (default 1; 0 is
greedy), top_p, seed, stop (a string or a list of them), echo, logprobs (0 to 20), logit_bias
({token id: bias from -100 to 100}, added to those tokens' logits before anything else), stream and
stream_options.include_usage, presence_penalty and frequency_penalty (from -2 to 2, on the tokens
generated, as vLLM applies them); best_of only null or n and suffix only null (anything else is
refused, as is a field the API does not have); and vLLM's extensions top_k, min_p, typical_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos, allowed_token_ids (only these may be
generated), include_stop_str_in_output, skip_special_tokens (default true) and
truncate_prompt_tokens (each prompt cut to its last k tokens; echo then shows their text).

The reply is OpenAI's text_completion: a choice per prompt whose text is the new tokens' text
(special tokens skipped; after the prompt's text with echo), cut before the first stop string as
OpenAI cuts it, and finish_reason "stop" (an end-of-text token: the tokenizer's or the checkpoint
generation config's, as vLLM stops; a stop token or a stop string) or "length"; usage counts tokens
(prompt_tokens_details.cached_tokens: the prompt tokens an Engine with prefix_cache, `neoxfuse serve
--prefix-cache`, did not run again). logprobs N lists, per token, its text, its log-probability
where it was chosen (natural log, from the model's logits before the sampling rule: vLLM's default)
and the N most likely tokens there with the token itself (up to N + 1), and each token's offset in
the text; with echo the prompt's tokens come first, scored teacher forced as Engine.prompt_logprobs
scores them (the first with null, nothing predicts it). A token's text is what the tokenizer decodes
it to alone ("token_id:ID" without a tokenizer). Two fields more: the choice's token_ids (the new
tokens, so a checkpoint without a tokenizer can be served with token-id prompts) and timings
(prefill_ms summed and tpot_ms over the prompts' generations, backend). With stream, server-sent
events: for each prompt, a chunk with its text when echoed, a chunk per batch of new tokens the
Engine hands over (text that could still turn out to begin a stop string is held back, as is an
incomplete character; their logprobs come with the batch), a last chunk with the finish_reason; then
one with usage when asked, and `data: [DONE]`.

A chat completion request takes messages (a list of {role, content}, content text or a list of
text parts), rendered into the prompt by the chat template (`neoxfuse serve --chat-template FILE`,
else the tokenizer's own; Pythia's tokenizer has none) with the assistant's turn opened
(add_generation_prompt, default true), and then the completion fields above but prompt, echo,
best_of and suffix, with max_completion_tokens (or max_tokens; default: the rest of the KV cache),
and logprobs true or false with top_logprobs (0 to 20). The reply is OpenAI's chat.completion: a
choice per completion whose message is the assistant's, its text as above; logprobs {content:
[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}. Streamed, chat.completion.chunk
events whose choices carry the message's next piece as a delta (the first with the role). OpenAI's
response_format, tools, tool_choice, parallel_tool_calls and store are taken where they change
nothing (plain text, no tools, nothing stored: the values clients send as defaults), else refused.

A server started with an API key (`neoxfuse serve --api-key KEY`) answers every route but /health
only to requests that carry it, as OpenAI's clients send it: `Authorization: Bearer KEY`.

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 400 for a bad request (every
InvalidInputError of the Engine too, such as a prompt and max_tokens past the KV cache), 401 for a
missing or wrong API key (code invalid_api_key), 404 for an unknown route or model name (and the
tokenizer routes of a model without a tokenizer), 503 for a full queue (code overloaded), 500 for
anything else.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from neoxfuse.chat import chat_tokens
from neoxfuse.checks import check_token_ids, is_integer
from neoxfuse.engine import MAX_LOGPROBS, Engine, Generation
from neoxfuse.errors import InvalidInputError
from neoxfuse.sampling import SamplingParams
from neoxfuse.scoring import TokenLogprobs

DEFAULT_MAX_TOKENS = 16  # OpenAI's
_IGNORED = {"model", "user"}  # fields that change nothing
_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed"}
_FIELDS = {"prompt", "suffix", "n", "best_of", "logit_bias", "max_tokens", "stop", "echo", "logprobs", "stream", "stream_options",
           "min_tokens", "stop_token_ids", "ignore_eos", "allowed_token_ids", "include_stop_str_in_output", "skip_special_tokens",
           "truncate_prompt_tokens", *_SAMPLING, *_IGNORED}
# A chat request's own fields; the others it shares with a completion request (but for prompt,
# echo, best_of and suffix, which it does not have).
_CHAT_FIELDS = {"messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
                *(_FIELDS - {"prompt", "echo", "best_of", "suffix"})}
# Chat fields neoxfuse does not implement, taken at the values where they change nothing (as clients
# that send their defaults explicitly send them): plain text, no tools, nothing stored.
_CHAT_NEUTRAL = {"response_format": ({"type": "text"}, None), "tools": ([], None), "tool_choice": ("none", None),
                 "parallel_tool_calls": (True, False, None), "store": (False, None)}

Prompt = str | list[int]


class RequestError(Exception):
    """A request the server answers with an error: its HTTP status, OpenAI's error type and code."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    def body(self) -> dict:
        """OpenAI's error object."""
        return {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A completion request's body, checked and read as Engine.generate's arguments."""

    prompts: tuple[Prompt, ...]
    n: int  # choices per prompt
    max_tokens: int  # 0 only with echo
    sampling: SamplingParams
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]  # the end-of-text tokens (Engine.eos_token_ids, unless ignore_eos) and the request's
    min_tokens: int
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    include_stop: bool = False  # the text ends after its stop string, not before (vLLM's include_stop_str_in_output)
    skip_special: bool = True  # special tokens left out of the text (vLLM's skip_special_tokens)
    truncate: int | None = None  # each prompt cut to its last `truncate` tokens (vLLM's truncate_prompt_tokens)
    chat: bool = False  # answered as a chat completion (a request to /v1/chat/completions)

    @classmethod
    def parse(cls, body: object, engine: Engine, model_name: str) -> CompletionRequest:
        """RequestError for a body that is not a completion request this server implements."""
        body = _body(body, _FIELDS, model_name, "the completions API")
        if body.get("suffix") is not None:
            raise RequestError(f"suffix={body['suffix']!r} is not implemented (GPT-NeoX models are not trained to fill in "
                               "the middle; suffix only null)")
        for name in ("stream", "ignore_eos", "echo", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(body.get(name, False), bool):
                raise RequestError(f"{name} must be true or false, got {body[name]!r}")
        options = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
        for name in ("presence_penalty", "frequency_penalty"):
            if not (isinstance(options.get(name, 0), (int, float)) and -2 <= options.get(name, 0) <= 2):
                raise RequestError(f"{name} must be a number from -2 to 2, got {options[name]!r}")
        options.setdefault("temperature", 1.0)  # OpenAI's default: sampled
        if options.get("top_k") == -1:  # vLLM's word for all
            options["top_k"] = 0
        options["sequence_bias"] = {(token,): bias for token, bias in _logit_bias(body.get("logit_bias")).items()}
        options["suppress_tokens"] = _suppressed(body.get("allowed_token_ids"), engine.shape.vocab)
        sampling = SamplingParams(**options)  # InvalidInputError names a bad value
        eos = () if body.get("ignore_eos") else tuple(sorted(engine.eos_token_ids))
        stop_token_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_token_ids, list):
            raise RequestError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(text, str) and text for text in stop):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {body.get('stop')!r}")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise RequestError(f"stream_options takes include_usage only, got {stream_options!r}")
        echo = body.get("echo", False)
        max_tokens = body.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not is_integer(max_tokens) or max_tokens < (0 if echo else 1):
            raise RequestError(f"max_tokens must be an integer >= 1 (or 0 with echo: the prompt alone), got {max_tokens!r}")
        n = 1 if body.get("n") is None else body["n"]
        if not is_integer(n) or n < 1:
            raise RequestError(f"n must be an integer >= 1 (completions per prompt), got {n!r}")
        if body.get("best_of") not in (None, n):
            raise RequestError(f"best_of={body['best_of']!r} is not implemented (neoxfuse returns every completion it makes: "
                               "best_of only null or n)")
        truncate = body.get("truncate_prompt_tokens")
        if truncate is not None and (not is_integer(truncate) or truncate < 1):
            raise RequestError(f"truncate_prompt_tokens must be null or an integer >= 1, got {truncate!r}")
        logprobs = body.get("logprobs")
        if logprobs is not None and (not is_integer(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be null or an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r}")
        return cls(prompts=_prompts(body.get("prompt")), n=n, max_tokens=max_tokens, sampling=sampling, stop=tuple(stop),
                   stop_token_ids=(*eos, *stop_token_ids), min_tokens=body.get("min_tokens") or 0,
                   echo=echo, logprobs=logprobs, stream=body.get("stream", False),
                   include_usage=bool(stream_options.get("include_usage")),
                   include_stop=body.get("include_stop_str_in_output", False), skip_special=body.get("skip_special_tokens", True),
                   truncate=truncate)

    @classmethod
    def parse_chat(cls, body: object, engine: Engine, model_name: str, template: str | None) -> CompletionRequest:
        """A chat request (module docstring) read as the completion request of its prompt: the
        messages rendered by the chat template (`template`, else the tokenizer's) and tokenized.
        RequestError for a body that is not a chat request this server implements."""
        body = dict(_body(body, _CHAT_FIELDS | _CHAT_NEUTRAL.keys(), model_name, "the chat completions API"))
        for name, neutral in _CHAT_NEUTRAL.items():
            if not any(body.get(name) == value and type(body.get(name)) is type(value) for value in neutral):  # 1 is no true
                raise RequestError(f"{name}={body[name]!r} is not implemented (only {' or '.join(map(json.dumps, neutral))})")
            body.pop(name, None)
        opened = body.pop("add_generation_prompt", None)
        tokens = chat_tokens(engine, body.pop("messages", None), template, True if opened is None else opened)
        max_tokens = body.pop("max_completion_tokens", None)
        max_tokens = body.pop("max_tokens", None) if max_tokens is None else max_tokens
        truncate = body.get("truncate_prompt_tokens")  # checked by parse()
        run = min(len(tokens), truncate) if is_integer(truncate) and truncate >= 1 else len(tokens)  # the prompt tokens run
        room = max(engine.max_seq_len + 1 - run, 1)  # the new tokens the KV cache holds after the prompt
        body["max_tokens"] = room if max_tokens is None else max_tokens
        if not (body.get("logprobs") is None or isinstance(body["logprobs"], bool)):
            raise RequestError(f"logprobs must be true or false, got {body['logprobs']!r}")
        top = body.pop("top_logprobs", None)
        if top is not None and (not is_integer(top) or not 0 <= top <= MAX_LOGPROBS or not body.get("logprobs")):
            raise RequestError(f"top_logprobs must be null or an integer from 0 to {MAX_LOGPROBS}, with logprobs true; got {top!r}")
        body["logprobs"] = (top or 0) if body.get("logprobs") else None
        return replace(cls.parse({**body, "prompt": tokens}, engine, model_name), chat=True)


def _body(body: object, fields: set[str], model_name: str, api: str) -> dict:
    """A request's body, a JSON object of `fields` naming no model or this one; RequestError else."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if unknown := sorted(set(body) - fields):
        raise RequestError(f"unknown fields {unknown}: not in {api}")
    if body.get("model") not in (None, model_name):
        raise RequestError(f"the model {body['model']!r} does not exist here; this server serves {model_name!r}",
                           HTTPStatus.NOT_FOUND, "model_not_found")
    return body


def _logit_bias(given: object) -> dict[int, float]:
    """OpenAI's logit_bias, {token id (a JSON key: text): bias in [-100, 100]}, as {id: bias}; {} for null."""
    if given is None:
        return {}
    if not isinstance(given, dict) or not all(
            key.isdigit() and not isinstance(bias, bool) and isinstance(bias, (int, float)) and -100 <= bias <= 100
            for key, bias in given.items()):
        raise RequestError(f"logit_bias must map token ids to biases from -100 to 100, got {given!r}"[:300])
    return {int(key): float(bias) for key, bias in given.items()}


def _suppressed(allowed: object, vocab: int) -> frozenset[int]:
    """The tokens vLLM's allowed_token_ids (a non-empty list of ids, or null: all) leaves out."""
    if allowed is None:
        return frozenset()
    if not isinstance(allowed, list) or not allowed:
        raise RequestError(f"allowed_token_ids must be a non-empty list of token ids, got {allowed!r}"[:300])
    return frozenset(range(vocab)) - set(check_token_ids(allowed, vocab))


def _is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and all(is_integer(token) for token in prompt)


def _prompts(prompt: object) -> tuple[Prompt, ...]:
    """OpenAI's prompt as a tuple of prompts: text or token ids, or a non-empty list of either."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(isinstance(one, str) or _is_token_ids(one) for one in prompt):
        return tuple(prompt)
    raise RequestError(f"prompt must be text, a list of token ids, or a list of either; got {prompt!r}"[:300])


class CompletionText:
    """The text of the new tokens as far as it is final: decoded (special tokens skipped unless
    skip_special is false), cut before the first stop string (after the first to end, with
    include_stop); while generating (final=False), without an incomplete character at its end or an
    end that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], include_stop: bool = False, skip_special: bool = True):
        self.tokenizer, self.stop, self.include_stop, self.skip_special = tokenizer, stop, include_stop, skip_special
        self.tokens: list[int] = []
        self.stopped = False  # a stop string was found

    def text(self, final: bool) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special)
        found = [(text.index(stop), len(stop)) for stop in self.stop if stop in text]
        if found:
            self.stopped = True
            return text[: min(start + length for start, length in found)] if self.include_stop else text[: min(found)[0]]
        if final:
            return text
        text = text.rstrip("\ufffd")
        held = max((n for stop in self.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        return text[: len(text) - held]


class LogprobsListing:
    """OpenAI's logprobs object of a choice, built a batch of tokens at a time: each token's text,
    logprob, most likely tokens (with itself) and offset in the choice's text."""

    def __init__(self, token_text: Callable[[int], str]):
        self.token_text = token_text
        self.offset = 0  # where the next token's text starts
        self.whole: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def extend(self, tokens: list[int], listed: list[TokenLogprobs | None]) -> dict:
        """Lists `tokens` (their TokenLogprobs, or None where nothing predicted the token); the part
        of the object for these tokens alone (a streamed chunk's logprobs)."""
        part: dict[str, list] = {name: [] for name in self.whole}
        for token, entry in zip(tokens, listed, strict=True):
            text = self.token_text(token)
            top = None
            if entry is not None:
                top = {self.token_text(other): value for other, value in entry.top}
                if token not in {other for other, _ in entry.top}:
                    top[text] = entry.logprob
            part["tokens"].append(text)
            part["token_logprobs"].append(None if entry is None else entry.logprob)
            part["top_logprobs"].append(top)
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        for name, values in part.items():
            self.whole[name] += values
        return part


class ChatLogprobsListing:
    """The chat API's logprobs object of a choice, built a batch of tokens at a time: {"content": [
    {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}, ...]} (bytes: the token
    text's UTF-8 bytes)."""

    def __init__(self, token_text: Callable[[int], str]):
        self.token_text = token_text
        self.whole: dict[str, list] = {"content": []}

    def extend(self, tokens: list[int], listed: list[TokenLogprobs]) -> dict:
        """Lists `tokens` (their TokenLogprobs); the part of the object for these tokens alone."""
        part = [{**self._entry(token, entry.logprob), "top_logprobs": [self._entry(other, value) for other, value in entry.top]}
                for token, entry in zip(tokens, listed, strict=True)]
        self.whole["content"] += part
        return {"content": part}

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


class CompletionServer(ThreadingHTTPServer):
    """The completions API (module docstring) for `engine` at `address` (port 0: any free port;
    self.url says which), answering to `model_name` (default: the engine's description).
    serve_forever() serves until shutdown()."""

    daemon_threads = True

    def __init__(self, engine: Engine, address: tuple[str, int] = ("127.0.0.1", 8000), model_name: str | None = None,
                 chat_template: str | None = None, api_key: str | None = None, max_waiting: int | None = None):
        check_serving(api_key, max_waiting)
        super().__init__(address, _Handler)
        self.engine = engine
        self.model_name = model_name or engine.description
        self.chat_template = chat_template  # a Jinja chat template over the tokenizer's (None: the tokenizer's)
        self.api_key = api_key  # what every route but /health asks for as `Authorization: Bearer KEY` (None: nothing)
        self.created = int(time.time())
        self.engine_lock = threading.Lock()  # one generation at a time
        self.max_waiting = max_waiting  # requests that may wait behind the running one (None: any number)
        self._pending = 0  # completions running or waiting for the engine
        self._pending_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def complete(self, request: CompletionRequest, on_chunk: Callable[[dict], None] | None = None,
                 client_left: Callable[[], bool] = lambda: False) -> dict:
        """The completion of `request` as OpenAI's text_completion object (module docstring);
        on_chunk, if given, gets each choice's pieces as they come, in order, each as a choice of a
        streamed chunk: {index, text (the next piece of its final text), logprobs (its tokens' part
        of the logprobs object, or None), finish_reason (None until the choice's last)}.
        ConnectionResetError, and the engine free for the next request, where client_left() is true
        when the request's turn comes or between the Engine's chunks of new tokens; a 503
        RequestError where max_waiting requests already wait behind a running one."""
        prompts = [self._prompt_tokens(prompt, request.max_tokens, request.truncate)  # all checked before any runs
                   for prompt in request.prompts]
        with self._pending_lock:
            if self.max_waiting is not None and self._pending > self.max_waiting:
                raise RequestError(f"the server is busy: one request runs and {self._pending - 1} wait, the most it queues "
                                   f"(max_waiting {self.max_waiting}); try again later",
                                   HTTPStatus.SERVICE_UNAVAILABLE, "server_error", "overloaded")
            self._pending += 1
        try:
            return self._complete(request, prompts, on_chunk, client_left)
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _complete(self, request: CompletionRequest, prompts: list[list[int]], on_chunk: Callable[[dict], None] | None,
                  client_left: Callable[[], bool]) -> dict:
        """complete() once the request is admitted: its `prompts`' tokens, checked."""
        done = []
        with self.engine_lock:
            for number, (prompt, tokens) in enumerate(zip(request.prompts, prompts)):
                scored = None  # the prompt's logprobs, when echoed with them: scored once for its n choices
                if request.echo and request.logprobs is not None:
                    scored = self.engine.prompt_logprobs(tokens, request.logprobs)
                for copy in range(request.n):
                    sampling = request.sampling
                    if sampling.seed is not None:
                        sampling = replace(sampling, seed=(sampling.seed + copy) % 2**63)
                    _check_client(client_left)
                    done.append(self._choice(number * request.n + copy, prompt, tokens, scored, sampling, request, on_chunk,
                                             client_left))
        outs = [out for _, out in done if out is not None]
        prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(len(out.tokens) for out in outs)
        decode_ms = [ms for out in outs for ms in out.decode_ms]
        return {**self.header(request), "choices": [_chat_choice(choice) if request.chat else choice for choice, _ in done],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": sum(out.reused_tokens for out in outs)}},
                "timings": {"prefill_ms": sum(out.prefill_ms for out in outs),
                            "tpot_ms": sum(decode_ms) / len(decode_ms) if decode_ms else None, "backend": self.engine.backend_name}}

    def _prompt_tokens(self, prompt: Prompt, max_tokens: int, truncate: int | None) -> list[int]:
        """The prompt's token ids (its last `truncate`, if given), checked, as is the room for
        max_tokens new tokens after them."""
        tokens = check_token_ids(self.engine.encode(prompt) if isinstance(prompt, str) else prompt, self.engine.shape.vocab)
        tokens = tokens[-truncate:] if truncate else tokens
        if not tokens:
            raise InvalidInputError("the prompt is empty; give at least one token")
        if max_tokens:
            self.engine.check_room(len(tokens), max_tokens)
        return tokens

    def _choice(self, index: int, prompt: Prompt, tokens: list[int], scored: list[TokenLogprobs] | None, sampling: SamplingParams,
                request: CompletionRequest, on_chunk: Callable[[dict], None] | None,
                client_left: Callable[[], bool]) -> tuple[dict, Generation | None]:
        """The choice of `prompt` (its `tokens`; `scored`: their prompt_logprobs where echoed with
        logprobs) drawn by `sampling`, its pieces sent to on_chunk as they come (see complete()), and
        its Generation (None for max_tokens 0)."""
        engine = self.engine

        def send(text: str, logprobs: dict | None, finish_reason: str | None = None) -> None:
            if on_chunk is not None:
                on_chunk({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})

        listing = None if request.logprobs is None else (ChatLogprobsListing if request.chat else LogprobsListing)(self._token_text)
        echoed = ""
        if request.echo:
            if isinstance(prompt, str) and request.truncate is None:
                echoed = prompt
            else:  # token ids, or a prompt that may have been cut: the text of the tokens run
                echoed = "" if engine.tokenizer is None else engine.tokenizer.decode(tokens)
            part = None if listing is None else listing.extend(tokens, [None, *scored])
            if listing is not None:
                listing.offset = len(echoed)  # the new tokens' text comes after the prompt's
            send(echoed, part)
        if request.max_tokens == 0:
            send("", None, "length")
            return {"index": index, "text": echoed, "logprobs": listing and listing.whole, "finish_reason": "length",
                    "token_ids": []}, None
        text = CompletionText(engine.tokenizer, request.stop, request.include_stop, request.skip_special)
        sent, listed = "", []

        def on_tokens(new: list[int]) -> None:
            nonlocal sent
            _check_client(client_left)
            text.tokens += new
            part = None if listing is None else listing.extend(new, listed)
            listed.clear()
            now = text.text(final=False) if on_chunk is not None else sent
            if len(now) > len(sent) or part is not None:
                send(now[len(sent):], part)
                sent = now

        out = engine.generate(tokens, request.max_tokens, sampling, stop_token_ids=request.stop_token_ids,
                              stop=request.stop, min_new_tokens=request.min_tokens, on_tokens=on_tokens,
                              logprobs=request.logprobs, on_logprobs=None if listing is None else listed.extend)
        final = text.text(final=True)
        finish_reason = "stop" if text.stopped or out.tokens[-1] in request.stop_token_ids else "length"
        if len(final) > len(sent):
            send(final[len(sent):], None)
        send("", None, finish_reason)
        return {"index": index, "text": echoed + final, "logprobs": listing and listing.whole, "finish_reason": finish_reason,
                "token_ids": out.tokens}, out

    def _token_text(self, token: int) -> str:
        tokenizer = self.engine.tokenizer
        return f"token_id:{token}" if tokenizer is None else tokenizer.decode([token])

    def header(self, request: CompletionRequest, chunk: bool = False) -> dict:
        """The id, object, created and model fields of the reply to `request` (chunk: of its streamed chunks)."""
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
        return {"id": f"{'chatcmpl' if request.chat else 'cmpl'}-{secrets.token_hex(12)}", "object": kind,
                "created": int(time.time()), "model": self.model_name}

    def tokenizer_info(self) -> dict:
        """vLLM's GET /tokenizer_info: the tokenizer's special tokens, class and the context length."""
        tokenizer = self._tokenizer()
        return {"tokenizer_class": type(tokenizer).__name__, "model_max_length": self.engine.max_seq_len,
                **{name: getattr(tokenizer, name, None) for name in ("eos_token", "bos_token", "pad_token", "unk_token")}}

    def tokenize(self, body: object) -> dict:
        """vLLM's POST /tokenize of {"prompt", "add_special_tokens"}: the prompt's token ids."""
        body = _body(body, {"prompt", "add_special_tokens", "model"}, self.model_name, "/tokenize")
        if not isinstance(body.get("prompt"), str) or not isinstance(body.get("add_special_tokens", True), bool):
            raise RequestError("/tokenize takes a prompt (text) and add_special_tokens (true or false)")
        tokens = self._tokenizer().encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return {"count": len(tokens), "max_model_len": self.engine.max_seq_len, "tokens": tokens}

    def detokenize(self, body: object) -> dict:
        """vLLM's POST /detokenize of {"tokens"}: their text."""
        body = _body(body, {"tokens", "model"}, self.model_name, "/detokenize")
        tokens = body.get("tokens")
        if not _is_token_ids(tokens):
            raise RequestError(f"/detokenize takes tokens, a list of token ids; got {tokens!r}"[:300])
        return {"prompt": self._tokenizer().decode(check_token_ids(tokens, self.engine.shape.vocab))}

    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise RequestError(f"{self.model_name!r} has no tokenizer: give prompts as token ids", HTTPStatus.NOT_FOUND, "not_found")
        return self.engine.tokenizer


def check_serving(api_key: str | None, max_waiting: int | None) -> None:
    """InvalidInputError for an API key that is empty (it would let every request in) or a
    max_waiting other than None or an integer >= 0: CompletionServer's, checked before a model loads."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InvalidInputError("the API key is empty; give one, or none to serve without")
    if max_waiting is not None and (not is_integer(max_waiting) or max_waiting < 0):
        raise InvalidInputError(f"max_waiting must be None or an integer >= 0, got {max_waiting!r}")


def _check_client(client_left: Callable[[], bool]) -> None:
    if client_left():
        raise ConnectionResetError("the client left: its completion is not made")


def _chat_choice(choice: dict) -> dict:
    """A completion's choice as a chat completion's: its text as the assistant's message."""
    return {"index": choice["index"], "message": {"role": "assistant", "content": choice["text"]}, "logprobs": choice["logprobs"],
            "finish_reason": choice["finish_reason"], "token_ids": choice["token_ids"]}


def _chat_delta(choice: dict, first: bool) -> dict:
    """A streamed completion chunk's choice as a chat chunk's: its text as the message's next piece
    (the first with the role)."""
    delta = {"role": "assistant", "content": choice["text"]} if first else {"content": choice["text"]} if choice["text"] else {}
    return {"index": choice["index"], "delta": delta, "logprobs": choice["logprobs"], "finish_reason": choice["finish_reason"]}


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer

    def do_GET(self) -> None:
        try:
            if self.path != "/health":
                self._check_api_key()
            if self.path == "/health":
                self._send_json({"status": "ok"})
            elif self.path == "/v1/models":
                self._send_json({"object": "list", "data": [self._model()]})
            elif self.path.startswith("/v1/models/"):  # OpenAI's retrieve: the model named after it (URL-quoted or not)
                name = urllib.parse.unquote(self.path.removeprefix("/v1/models/"))
                if name != self.server.model_name:
                    raise RequestError(f"the model {name!r} does not exist here; this server serves {self.server.model_name!r}",
                                       HTTPStatus.NOT_FOUND, "model_not_found")
                self._send_json(self._model())
            elif self.path == "/tokenizer_info":
                self._send_json(self.server.tokenizer_info())
            else:
                raise RequestError(f"no route GET {self.path}", HTTPStatus.NOT_FOUND, "not_found")
        except RequestError as err:
            self._send_error(err)

    def do_POST(self) -> None:
        self.streaming = False  # whether a 200 and events went out: then an error can only end the stream
        try:
            self._check_api_key()
            routes = {"/v1/completions": None, "/v1/chat/completions": None, "/tokenize": self.server.tokenize,
                      "/detokenize": self.server.detokenize}
            if self.path not in routes:
                raise RequestError(f"no route POST {self.path} (neoxfuse serves /v1/completions and /v1/chat/completions)",
                                   HTTPStatus.NOT_FOUND, "not_found")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(f"the request body is not JSON: {err}") from None
            if routes[self.path] is not None:
                self._send_json(routes[self.path](body))
                return
            server = self.server
            if self.path == "/v1/chat/completions":
                request = CompletionRequest.parse_chat(body, server.engine, server.model_name, server.chat_template)
            else:
                request = CompletionRequest.parse(body, server.engine, server.model_name)
            if request.stream:
                result = self._stream(request)
            else:
                result = self.server.complete(request, client_left=self._client_left)
                self._send_json(result)
            self._log_completion(result)
        except (BrokenPipeError, ConnectionResetError):
            self.log_message("%s", f"{self.path}: the client left, and with it the generation it asked for")
        except Exception as err:  # noqa: BLE001 -- any failure is answered (a 500 for the unexpected); the server goes on
            if isinstance(err, InvalidInputError):
                err = RequestError(str(err))
            elif not isinstance(err, RequestError):
                self.log_error("%s", f"{type(err).__name__}: {err}")
                err = RequestError(f"{type(err).__name__}: {err}", HTTPStatus.INTERNAL_SERVER_ERROR, "server_error")
            if self.streaming:
                self._event(err.body())
                self._event("[DONE]")
            else:
                self._send_error(err)

    def _model(self) -> dict:
        """OpenAI's model object of the model served."""
        return {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "neoxfuse"}

    def _check_api_key(self) -> None:
        """A 401 unless the server has no API key or the request carries it (`Authorization: Bearer KEY`)."""
        key = self.server.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise RequestError("a missing or incorrect API key: send `Authorization: Bearer KEY` with the key the server was "
                               "started with (neoxfuse serve --api-key)", HTTPStatus.UNAUTHORIZED, code="invalid_api_key")

    def _stream(self, request: CompletionRequest) -> dict:
        """Server-sent events: each choice's chunks (text, logprobs, then its finish_reason; a chat's as
        deltas of its message), usage if asked, [DONE]; the completion, under its chunks' id. The 200
        goes out with the first chunk, so an error found before it (the Engine checks everything
        before it runs) is a plain error response."""
        header = self.server.header(request, chunk=True)
        opened: set[int] = set()  # the chat choices whose first chunk went out

        def send(choice: dict) -> None:
            if request.chat:
                choice = _chat_delta(choice, first=choice["index"] not in opened)
                opened.add(choice["index"])
            self._event({**header, "choices": [choice]})

        result = self.server.complete(request, send, self._client_left)
        if request.include_usage:
            self._event({**header, "choices": [], "usage": result["usage"]})
        self._event("[DONE]")
        return {**result, "id": header["id"]}  # the id its chunks carried

    def _log_completion(self, result: dict) -> None:
        """One line per completion in the server's log: its tokens and timings."""
        usage, timings = result["usage"], result["timings"]
        tpot = "" if timings["tpot_ms"] is None else f", tpot {timings['tpot_ms']:.3f} ms"
        self.log_message("%s", f"{result['id']}: prompt_tokens {usage['prompt_tokens']} (cached "
                               f"{usage['prompt_tokens_details']['cached_tokens']}), completion_tokens {usage['completion_tokens']}, "
                               f"prefill {timings['prefill_ms']:.2f} ms{tpot}")

    def _client_left(self) -> bool:
        """Whether the client has closed the connection: its request was read whole, so a client
        still waiting for the reply sends nothing, and the socket reads as ended only once it left."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:  # reset by the client
            return True

    def _event(self, data: dict | str) -> None:
        """One server-sent event (after the response's head, the first time)."""
        if not self.streaming:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.streaming = True
        self.wfile.write(b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, payload: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError) -> None:
        self._send_json(err.body(), err.status)
