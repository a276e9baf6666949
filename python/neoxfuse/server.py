"""OpenAI's completions API over HTTP, served by one Engine: `neoxfuse serve`.

    neoxfuse serve --model /ckpt/pythia-2.8b --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

Routes: GET /v1/models, GET /health, POST /v1/completions. Batch 1: the Engine decodes one sequence
at a time, so requests are served one after another (the others wait for it), each at the
Engine's speed.

A completion request (JSON) takes OpenAI's fields: prompt (text, token ids, or a list holding one
of them), max_tokens (default 16), temperature (default 1; 0 is greedy), top_p, seed, stop (a
string or a list of them), stream and stream_options.include_usage; n and best_of only at 1, echo
only false, logprobs and logit_bias only null, presence_penalty and frequency_penalty only 0
(anything else is refused, as is a field the API does not have); and vLLM's extensions top_k,
min_p, typical_p, repetition_penalty, min_tokens, stop_token_ids and ignore_eos.

The reply is OpenAI's text_completion: one choice whose text is the new tokens' text (special
tokens skipped), cut before the first stop string as OpenAI cuts it, and finish_reason "stop" (the
end-of-text token, a stop token or a stop string) or "length"; usage counts tokens. Two fields
more: the choice's token_ids (the new tokens, so a checkpoint without a tokenizer can be served
with token-id prompts) and timings (prefill_ms, tpot_ms, backend). With stream, server-sent events:
a chunk per batch of new tokens the Engine hands over (text that could still turn out to begin a
stop string is held back, as is an incomplete character), a last chunk with the finish_reason (and
one with usage when asked), then `data: [DONE]`.

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 400 for a bad request (every
InvalidInputError of the Engine too, such as a prompt and max_tokens past the KV cache), 404 for an
unknown route or model name, 500 for anything else.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from neoxfuse.checks import is_integer
from neoxfuse.engine import Engine, Generation
from neoxfuse.errors import InvalidInputError
from neoxfuse.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's
# Fields taken only where they change nothing (OpenAI's defaults), and fields that change nothing at all.
_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "logit_bias": None, "presence_penalty": 0,
            "frequency_penalty": 0, "suffix": None}
_IGNORED = {"model", "user"}
_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "seed"}
_FIELDS = {"prompt", "max_tokens", "stop", "stream", "stream_options", "min_tokens", "stop_token_ids", "ignore_eos",
           *_SAMPLING, *_NEUTRAL, *_IGNORED}


class RequestError(Exception):
    """A request the server answers with an error: its HTTP status and OpenAI's error type."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class CompletionRequest:
    """A completion request's body, checked and read as Engine.generate's arguments."""

    prompt: str | list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]  # the end-of-text token's (unless ignore_eos) and the request's; Engine checks them
    min_tokens: int
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, body: object, engine: Engine, model_name: str) -> CompletionRequest:
        """RequestError for a body that is not a completion request this server implements."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if unknown := sorted(set(body) - _FIELDS):
            raise RequestError(f"unknown fields {unknown}: not in the completions API")
        for name, neutral in _NEUTRAL.items():
            if body.get(name) not in (None, neutral):
                raise RequestError(f"{name}={body[name]!r} is not implemented (neoxfuse decodes one sequence; "
                                   f"it takes {name} only at {neutral!r})")
        if body.get("model") not in (None, model_name):
            raise RequestError(f"the model {body['model']!r} does not exist here; this server serves {model_name!r}",
                               HTTPStatus.NOT_FOUND, "model_not_found")
        for name in ("stream", "ignore_eos"):
            if not isinstance(body.get(name, False), bool):
                raise RequestError(f"{name} must be true or false, got {body[name]!r}")
        options = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
        options.setdefault("temperature", 1.0)  # OpenAI's default: sampled
        if options.get("top_k") == -1:  # vLLM's word for all
            options["top_k"] = 0
        sampling = SamplingParams(**options)  # InvalidInputError names a bad value
        eos = None if body.get("ignore_eos") or engine.tokenizer is None else engine.tokenizer.eos_token_id
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
        max_tokens = body.get("max_tokens")
        return cls(prompt=_prompt(body.get("prompt")), max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                   sampling=sampling, stop=tuple(stop), stop_token_ids=(*([] if eos is None else [eos]), *stop_token_ids),
                   min_tokens=body.get("min_tokens") or 0, stream=body.get("stream", False),
                   include_usage=bool(stream_options.get("include_usage")))


def _prompt(prompt: object) -> str | list[int]:
    """OpenAI's prompt as one prompt: text or token ids, or a list holding one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(is_integer(t) for t in prompt)):
        return prompt
    raise RequestError(f"prompt must be text, a list of token ids, or a list holding one of them (neoxfuse decodes one "
                       f"sequence); got {prompt!r}"[:300])


class CompletionText:
    """The text of the new tokens as far as it is final: decoded with special tokens skipped, cut
    before the first stop string; while generating (final=False), without an incomplete character
    at its end or an end that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.stopped = False  # a stop string was found

    def text(self, final: bool) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = [text.index(stop) for stop in self.stop if stop in text]
        if found:
            self.stopped = True
            return text[: min(found)]
        if final:
            return text
        text = text.rstrip("\ufffd")
        held = max((n for stop in self.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        return text[: len(text) - held]


class CompletionServer(ThreadingHTTPServer):
    """The completions API (module docstring) for `engine` at `address` (port 0: any free port;
    self.url says which), answering to `model_name` (default: the engine's description).
    serve_forever() serves until shutdown()."""

    daemon_threads = True

    def __init__(self, engine: Engine, address: tuple[str, int] = ("127.0.0.1", 8000), model_name: str | None = None):
        super().__init__(address, _Handler)
        self.engine = engine
        self.model_name = model_name or engine.description
        self.created = int(time.time())
        self.engine_lock = threading.Lock()  # one generation at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def complete(self, request: CompletionRequest, on_text: Callable[[str], None] | None = None) -> dict:
        """The completion of `request` as OpenAI's text_completion object (module docstring);
        on_text, if given, gets each new piece of final text as it comes."""
        text = CompletionText(self.engine.tokenizer, request.stop)
        sent = ""

        def on_tokens(tokens: list[int]) -> None:
            nonlocal sent
            text.tokens += tokens
            if on_text is not None and len(now := text.text(final=False)) > len(sent):
                on_text(now[len(sent):])
                sent = now

        with self.engine_lock:
            out = self.engine.generate(request.prompt, request.max_tokens, request.sampling, stop_token_ids=request.stop_token_ids,
                                       stop=request.stop, min_new_tokens=request.min_tokens, on_tokens=on_tokens)
        final = text.text(final=True)
        if on_text is not None and len(final) > len(sent):
            on_text(final[len(sent):])
        ended = text.stopped or out.tokens[-1] in request.stop_token_ids
        return {**self.header(), "choices": [{"index": 0, "text": final, "logprobs": None, "finish_reason": "stop" if ended else "length",
                                              "token_ids": out.tokens}],
                "usage": _usage(out), "timings": {"prefill_ms": out.prefill_ms, "tpot_ms": out.tpot_ms,
                                                  "backend": self.engine.backend_name}}

    def header(self) -> dict:
        return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}


def _usage(out: Generation) -> dict:
    return {"prompt_tokens": len(out.prompt_tokens), "completion_tokens": len(out.tokens),
            "total_tokens": len(out.prompt_tokens) + len(out.tokens)}


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_json({"status": "ok"})
        elif self.path == "/v1/models":
            self._send_json({"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                        "created": self.server.created, "owned_by": "neoxfuse"}]})
        else:
            self._send_error(RequestError(f"no route GET {self.path}", HTTPStatus.NOT_FOUND, "not_found"))

    def do_POST(self) -> None:
        self.streaming = False  # whether a 200 and events went out: then an error can only end the stream
        try:
            if self.path != "/v1/completions":
                raise RequestError(f"no route POST {self.path} (neoxfuse serves /v1/completions)", HTTPStatus.NOT_FOUND, "not_found")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(f"the request body is not JSON: {err}") from None
            request = CompletionRequest.parse(body, self.server.engine, self.server.model_name)
            if request.stream:
                self._stream(request)
            else:
                self._send_json(self.server.complete(request))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left, and with it the generation it asked for
        except Exception as err:  # noqa: BLE001 -- any failure is answered (a 500 for the unexpected); the server goes on
            if isinstance(err, InvalidInputError):
                err = RequestError(str(err))
            elif not isinstance(err, RequestError):
                self.log_error("%s", f"{type(err).__name__}: {err}")
                err = RequestError(f"{type(err).__name__}: {err}", HTTPStatus.INTERNAL_SERVER_ERROR, "server_error")
            if self.streaming:
                self._event({"error": {"message": str(err), "type": err.kind, "param": None, "code": None}})
                self._event("[DONE]")
            else:
                self._send_error(err)

    def _stream(self, request: CompletionRequest) -> None:
        """Server-sent events: chunks of text, the finish_reason, usage if asked, [DONE]. The 200
        goes out with the first text, so an error found before it (the Engine checks everything
        before it runs) is a plain error response."""
        header = self.server.header()

        def chunk(text: str, finish_reason: str | None = None) -> dict:
            return {**header, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        result = self.server.complete(request, on_text=lambda text: self._event(chunk(text)))
        self._event(chunk("", result["choices"][0]["finish_reason"]))
        if request.include_usage:
            self._event({**header, "choices": [], "usage": result["usage"]})
        self._event("[DONE]")

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
        self._send_json({"error": {"message": str(err), "type": err.kind, "param": None, "code": None}}, err.status)
