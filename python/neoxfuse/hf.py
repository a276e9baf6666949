"""Hugging Face integration for a GPTNeoXForCausalLM: decode it with the neoxfuse Engine, or run
its LayerNorms and residual adds as neoxfuse's fused ln_residual kernels.

    out = neoxfuse.hf.generate(model, input_ids, max_new_tokens=64)   # model.generate (a batch: row by row)
    neoxfuse.hf.patch_generate(model)   # in place: model.generate decodes so (pipelines too); unpatch_generate
    model = neoxfuse.hf.fuse_layernorms(model)   # in place; unfuse_layernorms(model) undoes it

`generate` decodes with an Engine built once per model on the model's own weights (no copy):
the fused decoder kernels on an sm_90 or sm_12x GPU in fp16 or bf16, the PyTorch reference elsewhere.

`fuse_layernorms` keeps HF's forward and changes only the LayerNorms and residual adds.

Each layer ends with one kernel that writes its output and the normalised inputs of what comes
next (the next layer's LayerNorms, or the final LayerNorm after the last layer):

    parallel residual (Pythia):  h' = mlp + attn + h;   LN1'(h'), LN2'(h')          one kernel
    sequential residual:         a  = attn + h;         LN2(a)                      one kernel
                                 h' = mlp + a;          LN1'(h')                    one kernel

and the first layer normalises the embeddings itself. A forward pass of L layers so runs L + 1
(parallel) or 2L + 1 (sequential) kernels where HF runs 2L + 1 LayerNorms and 2L adds. The
parameters, state_dict, hooks and `isinstance` checks stay as they are: only the classes of the
layers and of the final LayerNorm change (to subclasses whose forward differs).

The outputs a layer computed for its successor are handed over through a small object shared by
the model's layers, keyed by the identity of the hidden-state tensor the layer returned: the next
layer (or the final LayerNorm) uses them only when called on that very tensor, and otherwise
normalises its input itself, so calling layers one by one or out of order stays correct. This is
ordinary Python state, which torch.compile traces (fullgraph) like the rest of the forward.
Not supported: a forward hook that changes a layer's output in place (activation steering with
`output.add_(v)`): the next layer would still use the LayerNorms of the unchanged output (a hook
that returns a new tensor is fine), and models dispatched with accelerate hooks (`device_map`),
whose per-module forwards would replace the fused ones (refused).

The kernels run at inference: in eval mode with gradients off (torch.no_grad / inference_mode,
as `generate` does). Otherwise the modules run HF's own forward, since the kernels have no backward.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable, Collection
from dataclasses import replace

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.generation import GenerateDecoderOnlyOutput, GenerationMixin
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXForCausalLM, GPTNeoXLayer, GPTNeoXModel

from neoxfuse.checks import is_integer
from neoxfuse.engine import AUTO, Engine, stop_token_set
from neoxfuse.errors import InvalidInputError, UnsupportedModelError
from neoxfuse.ops import ln_residual
from neoxfuse.sampling import SamplingParams

# The GPTNeoXLayer.forward this module re-implements (transformers 5.x); another signature means
# another layer body, so fuse_layernorms refuses rather than guessing.
_LAYER_FORWARD_PARAMETERS = ["self", "hidden_states", "attention_mask", "position_ids", "use_cache", "layer_past", "position_embeddings", "kwargs"]


class _HandOver:
    """Normalised outputs one fused module computed for the next, keyed by the tensor they normalise."""

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.normed: tuple[torch.Tensor, ...] | None = None

    def give(self, source: torch.Tensor, normed: tuple[torch.Tensor, ...]) -> None:
        self.source, self.normed = source, normed

    def take(self, source: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The outputs given for exactly `source`, else None; either way the slot is emptied."""
        normed = self.normed if self.source is source else None
        self.source = self.normed = None
        return normed


def _fusable_now(module: torch.nn.Module) -> bool:
    """Whether the kernels may run: inference (eval mode, gradients off, as in `generate`). They
    have no backward, so otherwise the module runs HF's forward."""
    return not module.training and not torch.is_grad_enabled()


def _norm_params(norms: tuple[torch.nn.LayerNorm, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [norm.weight for norm in norms], [norm.bias for norm in norms]


class FusedGPTNeoXLayer(GPTNeoXLayer):
    """GPTNeoXLayer whose LayerNorms and residual adds run as ln_residual kernels (module doc).

    Set by fuse_layernorms: `_neoxfuse_hand_over` (shared by the model) and
    `_neoxfuse_next_norms` (the LayerNorms applied to this layer's output: the next layer's LN1
    (and LN2 with parallel residual), or the final LayerNorm).
    """

    _neoxfuse_hand_over: _HandOver
    _neoxfuse_next_norms: tuple[torch.nn.LayerNorm, ...]

    def _own_norms(self) -> tuple[torch.nn.LayerNorm, ...]:
        if self.use_parallel_residual:
            return (self.input_layernorm, self.post_attention_layernorm)
        return (self.input_layernorm,)

    def _normalise_input(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """LN1 (and LN2) of this layer's input, where no predecessor handed them over."""
        weights, biases = _norm_params(self._own_norms())
        eps = self.input_layernorm.eps
        if len(weights) == 2:
            return ln_residual.dual_layernorm(hidden_states, weights, biases, eps)
        return (ln_residual.layernorm(hidden_states, weights[0], biases[0], eps),)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        layer_past=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if not _fusable_now(self):
            return super().forward(hidden_states, attention_mask, position_ids, use_cache, layer_past, position_embeddings, **kwargs)
        eps = self.input_layernorm.eps
        normed = self._neoxfuse_hand_over.take(hidden_states)
        if normed is None:
            normed = self._normalise_input(hidden_states)
        attn_output, _ = self.attention(
            normed[0],
            attention_mask=attention_mask,
            position_ids=position_ids,
            layer_past=layer_past,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.use_parallel_residual:
            mlp_output = self.mlp(normed[1])
            residuals = [attn_output, hidden_states]  # h' = mlp + attn + h
        else:
            norm = self.post_attention_layernorm
            attn_residual, mlp_input = ln_residual.add_layernorm(attn_output, [hidden_states], norm.weight, norm.bias, eps)
            mlp_output = self.mlp(mlp_input)
            residuals = [attn_residual]  # h' = mlp + (attn + h)
        weights, biases = _norm_params(self._neoxfuse_next_norms)
        if len(weights) == 2:
            output, *next_normed = ln_residual.add_dual_layernorm(mlp_output, residuals, weights, biases, eps)
        else:
            output, *next_normed = ln_residual.add_layernorm(mlp_output, residuals, weights[0], biases[0], eps)
        self._neoxfuse_hand_over.give(output, tuple(next_normed))
        return output


class FusedFinalLayerNorm(torch.nn.LayerNorm):
    """The model's final LayerNorm: takes the output the last fused layer computed for it, or
    runs the ln_residual kernel itself. `_neoxfuse_hand_over` is set by fuse_layernorms."""

    _neoxfuse_hand_over: _HandOver

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _fusable_now(self):
            return super().forward(hidden_states)
        normed = self._neoxfuse_hand_over.take(hidden_states)
        if normed is not None:
            return normed[0]
        return ln_residual.layernorm(hidden_states, self.weight, self.bias, self.eps)


def _decoder(model: torch.nn.Module) -> GPTNeoXModel:
    if isinstance(model, GPTNeoXForCausalLM):
        return model.gpt_neox
    if isinstance(model, GPTNeoXModel):
        return model
    raise UnsupportedModelError(f"fuse_layernorms takes a GPTNeoXForCausalLM or GPTNeoXModel, got {type(model).__name__}")


def _check_fusable(decoder: GPTNeoXModel) -> None:
    found = list(inspect.signature(GPTNeoXLayer.forward).parameters)
    if found != _LAYER_FORWARD_PARAMETERS:
        raise UnsupportedModelError(
            f"this transformers' GPTNeoXLayer.forward takes {found}; neoxfuse.hf re-implements the one taking "
            f"{_LAYER_FORWARD_PARAMETERS} (transformers 5.x)"
        )
    if len(decoder.layers) == 0:
        raise UnsupportedModelError("the model has no layers to fuse")
    norms = [decoder.final_layer_norm]
    for layer in decoder.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    hidden = decoder.config.hidden_size
    for norm in norms:
        if type(norm) not in (torch.nn.LayerNorm, FusedFinalLayerNorm) or norm.weight is None or norm.bias is None:
            raise UnsupportedModelError(f"expected LayerNorms with weight and bias, found {norm!r}")
        if tuple(norm.normalized_shape) != (hidden,):
            raise UnsupportedModelError(f"expected LayerNorms over the hidden size {hidden}, found {norm!r}")
    if len({norm.eps for norm in norms}) != 1:
        raise UnsupportedModelError(f"LayerNorms sharing statistics need one eps, found {sorted({n.eps for n in norms})}")
    wrapped = [name for name, module in decoder.named_modules() if "forward" in vars(module)]
    if wrapped:
        raise UnsupportedModelError(f"the forward of {wrapped[0]!r} is replaced on the module itself (as accelerate's "
                                    "device_map hooks do), so the fused classes would not run; load the model on one device")


def fuse_layernorms(model: torch.nn.Module) -> torch.nn.Module:
    """Makes `model` (GPTNeoXForCausalLM or GPTNeoXModel) run its LayerNorms and residual adds as
    ln_residual kernels, in place; returns it. Idempotent. See the module doc for what changes.

    UnsupportedModelError where the model or the installed transformers is not the GPT-NeoX this
    re-implements. The kernels need the model on a CUDA device in fp32, fp16 or bf16 (checked at
    each call, so the model may be moved after fusing).
    """
    decoder = _decoder(model)
    _check_fusable(decoder)
    hand_over = _HandOver()
    layers = list(decoder.layers)
    for layer in layers:
        layer.__class__ = FusedGPTNeoXLayer
        layer._neoxfuse_hand_over = hand_over
    for layer, successor in zip(layers, layers[1:]):
        layer._neoxfuse_next_norms = successor._own_norms()
    layers[-1]._neoxfuse_next_norms = (decoder.final_layer_norm,)
    decoder.final_layer_norm.__class__ = FusedFinalLayerNorm
    decoder.final_layer_norm._neoxfuse_hand_over = hand_over
    return model


def unfuse_layernorms(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes fuse_layernorms: the model runs HF's own forward again. Returns it."""
    decoder = _decoder(model)
    for layer in decoder.layers:
        if isinstance(layer, FusedGPTNeoXLayer):
            layer.__class__ = GPTNeoXLayer
            del layer._neoxfuse_hand_over, layer._neoxfuse_next_norms
    if isinstance(decoder.final_layer_norm, FusedFinalLayerNorm):
        decoder.final_layer_norm.__class__ = torch.nn.LayerNorm
        del decoder.final_layer_norm._neoxfuse_hand_over
    return model


def is_fused(model: torch.nn.Module) -> bool:
    """Whether fuse_layernorms has been applied to `model`."""
    return isinstance(_decoder(model).final_layer_norm, FusedFinalLayerNorm)


# ----------------------------------------------------------------------------------------------
# generate: model.generate through the neoxfuse Engine, one sequence at a time

class _Unset:
    """The default of generate()'s model.generate options: not given (None given means transformers' default)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ((backend, its weights' place), Engine)

# transformers' defaults for the options generate() implements, where neither the call nor the
# generation config sets them (in transformers 5 the config holds None and model.generate fills
# these in); with max_length unset, model.generate makes 20 new tokens (up to the model's positions).
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                "min_length": 0, "suppress_tokens": None, "bad_words_ids": None, "no_repeat_ngram_size": 0,
                "begin_suppress_tokens": None, "min_p": None, "stop_strings": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0, "sequence_bias": None, "return_dict_in_generate": False, "output_scores": False, "output_logits": None,
                "num_return_sequences": 1}
_DEFAULT_NEW_TOKENS = 20
# model.generate's own arguments besides its inputs, generation config and options (logits_processor,
# stopping_criteria, assistant_model, ...): none implemented, each taken where it changes nothing.
_GENERATE_ARGUMENTS = set(inspect.signature(GenerationMixin.generate).parameters) - {
    "self", "inputs", "generation_config", "streamer", "stopping_criteria", "kwargs"}
_IMPLEMENTED = {"max_new_tokens", "max_length", "min_new_tokens", "eos_token_id", "pad_token_id", *_HF_DEFAULTS}
# Other model.generate options, at the values where they change nothing; set otherwise, in the call
# or in the model's generation config, they are refused, since model.generate would apply them.
_NEUTRAL = {"num_beams": 1, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
            "num_beam_groups": 1, "renormalize_logits": False, "remove_invalid_values": False}
# Options that change no token at any value: caching and compilation choices, settings of beam search
# and of assisted decoding only, what only return_dict_in_generate would return (attentions and hidden
# states, refused there), other models' ids (bos_token_id: only the first token where no input_ids are given).
_NO_EFFECT = {"use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
              "low_memory", "prefill_chunk_size", "length_penalty", "early_stopping", "diversity_penalty",
              "output_attentions", "output_hidden_states", "bos_token_id", "decoder_start_token_id", "is_assistant",
              "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
              "assistant_lookbehind", "target_lookbehind", "transformers_version"}


def generate(
    model: GPTNeoXForCausalLM,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = UNSET,
    max_length: int | None = UNSET,
    do_sample: bool | None = UNSET,
    temperature: float | None = UNSET,
    top_k: int | None = UNSET,
    top_p: float | None = UNSET,
    min_p: float | None = UNSET,
    typical_p: float | None = UNSET,
    epsilon_cutoff: float | None = UNSET,
    eta_cutoff: float | None = UNSET,
    repetition_penalty: float | None = UNSET,
    min_new_tokens: int | None = UNSET,
    min_length: int | None = UNSET,
    suppress_tokens: Collection[int] | None = UNSET,
    bad_words_ids: list[list[int]] | None = UNSET,
    no_repeat_ngram_size: int | None = UNSET,
    sequence_bias: dict | list | None = UNSET,
    begin_suppress_tokens: Collection[int] | None = UNSET,
    eos_token_id: int | Collection[int] | None = UNSET,
    stop_strings: str | list[str] | None = UNSET,
    stopping_criteria: StoppingCriteriaList | list[StoppingCriteria] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int | None = None,
    streamer: BaseStreamer | None = None,
    pad_token_id: int | None = UNSET,
    generation_config: GenerationConfig | None = None,
    return_dict_in_generate: bool | None = UNSET,
    output_scores: bool | None = UNSET,
    output_logits: bool | None = UNSET,
    num_return_sequences: int | None = UNSET,
    backend: str = AUTO,
    **options,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """`model.generate(input_ids, ...)`, decoded by a neoxfuse Engine one sequence at a time.

    input_ids [B, P] (long) -> [B * R, P + N] on the same device: each prompt (R times with
    num_return_sequences=R), then up to max_new_tokens new tokens ending at the first of
    eos_token_id; no input_ids: the prompt is [[bos_token_id]], as model.generate starts. A batch
    (B > 1) is padded on the left as a decoder-only model's is (attention_mask: 0 for padding, on
    the left of a row only; `tokenizer(texts, padding=True, return_tensors="pt")` with
    tokenizer.padding_side = "left"): each row's tokens are decoded on their own, at batch 1, one
    row after another, and the output keeps the padding as model.generate does.

    An option not given comes from `generation_config`, then model.generation_config, then
    transformers' default, as model.generate (transformers 5) reads it (and one given as None is
    transformers' default: eos_token_id=None, no eos, whatever the configs say): max_new_tokens (else
    max_length - P; with neither set, 20, as far as the model's positions allow), greedy unless
    do_sample, then temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff and eta_cutoff
    (seed: reproducible draws), repetition_penalty, suppress_tokens, bad_words_ids,
    no_repeat_ngram_size and sequence_bias (greedy or sampled, over the prompt and the new tokens),
    begin_suppress_tokens (never the first new token), and min_new_tokens (if set, else min_length -
    P) new tokens before eos may come; stop_strings (with the `tokenizer`, as model.generate needs
    it) end after the token that completes one, by transformers' own StopStringCriteria over the
    prompt and the new tokens (in each row), and stopping_criteria (transformers' StoppingCriteria, or
    any function of (input_ids, scores) -> bool [1]; one sequence only) after the first token where
    one is true, called as model.generate calls them (input_ids [1, P + n] on its device, one call
    per new token in order) but with scores None.
    return_dict_in_generate returns transformers' GenerateDecoderOnlyOutput: its sequences, and
    with output_logits the logits each new token was chosen from, with output_scores those after the
    processors and warpers (each a tuple of N [1, vocab] fp32 tensors, as model.generate gives them;
    one sequence only; no past_key_values: the KV cache is the Engine's). Sampled output sequence i
    is drawn with seed + i; those that end early are padded to the longest with pad_token_id, else
    the first eos token, as model.generate pads them. Any other model.generate option (num_beams,
    renormalize_logits, ...) is taken where it changes nothing and refused elsewhere, whether the
    call or a generation config sets it: the tokens are model.generate's, or an error says why not.

    A streamer (HF's TextStreamer, say; one sequence) gets what model.generate gives it:
    put(prompt), put(new tokens) as they arrive (in batches of up to 32 here, not one by one),
    end(). The Engine (its KV cache and CUDA graphs) is built on the first call for a model and kept
    while the model and its weights stay; `backend` as in Engine.
    """
    if not isinstance(model, GPTNeoXForCausalLM):
        raise UnsupportedModelError(f"neoxfuse.hf.generate takes a GPTNeoXForCausalLM, got {type(model).__name__}")
    configs = [config for config in (generation_config, model.generation_config) if config is not None]
    _check_options(configs, options)
    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise InvalidInputError(f"streamer must have put() and end(), as transformers' streamers do; got {type(streamer).__name__}")

    def option(given, name: str):
        """The argument if given, else the first generation config's that sets it, else transformers'
        default. As model.generate, a None given sets the option to transformers' default (None where
        there is none: eos_token_id=None, no eos), whatever a generation config says."""
        if given is not UNSET:
            return _HF_DEFAULTS.get(name) if given is None else given
        for config in configs:
            if (value := getattr(config, name, None)) is not None:
                return value
        return _HF_DEFAULTS.get(name)

    if input_ids is None:  # as model.generate: the sequence starts with the bos token
        bos = option(options.get("bos_token_id", UNSET), "bos_token_id")
        if bos is None:
            raise InvalidInputError("no input_ids and no bos_token_id to start from (model.generate needs one of them too)")
        input_ids = torch.tensor([[bos]], device=model.device)
    prompts = _prompts(input_ids, attention_mask)

    eos = option(eos_token_id, "eos_token_id")
    stops = () if eos is None else eos
    constraints = {  # greedy or sampled
        "repetition_penalty": option(repetition_penalty, "repetition_penalty"),
        "suppress_tokens": option(suppress_tokens, "suppress_tokens") or (),
        "bad_sequences": _bad_sequences(option(bad_words_ids, "bad_words_ids"), stop_token_set(stops)),
        "no_repeat_ngram_size": option(no_repeat_ngram_size, "no_repeat_ngram_size"),
        "sequence_bias": option(sequence_bias, "sequence_bias") or (),
    }
    sampling = SamplingParams(**constraints)  # greedy
    if option(do_sample, "do_sample"):
        if option(temperature, "temperature") == 0:  # SamplingParams would read it as greedy
            raise InvalidInputError("do_sample with temperature 0: model.generate refuses it too; for greedy decoding "
                                    "set do_sample=False")
        sampling = SamplingParams(temperature=option(temperature, "temperature"), top_k=option(top_k, "top_k"),
                                  top_p=option(top_p, "top_p"), min_p=option(min_p, "min_p") or 0.0,
                                  typical_p=option(typical_p, "typical_p"), epsilon_cutoff=option(epsilon_cutoff, "epsilon_cutoff"),
                                  eta_cutoff=option(eta_cutoff, "eta_cutoff"), seed=seed, **constraints)
    prompt_length = input_ids.shape[1]
    new_tokens = option(max_new_tokens, "max_new_tokens")
    if new_tokens is None:  # HF: max_length counts the prompt
        length = option(max_length, "max_length")
        if length is None:
            length = min(prompt_length + _DEFAULT_NEW_TOKENS, model.config.max_position_embeddings)
        new_tokens = length - prompt_length
        if new_tokens < 1:
            raise InvalidInputError(f"a max_length of {length} leaves no new tokens after a prompt of {prompt_length}; "
                                    "give max_new_tokens")

    at_least = option(min_new_tokens, "min_new_tokens")  # as model.generate reads it, over min_length
    if at_least is None:
        at_least = max(option(min_length, "min_length") - prompt_length, 0)

    given_criteria = _stopping_criteria(stopping_criteria)
    criteria = [*_stop_strings_criteria(option(stop_strings, "stop_strings"), tokenizer), *given_criteria]

    def stream(tokens: list[int]) -> None:
        streamer.put(torch.tensor([tokens], dtype=input_ids.dtype))  # [1, n], on the CPU as HF puts them

    as_dict = option(return_dict_in_generate, "return_dict_in_generate")
    for name in ("output_attentions", "output_hidden_states"):
        if as_dict and option(options.get(name, UNSET), name):
            raise InvalidInputError(f"{name} with return_dict_in_generate: neoxfuse.hf.generate returns the sequences, scores and "
                                    "logits only (the decode kernels keep no attention weights or hidden states)")
    keep = {"keep_logits": bool(as_dict and option(output_logits, "output_logits")),
            "keep_scores": bool(as_dict and option(output_scores, "output_scores"))}
    copies = option(num_return_sequences, "num_return_sequences")
    _check_copies(copies, sampling)
    first_eos = _first(stops)
    if len(prompts) * copies > 1:
        _check_many(streamer, keep, bool(given_criteria), first_eos is None and bool(criteria))
    if not sampling.greedy and len(prompts) * copies > 1:
        sampling = sampling.seeded()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    engine, outs = _engine(model, backend), []
    for i in range(len(prompts) * copies):  # sequence i: of prompt i // copies, drawn with seed + i when sampled
        row = i // copies
        rule = sampling if sampling.seed is None else replace(sampling, seed=(sampling.seed + i) % 2**63)
        outs.append(engine.generate(prompts[row], new_tokens, rule, stop_token_ids=stops, min_new_tokens=at_least,
                                    on_tokens=stream if streamer is not None else None,
                                    begin_suppress_tokens=option(begin_suppress_tokens, "begin_suppress_tokens") or (),
                                    stop_when=_stop_when(criteria, input_ids[row : row + 1]), **keep))
    if streamer is not None:
        streamer.end()
    rows = [generation.tokens for generation in outs]
    width = max(map(len, rows))
    pad = option(pad_token_id, "pad_token_id")
    pad = first_eos if pad is None else pad  # as model.generate pads without one
    # Every row that ends early ends at an eos token (_check_many), so there is one to pad with.
    new = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=input_ids.dtype, device=input_ids.device)
    sequences = torch.cat([input_ids.repeat_interleave(copies, dim=0), new], dim=1)  # [B * copies, P + width]
    out = outs[0]
    if not as_dict:
        return sequences

    def per_token(rows: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        return None if rows is None else tuple(rows.to(input_ids.device)[:, None])  # N of [1, vocab]

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=per_token(out.scores), logits=per_token(out.logits))


def patch_generate(model: GPTNeoXForCausalLM) -> GPTNeoXForCausalLM:
    """Makes `model.generate` decode through generate() above, in place; returns the model. Code
    that calls model.generate itself (transformers' text-generation pipeline, say) then runs on the
    Engine. The method takes model.generate's arguments (`inputs` or `input_ids`, a
    `generation_config`, options) and refuses, as generate() does, what it does not implement.
    Only the instance changes (its own `generate` attribute; a deepcopy's is bound to the copy);
    unpatch_generate(model) gives it transformers' back. Idempotent."""
    if not isinstance(model, GPTNeoXForCausalLM):
        raise UnsupportedModelError(f"patch_generate takes a GPTNeoXForCausalLM, got {type(model).__name__}")
    model.generate = types.MethodType(_generate_method, model)
    return model


def unpatch_generate(model: GPTNeoXForCausalLM) -> GPTNeoXForCausalLM:
    """Undoes patch_generate: model.generate is transformers' again. Returns the model."""
    if getattr(vars(model).get("generate"), "__func__", None) is _generate_method:
        del model.generate
    return model


def _generate_method(model: GPTNeoXForCausalLM, inputs: torch.Tensor | None = None,
                     generation_config: GenerationConfig | None = None, **options) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """model.generate(inputs, generation_config, **options) through generate(): patch_generate's method."""
    if inputs is not None:
        if options.get("input_ids") is not None:
            raise InvalidInputError("model.generate got both inputs and input_ids: pass one of them")
        options["input_ids"] = inputs
    return generate(model, generation_config=generation_config, **options)


def _first(ids: int | Collection[int] | torch.Tensor) -> int | None:
    """The first of eos_token_id's ids (model.generate's pad token when none is set), None for none."""
    values = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [ids] if is_integer(ids) else list(ids)
    return int(values[0]) if values else None


def _prompts(input_ids: object, attention_mask: object) -> list[torch.Tensor]:
    """The prompts of input_ids [B, P]: each row without the padding attention_mask [B, P] marks (0s,
    on the left, as a decoder-only model's batch is padded; none without a mask). InvalidInputError
    for other shapes, or a mask of other values or padding elsewhere."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InvalidInputError(f"input_ids must be a batch of token id sequences [B, P]; got {shape}")
    if attention_mask is None:
        return list(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise InvalidInputError(f"attention_mask must have the shape of input_ids, {list(input_ids.shape)}; got {shape}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all() and (mask[:, 1:] >= mask[:, :-1]).all() and (mask[:, -1] == 1).all()):
        raise InvalidInputError("attention_mask must mark padding (0s) on the left of each row only, as a decoder-only model's "
                                "batch is padded (tokenizer.padding_side = 'left'), with at least one token (1) per row")
    return [row[keep.bool()] for row, keep in zip(input_ids, mask)]


def _check_copies(copies: object, sampling: SamplingParams) -> None:
    """InvalidInputError for a num_return_sequences that generate() does not make: not an integer
    >= 1, or more than 1 greedy (model.generate refuses it too)."""
    if not is_integer(copies) or copies < 1:
        raise InvalidInputError(f"num_return_sequences must be an integer >= 1, got {copies!r}")
    if copies > 1 and sampling.greedy:
        raise InvalidInputError("num_return_sequences > 1 needs do_sample=True: greedy decoding makes one sequence "
                                "(model.generate refuses it too)")


def _check_many(streamer: BaseStreamer | None, keep: dict, criteria: bool, unpadded: bool) -> None:
    """InvalidInputError for what generate() does not make with more than one output sequence (a
    batch, or num_return_sequences > 1): a streamer (transformers' streamers take one sequence),
    scores or logits kept, stopping criteria (model.generate calls them on the whole batch, and they
    may couple its rows, as lm-evaluation-harness's do), or stop strings without an eos token (where
    model.generate goes on generating a stopped sequence until all have stopped)."""
    if streamer is not None:
        raise InvalidInputError("a streamer takes one sequence (transformers' streamers refuse more): a batch of one "
                                "and num_return_sequences 1")
    if any(keep.values()):
        raise InvalidInputError("output_scores and output_logits come with one sequence here: a batch of one and "
                                "num_return_sequences 1")
    if criteria:
        raise InvalidInputError("stopping_criteria come with one sequence here (a batch of one and num_return_sequences 1): "
                                "model.generate calls them on the whole batch, where they may couple its rows, and neoxfuse "
                                "decodes one row at a time")
    if unpadded:
        raise InvalidInputError("stop_strings with more than one sequence (a batch, or num_return_sequences > 1) need an "
                                "eos_token_id: without one, model.generate goes on generating a stopped sequence until "
                                "all have stopped, and neoxfuse stops it")


def _stop_strings_criteria(stop_strings: str | list[str] | None, tokenizer) -> list[StoppingCriteria]:
    """model.generate's stop_strings as transformers' StopStringCriteria (a stop string may begin in
    the prompt, and end inside the last token); none without stop strings."""
    if not stop_strings:
        return []
    if tokenizer is None:
        raise InvalidInputError("stop_strings are matched in text: pass the model's tokenizer (tokenizer=), as "
                                "model.generate needs it too")
    return [StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)]


def _stopping_criteria(given: StoppingCriteriaList | list[StoppingCriteria] | None) -> list[StoppingCriteria]:
    """model.generate's stopping_criteria, checked: a list of callables (transformers' StoppingCriteria)."""
    criteria = [] if given is None else given
    if not isinstance(criteria, (list, tuple)) or not all(callable(criterion) for criterion in criteria):
        raise InvalidInputError(f"stopping_criteria must be a list of transformers' StoppingCriteria, got {given!r}")
    return list(criteria)


def _stop_when(criteria: list[StoppingCriteria], input_ids: torch.Tensor) -> Callable[[list[int]], bool] | None:
    """Engine.generate's stop_when of stopping criteria, as model.generate calls them after each new
    token: criterion(sequence [1, P + n] on input_ids' device, scores=None) (the scores stay in the
    decode step's graph; transformers' own criteria do not read them); None for no criteria."""
    if not criteria:
        return None
    listed, prompt = StoppingCriteriaList(criteria), input_ids[0].tolist()

    def stop(new: list[int]) -> bool:
        sequence = torch.tensor([prompt + new], dtype=input_ids.dtype, device=input_ids.device)
        return bool(listed(sequence, None)[0])

    return stop


def _bad_sequences(bad_words_ids: list[list[int]] | None, eos: frozenset[int]) -> list[tuple[int, ...]]:
    """bad_words_ids as SamplingParams.bad_sequences: each entry but a lone eos (which
    model.generate leaves out too)."""
    words = [] if bad_words_ids is None else bad_words_ids
    if isinstance(words, (str, bytes)) or not all(isinstance(w, (list, tuple)) and w and all(is_integer(t) for t in w)
                                                  for w in words):
        raise InvalidInputError(f"bad_words_ids must be a list of token id lists, got {bad_words_ids!r}")
    return [tuple(w) for w in words if not (len(w) == 1 and w[0] in eos)]


def _check_options(configs: list[GenerationConfig], options: dict) -> None:
    """InvalidInputError for an option that `options` (the call's) or one of `configs` (the first
    wins) sets and generate() does not implement, unless where it changes nothing (_NEUTRAL, _NO_EFFECT)."""
    unknown = [name for name in options if name not in vars(GenerationConfig()) and name not in _GENERATE_ARGUMENTS]
    if unknown:
        raise InvalidInputError(f"neoxfuse.hf.generate got unknown options {unknown} (not model.generate options)")
    for name in _GENERATE_ARGUMENTS & options.keys():
        value = options[name]
        if not (value is None or value is False or (isinstance(value, list) and not value)):  # None, False, an empty list
            raise InvalidInputError(f"model.generate's {name} is not implemented by neoxfuse.hf.generate (given {value!r})")
    values = {}
    for config in reversed(configs):
        values |= {name: value for name, value in config.to_diff_dict().items() if value is not None}  # what it sets
    for name, value in (values | options).items():
        if name.startswith("_") or name in _IMPLEMENTED or name in _NO_EFFECT or name in _GENERATE_ARGUMENTS or value is None:
            continue
        if name not in _NEUTRAL or value != _NEUTRAL[name]:
            where = "the call" if name in options else "the generation config"
            raise InvalidInputError(f"{name}={value!r} (set in {where}) would change what model.generate computes, and "
                                    "neoxfuse.hf.generate does not implement it (greedy or sampled batch-1 decoding with "
                                    "temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, repetition_penalty, "
                                    "suppress_tokens, begin_suppress_tokens, "
                                    "bad_words_ids, no_repeat_ngram_size, sequence_bias, stop_strings and a minimum length)")


def _engine(model: GPTNeoXForCausalLM, backend: str) -> Engine:
    """The Engine of `model` for `backend`: on the model's device and dtype, sharing its weights;
    built again when they have moved (model.to(device), model.half(): new tensors the Engine does
    not share)."""
    weight = model.get_input_embeddings().weight
    key = (backend, weight.device, weight.dtype, weight.data_ptr())
    cached = _ENGINES.get(model)
    if cached is None or cached[0] != key:
        cached = (key, Engine(model, backend=backend, device=weight.device, dtype=weight.dtype))
        _ENGINES[model] = cached
    return cached[1]
