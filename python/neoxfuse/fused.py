"""The `fused` engine backend: decode steps through the fused decoder kernels, replayed as one CUDA graph.

A decode step at position p = cache.length is

    x      = embed_in[tokens[p]]                          (fp32 residual stream [hidden])
    x      = fused layer l (x, K_l, V_l, p)   for l = 0 .. layers-1    (neoxfuse.ops.fused_decoder)
    logits = LN_final(x) @ embed_out.T                    (fp32 [vocab])
    p      = p + 1
    tokens[p] = argmax(logits)                            (greedy steps)
    tokens[p] = sample(logits, rule, rng)                 (sampled steps: neoxfuse.sampling's rule)
    (of constrained(logits, rule, history, constraints, counts): with the rule's biases and
    penalties and the banned tokens' logits -inf, and then tokens[p] appended to history and
    counted in counts)

all on the GPU, with the tokens, p, the sampler's random state rng = [seed, draw], the sequence
so far (history) and the counts of the tokens chosen in device memory (the sampling kernel
advances rng), so the whole step, token choice
included, is captured once as a CUDA graph and replayed for every later token (no per-kernel
Python cost). The first step of a cache runs eagerly (it also warms up the kernels' plan), then
the graph is captured: one graph for logits-only steps, one for plain greedy steps and one per
other rule used (temperature, its filters, biases, penalties, banned tokens), the last
MAX_SAMPLING_GRAPHS of those kept, each with its rule's constraints (device tensors it reads).
decode_step writes tokens[p] from the host and returns the logits; decode_tokens replays a graph
`steps` times with nothing between replays and no host wait, so the GPU does not idle waiting
for Python between tokens.

Prefill runs through neoxfuse.reference in the weights' dtype (fp16 or bf16) on the GPU and fills
the same KV cache [layers, heads, max_seq_len, head_dim] (of that dtype) the kernels read, so a
prompt costs what plain PyTorch costs (the LM head for its last token only) and every decode step
after it runs fused.

The backend owns one KV storage: new_cache() hands it out afresh (length 0) each time, so the
graph's cache pointers stay valid across generations; a cache from an earlier new_cache() is
reused storage and must not be used after the next call. A cache made elsewhere (same sizes,
dtype and device) also works: the graph is captured again for it.
"""

from __future__ import annotations

import dataclasses

import torch

from neoxfuse import _lib
from neoxfuse.configs import NeoXShape
from neoxfuse.engine import Availability, Backend, StepClock, register_backend
from neoxfuse.errors import InvalidInputError, LibraryNotFoundError, NeoxfuseError
from neoxfuse.ops import fused_decoder as ops
from neoxfuse.reference import KVCache, ReferenceModel
from neoxfuse.sampling import (SAMPLED_ONLY, Constraints, SamplingParams, append, check_rng, constrained, count, exponential_race,
                               probabilities)
from neoxfuse.weights import ModelWeights


MAX_SAMPLING_GRAPHS = 4  # step graphs kept for rules but plain greedy's; capturing a fifth drops the oldest
_ALWAYS_KEPT = (None, SamplingParams())  # the graphs of logits-only and of plain greedy steps


@register_backend
class FusedBackend(Backend):
    """Decode through the fused decoder kernels, the whole step one CUDA graph; prefill in PyTorch."""

    name = "fused"
    summary = "fused cluster kernels, two launches per layer, one CUDA graph per step; fp16 or bf16, sm_90 / sm_12x"

    @classmethod
    def available(cls, device: torch.device, dtype: torch.dtype, shape: NeoXShape | None = None) -> Availability:
        if device.type != "cuda" or not torch.cuda.is_available():
            return Availability(False, "the fused kernels need a CUDA GPU")
        if dtype not in ops.WEIGHT_DTYPES:
            return Availability(False, f"the fused kernels take fp16 or bf16 weights, not {str(dtype).replace('torch.', '')}")
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        if (major, minor) < ops.MIN_CAPABILITY:
            return Availability(False, f"thread-block clusters need sm_90+ (H100, H200, RTX 5090); this GPU is sm_{major}{minor}")
        try:
            built = hasattr(_lib.library(), "neoxfuse_fused_decoder_layer")
        except LibraryNotFoundError as err:
            return Availability(False, str(err))
        if not built:
            return Availability(False, f"{_lib.library_path()} was built without the fused decoder; rebuild it")
        if (missing := _lib.missing_code(index)) is not None:
            return Availability(False, missing)
        if shape is not None and (reason := ops.unsupported_reason(shape)) is not None:
            return Availability(False, reason)
        return Availability(True, f"fused kernels on {torch.cuda.get_device_name(index)} (sm_{major}{minor})")

    def __init__(self, weights: ModelWeights, max_seq_len: int, *, cluster_size: int | None = None, pdl: bool = True,
                 use_graph: bool = True):
        """weights: fp16 or bf16 on one CUDA device. cluster_size: None for the plan's choice, 1..8 to force
        one. pdl: programmatic dependent launch between kernels. use_graph: replay steps as a CUDA
        graph (False: every step runs eagerly, for debugging and for comparing the two)."""
        ops.check_weights(weights)
        shape = weights.shape
        device = weights.embed_in.device
        self.weights = weights
        self.shape = shape
        self.reference = ReferenceModel(weights, max_seq_len=max_seq_len)
        self.max_seq_len = self.reference.max_seq_len
        self.plan = ops.plan(shape, device, cluster_size, weights.embed_in.dtype)
        self.cluster_size = cluster_size
        self.pdl = pdl
        self.use_graph = use_graph

        def buffer(size: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        # The graph's inputs and outputs live at fixed addresses.
        self._tokens = buffer(self.max_seq_len + 1, torch.long)  # [max_seq_len + 1] the token at each position
        self._position = buffer(1, torch.int32)  # [1] the position being decoded: cache.length on the device
        self._residual = [buffer(shape.hidden, torch.float32) for _ in range(2)]  # 2 x [hidden], ping-pong
        self._workspace = ops.Workspace.allocate(shape, device)
        self._logits = buffer(shape.vocab, torch.float32)  # [vocab]
        self._rng = buffer(2, torch.long)  # [2] the sampler's [seed, draw]
        self._drawn = buffer(1, torch.long)  # [1] a sampled step's token
        self._history = buffer(self.max_seq_len + 1, torch.long)  # [max_seq_len + 1] the sequence so far, then -1s
        self._counts = buffer(shape.vocab, torch.int32)  # [vocab] how often each token was chosen
        self._device_length: int | None = None  # what self._position holds, when known on the host
        self._storage: KVCache | None = None
        self._graphs: dict[SamplingParams | None, tuple[torch.cuda.CUDAGraph, Constraints | None]] = {}  # rule -> graph
        self._graph_cache: tuple[int, int] | None = None  # (k, v) data pointers the graphs were captured with

    def new_cache(self) -> KVCache:
        """An empty cache on the backend's one KV storage (see the module docstring)."""
        if self._storage is None:
            self._storage = self.reference.new_cache()
        return KVCache(k=self._storage.k, v=self._storage.v, length=0)

    def prefill(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The last token's logits [vocab] (fp32) after running `tokens` from cache.length in PyTorch."""
        return self.reference.prefill(tokens, cache, last_only=True)[0].float()

    def decode_step(self, token: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [vocab] (fp32, a fresh tensor) of `token` at position cache.length; cache.length grows by 1.

        SequenceTooLongError when the cache is full, InvalidInputError for a token id out of range
        or a cache of other sizes; both before anything runs.
        """
        self._start(token, cache, 1)
        self._run(cache, None)
        self._advance(cache, 1)
        return self._logits.clone()

    def decode_tokens(self, token: int | torch.Tensor, cache: KVCache, steps: int, sampling: SamplingParams,
                      rng: torch.Tensor | None, clock: StepClock, history: torch.Tensor | None = None,
                      logits_out: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Backend.decode_tokens on the device: `steps` graph replays, each writing its chosen token
        into the device's token buffer for the next (and, with logits_out, followed by a copy of its
        logits there); the chosen tokens [steps] (long, on the GPU).
        Sampled steps draw with the backend's copy of rng, and rules that read the sequence so far or
        the counts of the tokens chosen read and extend its copies of history (long [max_seq_len + 1])
        and counts (int32 [vocab]), all copied back afterwards.
        The same errors as decode_step, and one for a history or counts of another size, before anything runs."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidInputError(f"steps must be an integer >= 1, got {steps!r}")
        check_rng(sampling, rng, history, counts)
        sampling.check_vocab(self.shape.vocab)
        if sampling.needs_history and (history.shape != self._history.shape or history.dtype != torch.long):
            raise InvalidInputError(f"history must be long [{self._history.numel()}] (max_seq_len + 1), from sampling.history(); "
                                    f"got {history.dtype} {list(history.shape)}")
        if sampling.counts_chosen and counts.shape != self._counts.shape:
            raise InvalidInputError(f"counts must be int32 [{self.shape.vocab}] (the vocabulary), from sampling.counts(); "
                                    f"got {list(counts.shape)}")
        start = self._start(token, cache, steps)
        selection = _selection_rule(sampling)
        if not sampling.greedy:
            self._rng.copy_(rng)
        if sampling.needs_history:
            self._history.copy_(history)
        if sampling.counts_chosen:
            self._counts.copy_(counts)
        for step in range(steps):
            self._run(cache, selection)
            if logits_out is not None:
                logits_out[step].copy_(self._logits)
            clock.mark()
        if not sampling.greedy:
            rng.copy_(self._rng)
        if sampling.needs_history:
            history.copy_(self._history)
        if sampling.counts_chosen:
            counts.copy_(self._counts)
        self._advance(cache, steps)
        return self._tokens[start + 1 : start + 1 + steps].clone()

    def _start(self, token: int | torch.Tensor, cache: KVCache, steps: int) -> int:
        """Checks a request of `steps` steps from `token`, puts token and position on the device; the position."""
        token_id = self._checked_token(token)
        self.reference.check_cache(cache, steps)
        self._tokens[cache.length].fill_(token_id)
        if self._device_length != cache.length:
            self._position.fill_(cache.length)
        self._device_length = None  # unknown until the steps have run
        return cache.length

    def _advance(self, cache: KVCache, steps: int) -> None:
        cache.length += steps
        self._device_length = cache.length  # the steps advanced the device position too

    def _run(self, cache: KVCache, selection: SamplingParams | None) -> None:
        """One step choosing its token by `selection` (None: logits only): a replay of its graph when
        one is captured for this cache, else eagerly (then captured)."""
        key = (cache.k.data_ptr(), cache.v.data_ptr())
        if self._graph_cache != key:
            self._graphs.clear()  # free the previous cache's graphs before capturing the next
            self._graph_cache = key
        if selection in self._graphs:
            self._graphs[selection][0].replay()
            return
        constraints = None if selection is None else selection.constraints(self.shape.vocab, self._logits.device)
        self._step(cache, selection, constraints)
        if self.use_graph:
            if selection not in _ALWAYS_KEPT:
                others = [rule for rule in self._graphs if rule not in _ALWAYS_KEPT]
                for rule in others[: max(0, len(others) - MAX_SAMPLING_GRAPHS + 1)]:
                    del self._graphs[rule]  # the oldest: a graph holds its own memory
            self._graphs[selection] = (self._capture(cache, selection, constraints), constraints)

    def _checked_token(self, token: int | torch.Tensor) -> int:
        if isinstance(token, torch.Tensor):
            if token.numel() != 1 or token.dtype.is_floating_point or token.dtype == torch.bool:
                raise InvalidInputError(f"token must be one integer id, got a {token.dtype} tensor of shape {list(token.shape)}")
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.shape.vocab:
            raise InvalidInputError(f"token ids must be integers in 0..{self.shape.vocab - 1}, got {token!r}")
        return token

    def _step(self, cache: KVCache, selection: SamplingParams | None, constraints: Constraints | None) -> None:
        """One decode step on the current stream, reading self._tokens at self._position, writing
        self._logits, advancing self._position and, unless `selection` is None, writing the chosen
        token at the new position (sampled: drawn with self._rng, which advances; with the rule's
        constraints, and appended to self._history and counted in self._counts where the rule reads
        them): the work a graph holds."""
        w = self.weights
        x = self._residual[0]
        token = self._tokens.index_select(0, self._position)  # [1]
        x.copy_(w.embed_in.index_select(0, token)[0])  # [hidden] fp16/bf16 -> fp32
        for index, layer in enumerate(w.layers):
            y = self._residual[(index + 1) % 2]
            ops.decoder_layer(x, layer, self.shape, cache.k[index], cache.v[index], self._position, out=y,
                              workspace=self._workspace, cluster_size=self.cluster_size, pdl=self.pdl)
            x = y
        ops.lm_head(x, w.final_ln_weight, w.final_ln_bias, w.embed_out, self.shape.eps, out=self._logits, pdl=self.pdl)
        self._position.add_(1)
        if selection is None:
            return
        logits = constrained(self._logits, selection, self._history, constraints, self._counts)  # [vocab] fp32
        if selection.greedy:
            chosen = logits.argmax().reshape(1)  # [1]
        else:
            chosen = self._sample(logits, selection)  # [1]
        if selection.needs_history:
            append(self._history, chosen)
        if selection.counts_chosen:
            count(self._counts, chosen)
        self._tokens.index_put_((self._position,), chosen)

    def _sample(self, logits: torch.Tensor, selection: SamplingParams) -> torch.Tensor:
        """The token drawn from logits [vocab] (fp32) by the sampling rule, with self._rng: one kernel,
        or PyTorch ops (neoxfuse.sampling) for a vocabulary over what the kernel holds. [1] long."""
        draw = selection.draw
        if self.shape.vocab > ops.MAX_SAMPLE_VOCAB:
            return exponential_race(probabilities(logits, draw), self._rng)
        return ops.sample_token(logits, self._rng, draw.temperature, draw.top_k, draw.top_p, out=self._drawn)

    def _capture(self, cache: KVCache, selection: SamplingParams | None, constraints: Constraints | None) -> torch.cuda.CUDAGraph:
        """_step captured for this cache (capturing runs nothing: neither the cache nor rng is touched);
        the graph reads `constraints`, which must live as long as it."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(cache, selection, constraints)
        except (RuntimeError, NeoxfuseError) as err:
            raise NeoxfuseError(f"capturing the fused decode step as a CUDA graph failed: {err}; "
                                "FusedBackend(..., use_graph=False) runs it eagerly") from err
        return graph


def _selection_rule(sampling: SamplingParams) -> SamplingParams:
    """What a step's graph depends on: the sampling rule without its seed (the seed lives in rng);
    greedy rules differ only in their repetition penalty and banned tokens."""
    if sampling.greedy:
        return dataclasses.replace(sampling, seed=None, **{name: getattr(SamplingParams, name) for name in SAMPLED_ONLY})
    return dataclasses.replace(sampling, seed=None)
