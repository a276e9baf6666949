"""The decode engine: batch-1 generation with GPT-NeoX through one interface over swappable backends.

    engine = Engine("pythia-70m")                   # a Pythia name: random-initialised model of that shape
    engine = Engine("/ckpt/pythia-2.8b")            # a local HF checkpoint directory (its tokenizer too;
                                                    # GPTQ int4 ones are dequantized at load)
    engine = Engine("EleutherAI/pythia-2.8b")       # a Hub repo id already in the local Hugging Face cache
    engine = Engine(hf_model) / Engine(weights)     # an in-memory GPTNeoXForCausalLM or ModelWeights
    out = engine.generate([1, 2, 3], max_new_tokens=32, sampling=SamplingParams(temperature=0.8, seed=1))
    out.tokens, out.prefill_ms, out.tpot_ms
    engine = Engine(..., prefix_cache=True)         # a prompt that starts where the last generation went
                                                    # reuses its KV cache: only the rest is prefilled
    engine.score(text).perplexity                   # teacher forced, through the backend's decode steps

A backend computes the model: `prefill(tokens, cache)` and `decode_step(token, cache)` give the
logits of the last token, `new_cache()` a KV cache holding `max_seq_len` positions, and the class
method `available(device, dtype, shape)` says whether it can run there and, if not, why. The
engine owns everything else: loading the model, checking the request, choosing tokens
(neoxfuse.sampling) and timing.

Adding a backend (the fused kernels, say): subclass `Backend`, decorate it with
`@register_backend`, and import its module at the end of this file so the registry holds it.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Union

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neoxfuse.checks import check_token_ids, is_integer
from neoxfuse.configs import NeoXShape, shape_of
from neoxfuse.device import synchronize
from neoxfuse.errors import InvalidInputError, NoGPUError, SequenceTooLongError, UnsupportedModelError
from neoxfuse.progress import progress_bar
from neoxfuse.quant.checkpoint import is_quantized_checkpoint, load_gptq_checkpoint
from neoxfuse.quant.hf_gptq import dequantized_gpt_neox, describe_dequantized
from neoxfuse.reference import ReferenceModel
from neoxfuse.sampling import SamplingParams, choose, next_token, processed_scores, token_id_set
from neoxfuse.scoring import (Loglikelihood, Scores, Span, TokenLogprobs, logprobs_of, resolve_stride, token_logprobs, token_scores,
                              top_logprobs, windows, with_prefix)
from neoxfuse.weights import (ModelWeights, describe_checkpoint, from_hf, load_checkpoint, load_generation_eos, load_tokenizer,
                              model_source, random_model, read_checkpoint_config)

ModelSource = Union[str, os.PathLike, torch.nn.Module, ModelWeights]

DECODE_CHUNK = 32  # decode steps queued on the device between host waits (and stop-token checks)
MAX_LOGPROBS = 20  # the most likely tokens a request's logprobs may list per token (vLLM's default limit)

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


# ----------------------------------------------------------------------------------------------
# Backends


class StepClock:
    """Marks the end of each decode step without making the host wait: a CUDA event recorded on the
    current stream on a GPU, the host clock on a CPU. A mark is made when the clock is created."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between successive marks (waits for the last one on a GPU)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [start.elapsed_time(end) for start, end in zip(self.marks, self.marks[1:])]
        return [(end - start) * 1e3 for start, end in zip(self.marks, self.marks[1:])]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on a device; `reason` says why not (or what it runs as)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class Backend(ABC):
    """One way of computing the model. Built on weights already on the engine's device and dtype."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @classmethod
    @abstractmethod
    def available(cls, device: torch.device, dtype: torch.dtype, shape: NeoXShape | None = None) -> Availability:
        """Whether this backend can run on `device` in `dtype` (for `shape`, when given)."""

    @abstractmethod
    def __init__(self, weights: ModelWeights, max_seq_len: int): ...

    @abstractmethod
    def new_cache(self):
        """An empty KV cache of `max_seq_len` positions, with attributes `length` and `max_seq_len`."""

    @abstractmethod
    def prefill(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Runs tokens [T] (long, on the device) from position cache.length; the last token's logits [vocab]."""

    @abstractmethod
    def decode_step(self, token: int | torch.Tensor, cache) -> torch.Tensor:
        """Runs one token (an id, or a [1] long tensor) at position cache.length; its logits [vocab].
        SequenceTooLongError when full."""

    def decode_tokens(self, token: int, cache, steps: int, sampling: SamplingParams, rng: torch.Tensor | None,
                      clock: StepClock, history: torch.Tensor | None = None, logits_out: torch.Tensor | None = None,
                      counts: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes `steps` tokens after `token` (at position cache.length) without waiting for the
        device: token i+1 = neoxfuse.sampling.choose(logits of token i, sampling, rng, history,
        counts). The chosen tokens [steps] (long, on the device); clock.mark() after each step;
        cache.length grows by `steps`; rng advances by `steps` draws when sampled, history gains the
        chosen tokens and counts counts them where the rule reads them (sampling.needs_history,
        counts_chosen); logits_out [>= steps, vocab] fp32, when given, gets step i's logits in row i.

        This default runs decode_step and choose per step; a backend overrides it to keep more
        of the loop on the device (the fused backend replays a CUDA graph per step).
        """
        chosen = []
        current: int | torch.Tensor = token
        constraints = None  # the rule's bans on the device, built once
        for _ in range(steps):
            logits = self.decode_step(current, cache)  # [vocab]
            if logits_out is not None:
                logits_out[len(chosen)].copy_(logits)
            if constraints is None:
                constraints = sampling.constraints(logits.shape[-1], logits.device)
            current = choose(logits, sampling, rng, history, constraints, counts)  # [1]
            chosen.append(current)
            clock.mark()
        return torch.cat(chosen)


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: makes `cls` selectable as Engine(..., backend=cls.name)."""
    BACKENDS[cls.name] = cls
    return cls


AUTO = "auto"
AUTO_ORDER = ("fused", "reference")  # what backend="auto" tries, fastest first


def backend_class(name: str) -> type[Backend]:
    """The registered backend called `name`; InvalidInputError listing the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise InvalidInputError(f"unknown backend {name!r}; available backends: {', '.join(sorted(BACKENDS))} "
                                f"(or {AUTO}: the fastest that can run)") from None


def auto_backend(device: torch.device, dtype: torch.dtype, shape: NeoXShape) -> tuple[str, str]:
    """(name, why) of the first backend of AUTO_ORDER that can run `shape` on `device` in `dtype`."""
    passed_over = []
    for name in AUTO_ORDER:
        availability = BACKENDS[name].available(device, dtype, shape)
        if availability:
            why = "; ".join([f"auto: {name}", *passed_over])
            return name, why
        passed_over.append(f"not {name}: {availability.reason}")
    raise InvalidInputError(f"no backend can run on {device}: " + "; ".join(passed_over))


def backend_availability(device: torch.device, dtype: torch.dtype, shape: NeoXShape | None = None) -> dict[str, Availability]:
    """Every registered backend's answer to whether it can run on `device` in `dtype`."""
    return {name: cls.available(device, dtype, shape) for name, cls in sorted(BACKENDS.items())}


@register_backend
class ReferenceBackend(Backend):
    """neoxfuse.reference.ReferenceModel: plain PyTorch, any device and dtype. The oracle, not fast."""

    name = "reference"
    summary = "plain PyTorch (neoxfuse.reference), any device and dtype; the oracle, not fast"

    @classmethod
    def available(cls, device, dtype, shape=None):
        return Availability(True, f"plain PyTorch on {device.type}")

    def __init__(self, weights: ModelWeights, max_seq_len: int):
        self.model = ReferenceModel(weights, max_seq_len=max_seq_len)

    def new_cache(self):
        return self.model.new_cache()

    def prefill(self, tokens, cache):
        return self.model.prefill(tokens, cache, last_only=True)[0]

    def decode_step(self, token, cache):
        return self.model.decode_step(token, cache)


# ----------------------------------------------------------------------------------------------
# Models, devices, dtypes


@dataclass(frozen=True)
class LoadedModel:
    weights: ModelWeights
    tokenizer: object | None  # a transformers tokenizer, when the checkpoint has one
    description: str  # "pythia-70m (random-initialised)", a checkpoint path, ...
    random_init: bool
    eos_token_ids: tuple[int, ...] = ()  # the generation config's (a checkpoint's generation_config.json, a model's)


def load_model(source: ModelSource, *, dtype: torch.dtype = torch.float32, seed: int = 0,
               device: str | torch.device = "cpu", revision: str | None = None) -> LoadedModel:
    """Weights and tokenizer from any model source.

    A Pythia name (configs.MODEL_NAMES) gives a random-initialised model of that shape, drawn on
    `device` in `dtype` from `seed` (weights.random_model); a directory, or a Hub repo id at `revision`
    in the local Hugging Face cache (weights.model_source), is read as an HF checkpoint onto the CPU (a
    GPTQ one dequantized to `dtype`); an in-memory GPTNeoXForCausalLM or ModelWeights is used as it is,
    where it is (no copy).
    """
    if revision is not None and not isinstance(source, (str, os.PathLike)):
        raise InvalidInputError(f"a revision ({revision!r}) picks a version of a Hub repo id; got a {type(source).__name__}")
    if isinstance(source, ModelWeights):
        return LoadedModel(source, None, "in-memory ModelWeights", random_init=False)
    if isinstance(source, torch.nn.Module):
        model_type = getattr(getattr(source, "config", None), "model_type", None)
        if model_type != "gpt_neox":
            raise UnsupportedModelError(f"neoxfuse runs GPT-NeoX models; got {type(source).__name__} (model_type {model_type!r})")
        eos = getattr(getattr(source, "generation_config", None), "eos_token_id", None)
        eos = () if eos is None else tuple(stop_token_set(eos))
        return LoadedModel(from_hf(source), None, f"in-memory {type(source).__name__}", random_init=False, eos_token_ids=eos)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidInputError(f"a model is a Pythia name, a checkpoint directory, a cached Hub repo id, a GPTNeoXForCausalLM or ModelWeights; got {type(source).__name__}")
    resolved = model_source(source, revision)
    if isinstance(resolved, str):
        weights = from_hf(random_model(resolved, seed=seed, dtype=dtype, device=device))
        return LoadedModel(weights, None, f"{resolved} (random-initialised)", random_init=True)
    description = describe_checkpoint(source, resolved, revision)
    if is_quantized_checkpoint(resolved):
        return _load_gptq_checkpoint(resolved, dtype, description)
    weights, tokenizer = load_checkpoint(resolved)
    return LoadedModel(weights, tokenizer, description, random_init=False, eos_token_ids=load_generation_eos(resolved))


def load_hf_model(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                  device: str | torch.device = "cpu", revision: str | None = None,
                  attn_implementation: str = "sdpa") -> tuple[GPTNeoXForCausalLM, str]:
    """(the HF transformers model that a model string names, loaded by transformers itself, on `device` in
    `dtype`; its description): the independent implementation that load_model's weights and the backends
    are compared with, and the benchmarks' HF peers.

    A Pythia name gives random_model(name, seed) (the weights load_model draws for the same seed, dtype
    and device); a GPTQ checkpoint directory its dequantized model (transformers reads GPTQ only with
    optional packages); any other checkpoint directory or cached Hub repo id GPTNeoXForCausalLM.from_pretrained,
    after checking that neoxfuse computes its sizes and options.
    """
    resolved = model_source(source, revision)
    if isinstance(resolved, str):
        model = random_model(resolved, seed=seed, dtype=dtype, attn_implementation=attn_implementation, device=device)
        return model, f"{resolved} (random-initialised)"
    read_checkpoint_config(resolved)  # the errors load_model gives for a directory that is not GPT-NeoX
    description = describe_checkpoint(source, resolved, revision)
    if is_quantized_checkpoint(resolved):
        checkpoint = load_gptq_checkpoint(resolved)
        return dequantized_gpt_neox(checkpoint, device, dtype), describe_dequantized(description, checkpoint, dtype)
    shape_of(GPTNeoXConfig.from_pretrained(resolved))  # UnsupportedModelError for sizes or options neoxfuse does not compute
    model = GPTNeoXForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), description


def _load_gptq_checkpoint(path: Path, dtype: torch.dtype, description: str) -> LoadedModel:
    """A GPTQ checkpoint directory, every quantized linear dequantized to `dtype` (W = scales * (q - z)):
    the engine's backends run dense weights. UnsupportedModelError for a quantization that is not GPTQ."""
    checkpoint = load_gptq_checkpoint(path)
    weights = from_hf(dequantized_gpt_neox(checkpoint, "cpu", dtype))
    return LoadedModel(weights, load_tokenizer(path), describe_dequantized(description, checkpoint, dtype), random_init=False,
                       eos_token_ids=load_generation_eos(path))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: CUDA when torch has a GPU, else CPU. NoGPUError for CUDA without one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InvalidInputError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
            raise NoGPUError(f"device {str(device)!r} needs a CUDA GPU and this machine has none usable ({build}); use cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        if resolved.index >= torch.cuda.device_count():
            raise InvalidInputError(f"there is no {resolved}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise InvalidInputError(f"neoxfuse runs on cpu or cuda, not {resolved.type}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, model_dtype: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype: `dtype` if given (a torch.dtype or a DTYPES name); else fp32 on CPU, and on
    CUDA bf16 for a model whose weights are bf16 (trained so, its activations may outgrow fp16's
    range), fp16 otherwise."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidInputError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    """The tokens a generate() call produced and how long they took.

    prefill_ms: the prompt's forward pass plus choosing the first new token (time to first token).
    decode_ms: one entry per later token: its decode step plus choosing it; tpot_ms is their mean.
    reused_tokens: how many prompt tokens were not run because the KV cache the last generation left
    held them (Engine(prefix_cache=True)); prefill_ms covers the other len(prompt_tokens) - reused_tokens.
    Tokens are chosen on the device, DECODE_CHUNK steps between waits, each step timed from the
    end of the one before (CUDA events on a GPU), so idle device time counts too.
    """

    prompt_tokens: list[int]
    tokens: list[int]  # the new tokens, without the prompt
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)
    text: str | None = None  # the new tokens decoded, when the engine has a tokenizer
    seed: int | None = None  # the seed sampled tokens were drawn with (None: greedy); pass it to redraw them
    reused_tokens: int = 0  # the prompt's first tokens, whose keys and values the last generation left in the cache
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when generate() was asked for them
    logits: torch.Tensor | None = None  # [N, vocab] fp32 on the device: each new token's logits (generate's keep_logits)
    scores: torch.Tensor | None = None  # [N, vocab] fp32 on the device: the same after the rule (generate's keep_scores)

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: mean(decode_ms); None with a single new token."""
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else None


class Engine:
    """Batch-1 generation with one GPT-NeoX model on one device, computed by one backend.

    model: a Pythia name (random-initialised from `seed`, drawn on `device`), a checkpoint directory or a
    Hub repo id in the local Hugging Face cache (at `revision`: a branch, tag or commit, such as Pythia's
    step100000), a GPTNeoXForCausalLM or ModelWeights. backend: a name in BACKENDS, or "auto" (the default): the
    first of AUTO_ORDER that can run here (`fused` on an sm_90 or sm_12x GPU in fp16 or bf16, else `reference`);
    `backend_name` and `backend_reason` say which and why. device: CUDA when there is a
    GPU, else CPU. dtype: fp16 on CUDA (bf16 for a bf16 model), fp32 on CPU. max_seq_len: the KV cache's capacity in
    positions (a generation fills prompt + new tokens - 1); the model's max_positions by default.

    prefix_cache: keep the KV cache a generation leaves (its prompt and new tokens, but the last) for
    the next one, which runs only the part of its prompt after the longest prefix they share: a
    conversation's next turn, or the same prompt again, costs a prefill of the new tokens only. Off by
    default, because a reused prefix's keys and values come from the decode steps that made them,
    not from a prefill, and the two round differently: with it on, the tokens of a generation may
    depend, at near ties, on the generation before it. Setting engine.prefix_cache turns it on or off
    between generations.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        backend: str = AUTO,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_seq_len: int | None = None,
        tokenizer=None,
        seed: int = 0,
        revision: str | None = None,
        prefix_cache: bool = False,
    ):
        if max_seq_len is not None and (not is_integer(max_seq_len) or max_seq_len < 1):
            raise InvalidInputError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
        if tokenizer is not None and not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode")):
            raise InvalidInputError(f"tokenizer must be a tokenizer object with encode and decode (AutoTokenizer.from_pretrained"
                                    f"(...)), got {type(tokenizer).__name__}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if backend != AUTO:
            self._require_available(backend_class(backend), None)
        loaded = load_model(model, dtype=self.dtype, seed=seed, device=self.device, revision=revision)
        if dtype is None:
            self.dtype = resolve_dtype(None, self.device, loaded.weights.embed_in.dtype)
        self.shape: NeoXShape = loaded.weights.shape
        if backend == AUTO:
            backend, self.backend_reason = auto_backend(self.device, self.dtype, self.shape)
        else:
            self.backend_reason = self._require_available(backend_class(backend), self.shape)
        self.backend_name = backend
        backend_cls = backend_class(backend)
        self.max_seq_len = self.shape.max_positions if max_seq_len is None else int(max_seq_len)
        self.weights = loaded.weights.to(device=self.device, dtype=self.dtype)
        self.backend = backend_cls(self.weights, self.max_seq_len)
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        # The ids that end a text: the tokenizer's end-of-text token and the generation config's (what
        # the CLI and the server stop at; generate() itself stops where its stop_token_ids say).
        self.eos_token_ids = frozenset(t for t in {*loaded.eos_token_ids, *([] if tokenizer_eos is None else [tokenizer_eos])}
                                       if 0 <= t < self.shape.vocab)
        self.description = loaded.description
        self.random_init = loaded.random_init
        self.prefix_cache = prefix_cache
        self._kept: tuple[object, list[int]] | None = None  # (cache, the tokens at its positions) left for the next call
        self._prefilled: tuple[object, list[int]] | None = None  # (cache, the tokens a prefill alone put at its first positions)

    def _require_available(self, backend_cls: type[Backend], shape: NeoXShape | None) -> str:
        """What the backend runs as; InvalidInputError saying why when it cannot run here."""
        availability = backend_cls.available(self.device, self.dtype, shape)
        if not availability:
            dtype_name = str(self.dtype).replace("torch.", "")
            raise InvalidInputError(f"backend {backend_cls.name!r} cannot run on {self.device} in {dtype_name}: {availability.reason}")
        return availability.reason

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the checkpoint's tokenizer; InvalidInputError without one."""
        if self.tokenizer is None:
            raise InvalidInputError(
                f"a text prompt needs a tokenizer and {self.description} has none; pass token ids instead "
                "(or a checkpoint directory that holds tokenizer files)"
            )
        return list(self.tokenizer.encode(text))

    def _prompt_tokens(self, prompt: str | Sequence[int] | torch.Tensor, what: str = "prompt") -> list[int]:
        """The ids of `prompt` (called the `what` in errors): text encoded by the tokenizer, a sequence
        of integer ids, or an integer tensor or NumPy array [T] (or [1, T], one sequence as HF writes
        input_ids). Anything else is refused, not converted: a float would be cut to an int, a batch
        run as one sequence."""
        if not isinstance(prompt, (str, torch.Tensor)) and hasattr(prompt, "__array__"):  # a NumPy array
            prompt = torch.as_tensor(prompt)
        if isinstance(prompt, str):
            tokens = self.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dtype == torch.bool or prompt.is_floating_point() or prompt.is_complex():
                raise InvalidInputError(f"token ids must be integers, got a {prompt.dtype} tensor")
            if not (prompt.dim() == 1 or (prompt.dim() == 2 and prompt.shape[0] == 1)):
                raise InvalidInputError(f"a prompt tensor must be one sequence, [T] or [1, T]; got {list(prompt.shape)} "
                                        "(neoxfuse decodes batch 1)")
            tokens = prompt.flatten().tolist()
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
            tokens = list(prompt)
        else:
            raise InvalidInputError(f"a prompt is text, a sequence of token ids or an integer tensor or array; got "
                                    f"{type(prompt).__name__}")
        if not tokens:
            raise InvalidInputError(f"the {what} is empty; give at least one token")
        return check_token_ids(tokens, self.shape.vocab)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        max_new_tokens: int = 32,
        sampling: SamplingParams | None = None,
        *,
        stop_token_ids: int | Collection[int] | torch.Tensor = (),
        stop: str | Collection[str] = (),
        min_new_tokens: int = 0,
        begin_suppress_tokens: Collection[int] = (),
        stop_when: Callable[[list[int]], bool] | None = None,
        progress: bool = False,
        on_tokens: Callable[[list[int]], None] | None = None,
        logprobs: int | None = None,
        on_logprobs: Callable[[list[TokenLogprobs]], None] | None = None,
        keep_logits: bool = False,
        keep_scores: bool = False,
    ) -> Generation:
        """Generates up to `max_new_tokens` tokens after `prompt` (text or token ids).

        Greedy unless `sampling` says otherwise; stops early after a token in `stop_token_ids`, or after
        the token that completes one of the `stop` strings in the new text (which needs a tokenizer; the
        text then ends with that string, or with the rest of that token's text after it). The first
        `min_new_tokens` new tokens are never one of stop_token_ids (transformers' min_new_tokens:
        they are added to the sampling rule's suppress_tokens for those tokens; a stop string still ends);
        the first new token is never one of begin_suppress_tokens (transformers' option of that name).
        stop_when, if given, also ends it after the first new token where stop_when(the new tokens so
        far) is true (a host function, called for each new token; neoxfuse.hf.generate's stop_strings).
        on_tokens, if given, streams the new tokens: it is called with each batch as soon as the host
        has it (the first token, then each chunk of up to DECODE_CHUNK decode steps), in order.
        logprobs (0 to MAX_LOGPROBS), if given, records each new token's TokenLogprobs with that many
        most likely tokens (Generation.logprobs): from the logits it was chosen from, as the model gives
        them (before the rule's temperature, penalties and filters); on_logprobs, if given, gets each
        batch of them just before on_tokens gets the batch's tokens. keep_logits keeps the logits each
        new token was chosen from (Generation.logits: transformers' output_logits), keep_scores the
        same after the rule (Generation.scores: sampling.processed_scores, transformers' output_scores).
        SequenceTooLongError, before any work, when the prompt and the new tokens but the last (which is
        never fed back) need more than max_seq_len KV cache positions. With prefix_cache on, the prompt's
        first tokens that the last generation left in the cache are not run again (Generation.reused_tokens).
        """
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise InvalidInputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if on_tokens is not None and not callable(on_tokens):
            raise InvalidInputError(f"on_tokens must be a function of a list of token ids, got {type(on_tokens).__name__}")
        if logprobs is not None and (not is_integer(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
            raise InvalidInputError(f"logprobs must be None or an integer from 0 to {MAX_LOGPROBS} (how many of the most likely "
                                    f"tokens to list per token), got {logprobs!r}")
        if on_logprobs is not None and (logprobs is None or not callable(on_logprobs)):
            raise InvalidInputError("on_logprobs must be a function of a list of TokenLogprobs, and needs logprobs")
        prompt_tokens = self._prompt_tokens(prompt)
        if stop_when is not None and not callable(stop_when):
            raise InvalidInputError(f"stop_when must be a function of the new tokens, got {type(stop_when).__name__}")
        stop_rule = StopRule(stop_token_set(stop_token_ids), self._stop_strings(stop), self.tokenizer, stop_when)
        self.check_room(len(prompt_tokens), max_new_tokens)
        if not is_integer(min_new_tokens) or min_new_tokens < 0:
            raise InvalidInputError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        sampling = sampling.seeded()  # an unseeded request gets its seed here, reported in the result
        early = sampling  # the rule of the first min_new_tokens tokens (all of them: sampling)
        if min_new_tokens and (stops := {t for t in stop_rule.token_ids if 0 <= t < self.shape.vocab}):
            early = replace(sampling, suppress_tokens=sampling.suppress_tokens | stops)
        begin = token_id_set(begin_suppress_tokens, "begin_suppress_tokens")
        first = replace(early, suppress_tokens=early.suppress_tokens | begin)  # the first token's rule
        first.check_vocab(self.shape.vocab)
        rng = sampling.rng(self.device)  # [seed, draw] on the device
        history = sampling.history(prompt_tokens, self.max_seq_len + 1, self.device)  # [max_seq_len + 1], where read
        counts = sampling.counts([], self.shape.vocab, self.device)  # [vocab], where read
        cache, reused = self._cache_for(prompt_tokens)
        prompt_tensor = torch.tensor(prompt_tokens[reused:], dtype=torch.long, device=self.device)  # [T - reused]

        synchronize(self.device)
        start = time.perf_counter()
        logits = self.backend.prefill(prompt_tensor, cache)  # [vocab]
        token = next_token(logits, first, rng, history, counts=counts)  # int(): waits for the GPU
        result = Generation(prompt_tokens, [], prefill_ms=(time.perf_counter() - start) * 1e3, seed=sampling.seed,
                            reused_tokens=reused, logprobs=None if logprobs is None else [])
        listed = None if logprobs is None else logprobs_of(logits[None], torch.tensor([token], device=self.device), logprobs)
        streams = (on_tokens, on_logprobs)
        stopped = _take(result, [token], [], listed, stop_rule, streams)
        kept_rows = ([] if keep_logits else None, [] if keep_scores else None)  # [n, vocab] each, where kept
        self._keep(logits[None], first, prompt_tokens, [], result.tokens, kept_rows)
        with_logits = logprobs is not None or keep_logits or keep_scores
        with progress_bar(max_new_tokens, "decoding", unit="tok", enabled=progress) as bar:
            bar.update(1)
            while not stopped and len(result.tokens) < max_new_tokens:
                done = len(result.tokens)
                steps = min(DECODE_CHUNK, max_new_tokens - done)
                rule = sampling
                if done < min_new_tokens:  # the chunk ends where the stop tokens may come again
                    steps, rule = min(steps, min_new_tokens - done), early
                tokens, times, logits = self._decode_chunk(token, cache, steps, rule, rng, history, counts, with_logits)
                token = tokens[-1]
                taken = len(result.tokens)
                listed = None if logprobs is None else logprobs_of(logits, torch.tensor(tokens, device=self.device), logprobs)
                stopped = _take(result, tokens, times, listed, stop_rule, streams)
                self._keep(logits, rule, prompt_tokens, result.tokens[:taken], result.tokens[taken:], kept_rows)
                bar.update(len(result.tokens) - taken)
        result.logits, result.scores = (None if rows is None else torch.cat(rows) for rows in kept_rows)
        if self.prefix_cache:  # the tokens at the cache's first positions (steps run after a stop token come later)
            self._kept = (cache, prompt_tokens + result.tokens[:-1])
        if self.tokenizer is not None:
            result.text = self.tokenizer.decode(result.tokens)
        return result

    def check_room(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """InvalidInputError for a max_new_tokens that is not an integer >= 1, SequenceTooLongError
        when a prompt of `prompt_tokens` tokens and max_new_tokens new tokens but the last (which is
        never fed back) need more than max_seq_len KV cache positions: generate()'s checks of them."""
        if not is_integer(max_new_tokens) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        positions = prompt_tokens + max_new_tokens - 1
        if positions > self.max_seq_len:
            raise SequenceTooLongError(
                f"a {prompt_tokens}-token prompt and {max_new_tokens} new tokens need {positions} KV cache positions; "
                f"the cache holds {self.max_seq_len}: ask for at most {max(self.max_seq_len - prompt_tokens + 1, 0)} "
                "new tokens or build the Engine with a larger max_seq_len"
            )

    @torch.inference_mode()
    def score(self, text: str | Sequence[int] | torch.Tensor, *, window: int | None = None, stride: int | None = None,
              prefix_token: int | None = None, progress: bool = False) -> Scores:
        """Teacher-forced scores of `text` (token ids, or text with a tokenizer) in windows of up to
        `window` tokens (max_seq_len + 1 by default: the model runs all but a window's last token, which
        is only predicted, so each window uses the whole KV cache) starting every `stride` tokens (window - 1 by default:
        overlapping by one token), each token after the first scored once, from the tokens before it
        in its window (neoxfuse.scoring). With a `prefix_token` (e.g. the tokenizer's eos_token_id) it
        goes first and the text's first token is scored too (then Scores.text_measures gives word and
        byte perplexity). Each window starts from an empty KV cache; its context-only tokens are
        prefilled and every scored prediction is a decode step of the backend: on the fused backend,
        the decode kernels. Scores.perplexity = exp(mean NLL). Leaves nothing for the prefix cache.
        """
        tokens = with_prefix(self._prompt_tokens(text, "text"), prefix_token, self.shape.vocab)
        window = self.max_seq_len + 1 if window is None else window
        spans = windows(len(tokens), window, stride)  # checks all three
        if window - 1 > self.max_seq_len:
            raise SequenceTooLongError(f"a scoring window of {window} tokens runs the model on {window - 1} positions (its last "
                                       f"token is only predicted), more than the {self.max_seq_len} of the KV cache: use a window "
                                       f"of at most {self.max_seq_len + 1} tokens (or an Engine with a larger max_seq_len, up "
                                       f"to the model's {self.shape.max_positions} positions)")
        synchronize(self.device)
        start = time.perf_counter()
        nll, top1, _ = self._score_spans(tokens, spans, progress)
        return Scores(tokens, window, resolve_stride(window, stride), nll, top1, (time.perf_counter() - start) * 1e3,
                      None if prefix_token is None else tokens[0])

    @torch.inference_mode()
    def loglikelihood(self, context: str | Sequence[int], continuation: str | Sequence[int]) -> Loglikelihood:
        """How likely `continuation` is after `context` (token ids, or text with a tokenizer, each
        encoded on its own): log p(continuation | context) = -sum of the continuation tokens' NLL,
        and whether each is the most likely token where it is predicted (greedy). The context is
        prefilled (but not again for the next call with the same context, such as the next choice
        of a multiple-choice question: the cache still holds it) and every continuation token's
        prediction is a decode step of the backend (on the fused backend, the decode kernels). A
        context and continuation longer than max_seq_len + 1 tokens lose the context's first tokens
        (as lm-evaluation-harness truncates them); a continuation of more than max_seq_len tokens is
        refused. Leaves nothing for the prefix cache.
        """
        context_tokens = self._prompt_tokens(context, "context")
        continuation_tokens = self._prompt_tokens(continuation, "continuation")
        if len(continuation_tokens) > self.max_seq_len:
            raise SequenceTooLongError(f"a continuation of {len(continuation_tokens)} tokens needs as many KV cache positions "
                                       f"(its last token only predicted, after the context's last); the cache holds {self.max_seq_len}")
        tokens = (context_tokens + continuation_tokens)[-(self.max_seq_len + 1) :]
        nll, top1, _ = self._score_spans(tokens, [Span(0, len(tokens) - len(continuation_tokens), len(tokens))], False)
        scored = nll[-len(continuation_tokens) :]
        greedy = top1[-len(continuation_tokens) :].tolist() == continuation_tokens
        return Loglikelihood(logprob=-float(scored.sum()), greedy=greedy, context_tokens=len(tokens) - len(continuation_tokens))

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: str | Sequence[int] | torch.Tensor, top: int = 0) -> list[TokenLogprobs]:
        """The TokenLogprobs of the prompt's tokens but the first (which nothing predicts), each from the
        tokens before it, with its `top` (0 to MAX_LOGPROBS) most likely tokens: [T-1] for a T-token
        prompt. Teacher forced as score() with its default windows: every prediction is a decode step
        of the backend (on the fused backend, the decode kernels). Leaves nothing for the prefix cache.
        """
        tokens = self._prompt_tokens(prompt)
        if not is_integer(top) or not 0 <= top <= MAX_LOGPROBS:
            raise InvalidInputError(f"top must be an integer from 0 to {MAX_LOGPROBS}, got {top!r}")
        if len(tokens) < 2:
            return []
        nll, _, (values, ids) = self._score_spans(tokens, windows(len(tokens), self.max_seq_len + 1), False, top)
        return token_logprobs(tokens[1:], nll, values, ids)

    def _score_spans(self, tokens: list[int], spans: list[Span], progress: bool,
                     top: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(nll [T-1] fp64, top1 [T-1] long, top_logprobs() [T-1, top]), on the CPU, of tokens [T] in `spans`
        (neoxfuse.scoring's windows; entries no span scores stay 0): each span from an empty KV cache, its context-only
        tokens prefilled and every scored prediction a decode step. A span's context that is the
        last prefill's (of this call or the last scoring call: the choices of a multiple-choice
        question share theirs) is not prefilled again: the cache still holds it, bitwise as a
        prefill would write it, since the decode steps after a prefill write only positions after it."""
        prefilled, self._prefilled, self._kept = self._prefilled, None, None
        cache = self.backend.new_cache() if prefilled is None else prefilled[0]
        ids = torch.tensor(tokens, device=self.device)  # [T]
        nll = torch.zeros(len(tokens) - 1, device=self.device)  # [T-1]: nll[t - 1] scores tokens[t]
        top1 = torch.zeros(len(tokens) - 1, dtype=torch.long, device=self.device)  # [T-1]
        top_values = torch.zeros(len(tokens) - 1, top, device=self.device)  # [T-1, top]
        top_ids = torch.zeros(len(tokens) - 1, top, dtype=torch.long, device=self.device)  # [T-1, top]
        with progress_bar(sum(span.end - span.scored for span in spans), "scoring", unit="tok", enabled=progress) as bar:
            for span in spans:
                context = tokens[span.start : span.scored - 1]  # the tokens the window runs but does not score
                if prefilled is not None and prefilled[1] == context:
                    cache.length = len(context)
                else:
                    cache.length = 0  # the positions are written before they are read
                    if context:
                        self.backend.prefill(ids[span.start : span.scored - 1], cache)
                    prefilled = (cache, context) if context else None
                for t in range(span.scored - 1, span.end - 1):
                    logits = self.backend.decode_step(tokens[t], cache)  # [vocab]: predicts tokens[t + 1]
                    nll[t : t + 1], top1[t : t + 1] = token_scores(logits[None], ids[t + 1 : t + 2])
                    if top:
                        top_values[t : t + 1], top_ids[t : t + 1] = top_logprobs(logits[None], top)
                    bar.update(1)
        synchronize(self.device)
        self._prefilled = prefilled  # kept only when every span ran
        return nll.double().cpu(), top1.cpu(), (top_values.cpu(), top_ids.cpu())

    def _cache_for(self, prompt_tokens: list[int]) -> tuple[object, int]:
        """(cache, reused): the kept cache cut back to the longest prefix its tokens share with the
        prompt but its last token (whose logits choose the first new token, so it always runs), or a
        new cache and 0. Either way nothing stays kept until this generation ends: one that fails
        midway leaves a cache whose contents the host no longer knows."""
        kept, self._kept, self._prefilled = self._kept, None, None
        if kept is None or not self.prefix_cache:
            return self.backend.new_cache(), 0
        cache, cached_tokens = kept
        reused = 0
        for cached, wanted in zip(cached_tokens, prompt_tokens[:-1]):
            if cached != wanted:
                break
            reused += 1
        cache.length = reused  # the positions after it are written before they are read
        return cache, reused

    def _stop_strings(self, stop: str | Collection[str]) -> tuple[str, ...]:
        """`stop` as a tuple of strings (one string is one stop string, not its characters), checked."""
        texts = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not isinstance(text, str) or not text for text in texts):
            raise InvalidInputError(f"stop strings must be non-empty text; got {list(texts)!r}")
        if texts and self.tokenizer is None:
            raise InvalidInputError(f"stop strings are matched in the new text, which needs a tokenizer, and "
                                    f"{self.description} has none; use stop_token_ids instead")
        return texts

    def _decode_chunk(self, token: int, cache, steps: int, sampling: SamplingParams, rng: torch.Tensor | None,
                      history: torch.Tensor | None, counts: torch.Tensor | None,
                      with_logits: bool) -> tuple[list[int], list[float], torch.Tensor | None]:
        """`steps` tokens after `token`, each one's step time in ms and, with_logits, the logits each
        was chosen from ([steps, vocab] fp32); decoded on the device with one wait at the end."""
        clock = StepClock(self.device)
        logits = torch.empty(steps, self.shape.vocab, device=self.device) if with_logits else None
        tokens = self.backend.decode_tokens(token, cache, steps, sampling, rng, clock, history, logits, counts).tolist()
        return tokens, clock.intervals_ms(), logits

    def _keep(self, logits: torch.Tensor, rule: SamplingParams, prompt: list[int], generated: list[int], chosen: list[int],
              kept_rows: tuple[list | None, list | None]) -> None:
        """Adds the logits [>= n, vocab] that the n tokens `chosen` (after `prompt` and the tokens
        `generated` before them) were chosen from by `rule` to kept_rows (logits, scores), where each
        is a list: the logits as they are, and their processed_scores with the history and counts each read."""
        logit_rows, score_rows = kept_rows
        if logit_rows is not None:
            logit_rows.append(logits[: len(chosen)].float())
        if score_rows is not None:
            constraints = rule.constraints(self.shape.vocab, self.device)
            capacity = len(prompt) + len(generated) + len(chosen) + 1
            for j in range(len(chosen)):
                history = rule.history(prompt + generated + chosen[:j], capacity, self.device)
                counts = rule.counts(generated + chosen[:j], self.shape.vocab, self.device)
                score_rows.append(processed_scores(logits[j], rule, history, constraints, counts)[None])


def stop_token_set(ids: int | Collection[int] | torch.Tensor) -> frozenset[int]:
    """`ids` (one token id, a collection of them, or an integer tensor) as a set of ints, checked: a
    tensor element or a float in the set would never equal a token, and the stop would never come."""
    values = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
    values = (values,) if is_integer(values) else values
    values = tuple(values) if isinstance(values, Iterable) and not isinstance(values, (str, bytes)) else (None,)
    if not all(is_integer(v) for v in values):
        raise InvalidInputError(f"stop_token_ids must be token ids (integers): one, or a collection of them; got {ids!r}")
    return frozenset(int(v) for v in values)


@dataclass(frozen=True)
class StopRule:
    """Where a generation ends early: after a token in `token_ids`, after the token whose text
    completes one of `texts` in the new text (decoded with `tokenizer`), or after the first token
    where `when` (of the new tokens so far) is true."""

    token_ids: frozenset[int]
    texts: tuple[str, ...]
    tokenizer: object | None
    when: Callable[[list[int]], bool] | None = None

    def kept(self, earlier: list[int], tokens: list[int]) -> int | None:
        """How many of `tokens` (new tokens after the `earlier` new ones) to keep when one of them
        ends the generation (up to and including it), else None."""
        ends = [i + 1 for i, token in enumerate(tokens) if token in self.token_ids]
        end = ends[0] if ends else None
        if self.texts and self._has_text(earlier + tokens[: end or len(tokens)]):
            end = next(n for n in range(1, len(tokens) + 1) if self._has_text(earlier + tokens[:n]))
        if self.when is not None:
            end = next((n for n in range(1, (end or len(tokens)) + 1) if self.when(earlier + tokens[:n])), end)
        return end

    def _has_text(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens)
        return any(stop in text for stop in self.texts)


def _take(result: Generation, tokens: list[int], times: list[float], listed: list[TokenLogprobs] | None, stop_rule: StopRule,
          streams: tuple[Callable[[list[int]], None] | None, Callable[[list[TokenLogprobs]], None] | None]) -> bool:
    """Adds `tokens`, their step times (none for the first token) and their logprobs (when listed) to
    `result` up to where stop_rule ends the generation, hands them to streams (on_tokens, on_logprobs);
    whether the generation ended. The steps a chunk ran after its end ran for nothing."""
    kept = stop_rule.kept(result.tokens, tokens)
    result.tokens += tokens[:kept]
    result.decode_ms += times[:kept]
    on_tokens, on_logprobs = streams
    if listed is not None:
        result.logprobs += listed[:kept]
        if on_logprobs is not None:
            on_logprobs(listed[:kept])
    if on_tokens is not None:
        on_tokens(tokens[:kept])
    return kept is not None


# Backends defined in their own modules register themselves on import (they import Backend from here).
import neoxfuse.fused  # noqa: E402,F401  the "fused" backend (kernels/fused_decoder)
