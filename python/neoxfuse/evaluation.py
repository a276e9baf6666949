"""lm-evaluation-harness through neoxfuse: the model "neoxfuse" of `lm_eval`, an Engine behind it.

    import lm_eval, neoxfuse.evaluation   # registers the model
    lm_eval.simple_evaluate(model="neoxfuse", model_args="pretrained=/ckpt/pythia-2.8b", tasks=["lambada_openai"])

or `lm_eval --model neoxfuse ...` from Python that has imported this module. Every request runs
through the Engine, batch 1, so on a GPU every scored prediction is a decode step of the fused
kernels, and a benchmark's score checks them on real tasks:

- loglikelihood (context, continuation): lm_eval's own encoding of the pair (TemplateLM: the
  context's trailing spaces moved to the continuation, the end-of-text token as an empty
  context), then Engine.loglikelihood: the context prefilled, each continuation token a decode
  step; (log p(continuation | context), whether each token was the most likely);
- loglikelihood_rolling (text): Engine.score after the end-of-text token in windows of
  max_length + 1 tokens, which are lm_eval's rolling windows (neoxfuse.scoring): -total NLL;
- generate_until (context, gen_kwargs): Engine.generate of up to max_gen_toks tokens after the
  context (its last max_length - max_gen_toks tokens), ending at an end-of-text token (the
  tokenizer's and the generation config's, where HF's model.generate ends too) or after the token
  that completes one of `until`, the text cut at the first of them as lm_eval cuts it.
  Greedy unless do_sample (then temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff,
  eta_cutoff, with neoxfuse's Philox draws, not torch's); repetition_penalty and
  no_repeat_ngram_size too; any other option is refused.

With lm_eval's apply_chat_template (`neoxfuse eval --apply-chat-template`), each request's context
is the task's turns rendered by the tokenizer's chat template, as its HFLM renders them
(apply_chat_template below), for checkpoints whose tokenizer has one.

The numbers are HF's (lm_eval's HFLM on the same checkpoint) to the backend's precision:
tests/test_evaluation.py compares them request by request.
"""

from __future__ import annotations

import jinja2
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from neoxfuse.engine import AUTO, Engine
from neoxfuse.errors import InvalidInputError
from neoxfuse.progress import progress_bar
from neoxfuse.sampling import SAMPLED_ONLY, SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's default for generate_until
_SAMPLING_OPTIONS = {"temperature", *SAMPLED_ONLY, "repetition_penalty", "no_repeat_ngram_size"}


@register_model("neoxfuse")
class NeoxfuseLM(TemplateLM):
    """An lm_eval model decoding with a neoxfuse Engine (module docstring).

    pretrained: what Engine takes (a checkpoint directory, a cached Hub id; it needs a tokenizer).
    dtype: as Engine's (fp16, bf16, fp32, ...); None or "auto": Engine's default for the device.
    max_length: the context the model sees, at most its positions (default: all of them).
    batch_size: lm_eval's option; requests run one at a time whatever it says.
    """

    def __init__(self, pretrained: str, backend: str = AUTO, device: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, revision: str | None = None, seed: int = 0,
                 batch_size: int | str = 1, max_batch_size: int | None = None):
        super().__init__()
        dtype = None if dtype == "auto" else dtype  # lm_eval's word for the default
        self.engine = Engine(pretrained, backend=backend, device=device, dtype=dtype, max_seq_len=max_length,
                             revision=revision, seed=seed)
        if self.engine.tokenizer is None or self.engine.tokenizer.eos_token_id is None:
            raise InvalidInputError(f"lm_eval's requests are text: {self.engine.description} needs a tokenizer with an "
                                    "end-of-text token")
        self.tokenizer = self.engine.tokenizer
        self._device = self.engine.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, as HFLM gives it (lm_eval fingerprints chat-templated requests with it)."""
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The turns rendered by the tokenizer's chat template as HFLM renders them: the assistant's
        turn opened after them (add_generation_prompt), else their last message continued; without
        the system messages where the template refuses them."""
        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.TemplateError:
            return render([message for message in chat_history if message["role"] != "system"])

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's token ids, without special tokens (GPT-NeoX adds none; as lm_eval's HFLM)."""
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (logprob, is_greedy) each."""
        results = []
        for request, context, continuation in _progress(requests, "loglikelihood", disable_tqdm):
            scored = self.engine.loglikelihood(context, continuation)
            results.append((scored.logprob, scored.greedy))
            self.cache_hook.add_partial("loglikelihood", request, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each request's whole text (args: (text,)), every token scored."""
        results = []
        for (text,) in _progress([request.args for request in requests], "loglikelihood_rolling", disable_tqdm):
            tokens = self.tok_encode(text)
            results.append(-float(self.engine.score(tokens, prefix_token=self.prefix_token_id).nll.sum()) if tokens else 0.0)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context (args: (context, gen_kwargs)), cut at the first
        of `until` and the end-of-text token's text (lm_eval's reading of gen_kwargs and its cut)."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        for context, gen_kwargs in _progress([request.args for request in requests], "generate_until", disable_tqdm):
            options = dict(normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS))
            until = handle_stop_sequences(options.pop("until"), eos=eos_text)
            max_new = options.pop("max_gen_toks")
            if not 1 <= max_new < self.max_length:
                raise InvalidInputError(f"max_gen_toks must be from 1 to the model's {self.max_length} positions minus one "
                                        f"(room for the context); got {max_new}")
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            out = self.engine.generate(prompt, max_new, _sampling(options), stop_token_ids=self.engine.eos_token_ids,
                                       stop=[text for text in until if text and text != eos_text])
            text = postprocess_generated_text(self.tokenizer.decode(out.tokens, skip_special_tokens=True), until, None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


def _sampling(options: dict) -> SamplingParams:
    """A generate_until request's normalized gen_kwargs (but until and max_gen_toks) as SamplingParams:
    greedy unless do_sample, then temperature (default 1), top_k, top_p, min_p, typical_p,
    epsilon_cutoff, eta_cutoff, seed 0."""
    options = dict(options)
    do_sample = options.pop("do_sample")
    if unknown := sorted(set(options) - _SAMPLING_OPTIONS):
        raise InvalidInputError(f"generate_until options {unknown} are not implemented by neoxfuse (it takes do_sample, "
                                f"{', '.join(sorted(_SAMPLING_OPTIONS))})")
    temperature = float(options.pop("temperature", 1.0))
    if not do_sample:
        return SamplingParams(**{name: value for name, value in options.items() if name not in SAMPLED_ONLY})
    if temperature == 0:
        raise InvalidInputError("do_sample with temperature 0: set do_sample to False for greedy decoding")
    return SamplingParams(temperature=temperature, top_k=options.pop("top_k", 0) or 0, min_p=options.pop("min_p", 0.0) or 0.0,
                          seed=0, **options)


def _progress(items: list, what: str, disable: bool):
    """items, counted on a progress bar."""
    with progress_bar(len(items), what, unit="req", enabled=not disable) as bar:
        for item in items:
            yield item
            bar.update(1)
