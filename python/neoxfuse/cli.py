"""The `neoxfuse` command (also `python -m neoxfuse` and `bazel run //python:neoxfuse -- ...`).

    neoxfuse generate --tokens 1,2,3 [--model NAME|DIR] [--max-new-tokens N] [--temperature T ...]
    neoxfuse perplexity --file TEXT [--model DIR] [--compare-hf]  # teacher forced, through the backend's decode steps
    neoxfuse perplexity --documents FILE.jsonl --prefix-token eos  # a corpus, summed over its documents
    neoxfuse eval --model DIR --tasks lambada_openai [--compare-hf]  # lm-evaluation-harness tasks
    neoxfuse bench decode [--lengths 16,64] [--out-dir DIR]      # and every other suite in neoxfuse.bench
    neoxfuse env                                                 # GPUs, library, versions, backends

A failure the user can cause (no library, no GPU, an unknown model, a checkpoint that is not
GPT-NeoX, a prompt without a tokenizer, a sequence past the cache, ...) prints one line,
`neoxfuse: error: ...`, and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import json
import os
import platform
import sys
from pathlib import Path

import torch

import neoxfuse
from neoxfuse import _lib, bench
from neoxfuse.chat import chat_tokens
from neoxfuse.configs import MODEL_NAMES
from neoxfuse.device import devices
from neoxfuse.engine import AUTO, AUTO_ORDER, BACKENDS, DTYPES, Engine, Generation, backend_availability, load_hf_model, resolve_device, resolve_dtype
from neoxfuse.errors import InvalidInputError, NeoxfuseError
from neoxfuse.sampling import LATER_FILTERS, SAMPLED_ONLY, SamplingParams
from neoxfuse.progress import progress_bar
from neoxfuse.scoring import CorpusScores, Scores, TextMeasures, TokenLogprobs, hf_scores
from neoxfuse.server import CompletionServer, check_serving

GPU_DEFAULT_MODEL = "pythia-2.8b"
CPU_DEFAULT_MODEL = "pythia-70m"


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (sys.argv[1:] by default); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error argparse has already printed
        return int(exit_request.code or 0)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (NeoxfuseError, torch.OutOfMemoryError, OSError) as err:
        print(f"neoxfuse: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("neoxfuse: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, NeoxfuseError) else f"{type(err).__name__}: {text}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoxfuse", description="Batch-1 GPT-NeoX (Pythia) decoding at the speed of GPU memory.")
    parser.add_argument("--version", action="version", version=f"neoxfuse {neoxfuse.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate tokens from a prompt", description=_generate.__doc__)
    _add_generate_arguments(generate)
    generate.set_defaults(handler=_generate)

    perplexity = commands.add_parser("perplexity", help="score a text teacher forced: its perplexity, and HF's with --compare-hf",
                                     description=_perplexity.__doc__)
    _add_perplexity_arguments(perplexity)
    perplexity.set_defaults(handler=_perplexity)

    evaluate = commands.add_parser("eval", help="run lm-evaluation-harness tasks through neoxfuse, and HF with --compare-hf",
                                   description=_eval.__doc__)
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    serve = commands.add_parser("serve", help="serve OpenAI's completions and chat completions APIs over HTTP (neoxfuse.server)",
                                description=_serve.__doc__)
    _add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)

    bench_parser = commands.add_parser("bench", help="run a benchmark suite", description="Run a benchmark suite.")
    suites = bench_parser.add_subparsers(title="suites", metavar="SUITE")
    found, broken = bench.suites()
    for name, module in sorted(found.items()):
        suite = suites.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(suite)
        suite.set_defaults(handler=module.run)
    for module_name, why in sorted(broken.items()):
        suite = suites.add_parser(module_name.replace("_", "-"), help=f"(cannot run: {why})")
        suite.set_defaults(handler=_broken_suite(module_name, why))
    bench_parser.set_defaults(handler=lambda args: _usage(bench_parser))

    env = commands.add_parser("env", help="describe this machine: GPUs, library, versions, backends")
    env.set_defaults(handler=_env)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _broken_suite(module_name: str, why: str):
    def handler(args) -> int:
        print(f"neoxfuse: error: the bench suite neoxfuse.bench.{module_name} does not import: {why}", file=sys.stderr)
        return 1

    return handler


# ----------------------------------------------------------------------------------------------
# generate


def _ids(text: str) -> list[int]:
    """Comma-separated token ids ("1, 2,3") as a list ([] for blank text); ValueError naming the text
    otherwise, an empty id ("1,,2") included."""
    if not text.strip():
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"token ids are integers separated by commas, like 1,2,3; got {text!r}") from None


def _token_list(text: str) -> list[int]:
    try:
        tokens = _ids(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--tokens: {err}") from None
    if not tokens:
        raise argparse.ArgumentTypeError("--tokens needs at least one token id")
    return tokens


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What model runs where, and how: the arguments of every command that runs a model."""
    parser.add_argument("--model", help=f"a model name ({', '.join(MODEL_NAMES)}), which gives a random-initialised model "
                        "of that shape, a local Hugging Face checkpoint directory, or a Hub repo id (EleutherAI/pythia-2.8b) "
                        "already in the local Hugging Face cache: neoxfuse downloads nothing (default: a random-initialised "
                        f"{GPU_DEFAULT_MODEL} on a GPU, {CPU_DEFAULT_MODEL} on a CPU)")
    parser.add_argument("--revision", help="with a Hub repo id: the branch, tag or commit of the cached snapshot (default main; "
                        "Pythia's training checkpoints are step0 ... step143000)")
    parser.add_argument("--backend", default=AUTO, help=f"how the model is computed: {', '.join(sorted(BACKENDS))}, or {AUTO} "
                        f"(default): the first of {', '.join(AUTO_ORDER)} that can run here")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on a GPU (bf16 for a bf16 checkpoint), fp32 on a CPU")


def _model_name(args, device) -> str:
    """--model, or the default for the device; says on stderr when the model is random-initialised."""
    model = args.model or (GPU_DEFAULT_MODEL if device.type == "cuda" else CPU_DEFAULT_MODEL)
    if args.model is None:
        print(f"neoxfuse: no --model given: using a random-initialised {model} (its tokens mean nothing; pass --model DIR or a cached Hub id "
              "for a real checkpoint)" + (_cpu_shape_reason(model) if device.type == "cpu" else ""), file=sys.stderr)
    elif model in MODEL_NAMES:
        print(f"neoxfuse: {model} is random-initialised (neoxfuse downloads nothing; its tokens mean nothing); "
              "pass --model DIR or a cached Hub id (EleutherAI/pythia-2.8b) for a real checkpoint", file=sys.stderr)
    return model


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs a checkpoint with a tokenizer)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="prompt text read from a UTF-8 file (needs a checkpoint with a tokenizer)")
    prompt.add_argument("--tokens", type=_token_list, help="prompt token ids, comma-separated: 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens of mass top-p (default 1: all)")
    parser.add_argument("--min-p", type=float, default=0.0, help="sample among the tokens at least min-p times as likely as "
                        "the most likely one, as transformers' min_p (default 0: all)")
    parser.add_argument("--typical-p", type=float, default=1.0, help="sample among the tokens whose surprise is closest to "
                        "the entropy, of mass typical-p, as transformers' typical_p (default 1: all)")
    parser.add_argument("--epsilon-cutoff", type=float, default=0.0, help="sample among the tokens of probability at least "
                        "this, as transformers' epsilon_cutoff (default 0: all)")
    parser.add_argument("--eta-cutoff", type=float, default=0.0, help="sample among the tokens of probability at least "
                        "min(eta, sqrt(eta) exp(-entropy)), as transformers' eta_cutoff (default 0: all)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens already in the text less "
                        "likely, greedy or sampled, as transformers' repetition_penalty (default 1: none)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N", help="never repeat an N-gram of the "
                        "text (the prompt's too), greedy or sampled, as transformers' no_repeat_ngram_size (default 0: off)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted from the logits of the tokens "
                        "generated so far (not the prompt's), greedy or sampled, as OpenAI's presence_penalty (default 0)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted from the logits of the tokens "
                        "generated so far once per time generated, as OpenAI's frequency_penalty (default 0)")
    parser.add_argument("--seed", type=int, help="seed for sampling (and for a random-initialised model's weights; default 0)")
    parser.add_argument("--max-seq-len", type=int, help="KV cache positions (default: the model's maximum)")
    parser.add_argument("--stream", action="store_true", help="print the new text (token ids without a tokenizer) as it "
                        "is generated, instead of a progress bar")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="the first N new tokens are never the end-of-text "
                        "token, as transformers' min_new_tokens (default 0)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end after the token that completes TEXT "
                        "in the new text (needs a tokenizer; repeatable; $'\\nQ:' in bash for a newline)")
    parser.add_argument("--logprobs", type=int, metavar="N", help="print each new token's log-probability (from the model's "
                        "logits, before the sampling rule) and the N most likely tokens where it was chosen (0 to 20)")
    parser.add_argument("--chat", action="store_true", help="the prompt (--prompt) is the user's message of a chat, and "
                        "with --interactive each line is the next one: the conversation is rendered by the chat template (the "
                        "tokenizer's own, or --chat-template's) and each reply printed as the assistant's")
    parser.add_argument("--chat-template", type=Path, metavar="FILE", help="a Jinja chat template for --chat (implies it; "
                        "default: the tokenizer's own)")
    parser.add_argument("--system", metavar="TEXT", help="the chat's system message, first in every turn's conversation "
                        "(with --chat)")
    parser.add_argument("--interactive", action="store_true", help="then read lines from stdin, each added as typed to the "
                        "text so far (the prompt, if given, and every continuation; token ids without a tokenizer; an empty "
                        "line adds nothing), and continue it: the KV cache of the text so far is reused (Engine's "
                        "prefix_cache), so a turn prefills only its new tokens; the oldest tokens go when the context is full; Ctrl-C stops "
                        "a turn, EOF ends")
    parser.add_argument("--out", metavar="FILE", help="also write the generation to this JSON file: model, backend, sampling, "
                        "prompt and new tokens, text, timings, logprobs (not with --interactive)")


def _generate(args) -> int:
    """Generate tokens after a prompt, print them and their timings.

    Greedy by default; --temperature > 0 samples (with --top-k, --top-p, --min-p, --typical-p,
    --epsilon-cutoff, --eta-cutoff, --seed); --repetition-penalty, --no-repeat-ngram-size,
    --presence-penalty and --frequency-penalty apply either way. With a tokenizer
    (a checkpoint directory that has one) the text is printed too. Generation stops at the
    end-of-text tokens (the tokenizer's and the checkpoint's generation_config.json's, a chat
    model's end of turn among them: Engine.eos_token_ids) and after any --stop text.
    --interactive then continues the text with lines from stdin, turn by turn. --chat makes the
    prompt and each line the user's messages of a chat, rendered by the chat template.
    """
    if args.prompt_file is not None:  # --prompt, --prompt-file and --tokens exclude one another
        args.prompt = _read_text(args.prompt_file)
    if args.prompt is None and args.tokens is None and not args.interactive:
        raise InvalidInputError("generate needs a prompt: --prompt TEXT, --prompt-file FILE, --tokens 1,2,3 or --interactive "
                                "(lines from stdin)")
    chat_template = _read_chat_template(args.chat_template)
    chat = args.chat or chat_template is not None
    if chat and args.tokens is not None:
        raise InvalidInputError("--chat takes the user's message as text (--prompt TEXT), not token ids")
    if args.system is not None and not chat:
        raise InvalidInputError("--system is a chat's system message: give --chat too")
    system = [] if args.system is None else [_said("system", args.system)]
    device = resolve_device(args.device)
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, **{name: getattr(args, name) for name in SAMPLED_ONLY})
    if sampling.greedy and (set_filters := sampling.filters_on()):
        flags = ", ".join("--" + name.replace("_", "-") for name in set_filters)
        print(f"neoxfuse: greedy decoding (--temperature 0): {flags} {'has' if len(set_filters) == 1 else 'have'} no effect",
              file=sys.stderr)
    model = _model_name(args, device)
    engine = Engine(model, backend=args.backend, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len, seed=args.seed or 0,
                    revision=args.revision, prefix_cache=args.interactive)
    if chat:
        prompt = None if args.prompt is None else chat_tokens(engine, [*system, _said("user", args.prompt)], chat_template)
    else:
        prompt = args.tokens if args.prompt is None else engine.encode(args.prompt)
    if args.stop and engine.tokenizer is None:
        raise InvalidInputError(f"--stop matches text, and {engine.description} has no tokenizer to make text of its tokens")
    stops = {"stop_token_ids": engine.eos_token_ids, "stop": args.stop,  # Engine.generate's arguments on the end
             "min_new_tokens": args.min_new_tokens}
    if args.interactive:
        if args.logprobs is not None or args.out is not None:
            flag = "--logprobs lists" if args.logprobs is not None else "--out writes"
            raise InvalidInputError(f"{flag} a generation's tokens after it; --interactive streams turns instead")
        if chat:
            return _chat(engine, system, args.prompt, chat_template, args.max_new_tokens, sampling, stops)
        return _interactive(engine, prompt or [], args.max_new_tokens, sampling, stops)
    stream = _Stream(engine.tokenizer) if args.stream else None
    out = engine.generate(prompt, args.max_new_tokens, sampling, progress=stream is None, on_tokens=stream, logprobs=args.logprobs,
                          **stops)
    if stream is not None:
        print(flush=True)  # ends the streamed line

    print(f"model: {_engine_summary(engine)}")
    print(f"prompt ({_count(out.prompt_tokens, 'token')}): {','.join(map(str, out.prompt_tokens))}")
    print(f"generated ({_count(out.tokens, 'token')}): {','.join(map(str, out.tokens))}")
    if out.seed is not None:
        # --seed also seeds a random-initialised model's weights: it redraws these tokens only where
        # it was given, or where the weights come from a checkpoint.
        redraw = f" (--seed {out.seed} draws these tokens again)" if args.seed is not None or not engine.random_init else ""
        later = "".join(f"{name.replace('_', '-')} {value}, " for name, value in sampling.filters_on(LATER_FILTERS).items())
        print(f"sampled: temperature {sampling.temperature}, top-k {sampling.top_k}, top-p {sampling.top_p}, "
              f"{later}seed {out.seed}{redraw}")
    if sampling.penalized:
        print(f"repetition penalty {sampling.repetition_penalty} on the prompt's and the generated tokens")
    if sampling.no_repeat_ngram_size:
        print(f"no {sampling.no_repeat_ngram_size}-gram of the prompt and the generated tokens repeated")
    if sampling.counts_chosen:
        print(f"presence penalty {sampling.presence_penalty}, frequency penalty {sampling.frequency_penalty} on the generated tokens")
    if out.text is not None:
        shown = args.prompt if args.prompt is not None and not chat else engine.tokenizer.decode(out.prompt_tokens)  # chat: as rendered
        print(f"text: {shown}{out.text}")
    if out.logprobs is not None:
        _print_logprobs(engine, out.logprobs)
    timing = f"prefill {out.prefill_ms:.2f} ms"
    if out.tpot_ms is not None:
        timing += f"; {_count(out.decode_ms, 'decode step')}, TPOT {out.tpot_ms:.3f} ms ({1e3 / out.tpot_ms:.1f} tokens/s)"
    print(timing)
    if args.out is not None:
        _write_generation(Path(args.out), engine, sampling, out)
        print(f"results: {args.out}")
    return 0


def _write_generation(path: Path, engine: Engine, sampling: SamplingParams, out: Generation) -> None:
    """generate --out: the generation as JSON (times in ms; logprobs natural log, null unless asked for)."""
    record = {
        "model": engine.description, "backend": engine.backend_name, "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "sampling": {name: value for name, value in dataclasses.asdict(sampling).items() if not isinstance(value, frozenset)},
        "seed": out.seed, "prompt_tokens": out.prompt_tokens, "tokens": out.tokens, "text": out.text,
        "reused_tokens": out.reused_tokens, "prefill_ms": out.prefill_ms, "decode_ms": out.decode_ms, "tpot_ms": out.tpot_ms,
        "logprobs": None if out.logprobs is None else [dataclasses.asdict(entry) for entry in out.logprobs],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _print_logprobs(engine: Engine, listed: list[TokenLogprobs]) -> None:
    """Each new token and its logprob, then the most likely tokens where it was chosen and theirs."""
    def label(token: int) -> str:
        return str(token) if engine.tokenizer is None else f"{token} {engine.tokenizer.decode([token])!r}"

    print("logprobs (natural log, from the model's logits before the sampling rule):")
    for entry in listed:
        top = ", ".join(f"{label(token)} {value:.4f}" for token, value in entry.top)
        print(f"  {label(entry.token)} {entry.logprob:.4f}" + (f"  (most likely: {top})" if top else ""))


def _engine_summary(engine: Engine) -> str:
    """What runs: the model, the backend and why, the dtype and the device."""
    dtype_name = str(engine.dtype).replace("torch.", "")
    return f"{engine.description}; backend {engine.backend_name} ({engine.backend_reason}); {dtype_name} on {engine.device}"


def _interactive(engine: Engine, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, stops: dict) -> int:
    """Continues a text turn by turn: the prompt, then each line read from stdin, is added to it and
    the continuation streamed to stdout, with a line on stderr of what the turn ran and how fast.
    The engine's prefix cache keeps the text's keys and values between turns; when the text and
    max_new_tokens would not fit the cache, its oldest tokens are dropped, down to half the room (so
    the turns after the cache is rebuilt find their text in it again)."""
    room = engine.max_seq_len - max_new_tokens + 1  # positions the text may fill before a turn
    if room < 1:
        raise InvalidInputError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                                f"{engine.max_seq_len}-position KV cache; ask for fewer or raise --max-seq-len")
    print(f"neoxfuse: {_engine_summary(engine)}. Each line "
          f"continues the text ({'text' if engine.tokenizer else 'token ids, comma-separated'}); Ctrl-C stops a turn, EOF (Ctrl-D) ends.",
          file=sys.stderr)
    text: list[int] = []
    added = prompt
    while added is not None:
        if text or added:
            text = _continue(engine, text, added, room, max_new_tokens, sampling, stops)
        added = _read_turn(engine)
    return 0


def _continue(engine: Engine, text: list[int], added: list[int], room: int, max_new_tokens: int,
              sampling: SamplingParams, stops: dict) -> list[int]:
    """One turn: text + added (cut to its last room // 2 tokens, or to all of `added` up to `room`,
    when longer than `room`), continued; the text after it (unchanged when `added` is refused; up to
    the last token printed when Ctrl-C interrupts the turn, which ends the turn, not the session)."""
    prompt = text + added
    if len(prompt) > room:
        kept = max(room // 2, min(len(added), room), 1)
        print(f"neoxfuse: the context is full: dropping the oldest {len(prompt) - kept} tokens", file=sys.stderr)
        prompt = prompt[-kept:]
    stream = _Stream(engine.tokenizer)
    try:
        out = engine.generate(prompt, max_new_tokens, sampling, on_tokens=stream, **stops)
    except InvalidInputError as err:  # a bad line: refused before anything ran, the text stays as it was
        print(f"neoxfuse: error: {_one_line(err)}", file=sys.stderr)
        return text
    except KeyboardInterrupt:
        print(flush=True)
        print("[interrupted; the engine keeps no cache of an unfinished turn: the next one prefills all its context]",
              file=sys.stderr)
        return prompt + stream.tokens
    print(flush=True)
    timing = f"prefill {out.prefill_ms:.2f} ms"
    if out.tpot_ms is not None:
        timing += f", TPOT {out.tpot_ms:.3f} ms"
    print(f"[{_count(out.prompt_tokens, 'token')} of context, {out.reused_tokens} reused from the cache; "
          f"{_count(out.tokens, 'new token')}; {timing}]", file=sys.stderr)
    return prompt + out.tokens


def _chat(engine: Engine, system: list[dict], first: str | None, template: str | None, max_new_tokens: int,
          sampling: SamplingParams, stops: dict) -> int:
    """A chat turn by turn: the first message (if any) and each line read from stdin (an empty one
    adds nothing) is the user's, the model's reply to the conversation so far (after the `system`
    messages), rendered by the chat template, the assistant's. The engine's prefix cache keeps what
    the last turn ran, so a turn prefills about its new messages only; when the conversation and
    max_new_tokens would not fit the cache, its oldest exchanges are dropped (never the system's)."""
    room = engine.max_seq_len - max_new_tokens + 1  # positions the rendered conversation may fill
    print(f"neoxfuse: {_engine_summary(engine)}. Each line is your message in the chat; Ctrl-C stops a reply, EOF (Ctrl-D) ends.",
          file=sys.stderr)
    messages: list[dict] = []
    line = first
    while line is not None:
        if line:
            messages = _reply(engine, system, [*messages, _said("user", line)], template, room, max_new_tokens, sampling, stops)
        line = _read_line()
    return 0


def _reply(engine: Engine, system: list[dict], messages: list[dict], template: str | None, room: int, max_new_tokens: int,
           sampling: SamplingParams, stops: dict) -> list[dict]:
    """One chat turn: the assistant's reply to `messages` after `system` (the oldest user-assistant
    exchanges dropped while the rendered conversation is longer than `room`), streamed; the messages
    with it (without the last when it cannot be answered; up to the text printed when Ctrl-C
    interrupts the reply)."""
    stream = _Stream(engine.tokenizer)
    try:
        prompt = chat_tokens(engine, [*system, *messages], template)
        while len(prompt) > room and len(messages) > 2:
            messages = messages[2:]
            print("neoxfuse: the context is full: dropping the oldest exchange", file=sys.stderr)
            prompt = chat_tokens(engine, [*system, *messages], template)
        out = engine.generate(prompt, max_new_tokens, sampling, on_tokens=stream, **stops)
    except InvalidInputError as err:  # refused before anything ran: the message goes unanswered
        print(f"neoxfuse: error: {_one_line(err)}", file=sys.stderr)
        return messages[:-1]
    except KeyboardInterrupt:
        print(flush=True)
        return [*messages, _said("assistant", engine.tokenizer.decode(stream.tokens, skip_special_tokens=True))]
    print(flush=True)
    print(f"[{_count(out.prompt_tokens, 'token')} of conversation, {out.reused_tokens} reused from the cache; "
          f"{_count(out.tokens, 'new token')}]", file=sys.stderr)
    return [*messages, _said("assistant", engine.tokenizer.decode(out.tokens, skip_special_tokens=True))]


def _said(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def _read_chat_template(path: Path | None) -> str | None:
    """The text of a --chat-template file (None for none); InvalidInputError when it cannot be read."""
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as err:
        raise InvalidInputError(f"--chat-template {path}: {err.strerror or err}") from None


def _read_line() -> str | None:
    """The next line of stdin without its newline (after a prompt where it is a terminal), or None at its end."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.removesuffix("\n") if line else None


def _read_turn(engine: Engine) -> list[int] | None:
    """The tokens of the next line of stdin (without its newline), or None at its end."""
    while True:
        line = _read_line()
        if line is None:
            return None
        if engine.tokenizer is not None:
            return engine.encode(line) if line else []
        try:
            return _ids(line)
        except ValueError as err:
            print(f"neoxfuse: error: {err}", file=sys.stderr)


class _Stream:
    """Prints new tokens as Engine.generate hands them over: the text they add when there is a
    tokenizer (all tokens so far decoded, past what is printed, as HF's TextStreamer does; held
    back while it ends inside a character), else their ids, comma-separated."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, tokens: list[int]) -> None:
        separator = "," if self.tokens else ""
        self.tokens += tokens
        if self.tokenizer is None:
            print(separator + ",".join(map(str, tokens)), end="", flush=True)
            return
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # else a character is still incomplete: wait for more tokens
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _cpu_shape_reason(model: str) -> str:
    return (f"; {model} because this run is on a CPU, where {GPU_DEFAULT_MODEL} (the GPU default) would need 11 GB "
            "in fp32 and seconds per token")


# ----------------------------------------------------------------------------------------------
# perplexity


def _add_perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-initialised model's weights (default 0)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--file", help="a UTF-8 text file to score (needs a checkpoint with a tokenizer)")
    text.add_argument("--text", help="text to score (needs a checkpoint with a tokenizer)")
    text.add_argument("--tokens", type=_token_list, help="token ids to score, comma-separated: 1,2,3")
    text.add_argument("--documents", metavar="FILE.jsonl", help="a corpus to score, one document per line of JSON Lines (a "
                      "JSON string, or an object with the text under --text-key), each document on its own from an empty "
                      "context; perplexity and word and byte measures are then summed over all of them, as "
                      "lm-evaluation-harness sums a dataset's documents (needs a checkpoint with a tokenizer)")
    parser.add_argument("--text-key", help="with --documents: the key of an object's text (default: text; wikitext's "
                        "document-level pages: page)")
    parser.add_argument("--count-key", help="with --documents and a prefix token: count words and bytes in the text under "
                        "this key instead of the one scored (lm-evaluation-harness's wikitext scores a detokenized page and "
                        "counts in the page as it was; default: the text scored)")
    parser.add_argument("--max-documents", type=int, help="with --documents: score only the first N (default: all)")
    parser.add_argument("--max-tokens", type=int, help="score only the text's first N tokens (default: all)")
    parser.add_argument("--window", type=int, help="tokens per window, context included; the model runs all but the last, "
                        "which is only predicted (default: the model's positions plus one, so a window uses them all)")
    parser.add_argument("--stride", type=int, help="tokens between the starts of windows, from 1 to the window minus one; "
                        "each window scores only tokens no earlier one scored, so a smaller stride gives each more context "
                        "and costs more (default: the window minus one, windows overlapping by one token)")
    parser.add_argument("--prefix-token", help="a token id, or 'eos' for the tokenizer's end-of-text token, put before the "
                        "text so that its first token is scored too (as lm-evaluation-harness does); with a text, also gives "
                        "word and byte perplexity and bits per byte (default: none, the first token is only context)")
    parser.add_argument("--compare-hf", action="store_true", help="score the same tokens with HF transformers too (the "
                        "checkpoint loaded by transformers itself, same device and dtype) and say how far apart the two are")
    parser.add_argument("--out", help="also write the results to this JSON file")


def _perplexity(args) -> int:
    """Score a text teacher forced and print its perplexity, exp(mean NLL per token).

    Each token after the first is predicted from the tokens before it in its window (windows of
    --window tokens, starting every --stride tokens, by default overlapping by one token:
    neoxfuse.scoring), every prediction a decode step of the backend, each window from an empty KV
    cache: on a GPU, the fused decode kernels. --prefix-token puts a token (e.g. the end-of-text
    token) before the text, so that every token of the text is scored, and then a text's total NLL
    is also given per word and per byte. --documents scores a corpus one document at a time and
    sums over the documents. --compare-hf scores the same tokens with HF transformers (one forward
    pass per window) and prints how far the two are apart: the perplexities, the per-token NLLs and
    how often both rank the same token first.
    """
    if args.file is None and args.text is None and args.tokens is None and args.documents is None:
        raise InvalidInputError("perplexity needs a text: --file PATH, --text TEXT, --tokens 1,2,3 or --documents FILE.jsonl")
    for flag, value, least in (("--window", args.window, 2), ("--max-tokens", args.max_tokens, 2), ("--max-documents", args.max_documents, 1)):
        if value is not None and value < least:
            raise InvalidInputError(f"{flag} must be at least {least}{' (a token and the one it predicts)' * (least == 2)}; got {value}")
    corpus_flags = [flag for flag, value in (("--text-key", args.text_key), ("--count-key", args.count_key),
                                             ("--max-documents", args.max_documents)) if value is not None]
    if args.documents is None and corpus_flags:
        raise InvalidInputError(f"{' and '.join(corpus_flags)} choose what --documents' file is read as; there is no --documents")
    if args.documents is not None and args.max_tokens is not None:
        raise InvalidInputError("--max-tokens cuts one text; with --documents, --max-documents limits how many are scored")
    documents = None if args.documents is None else _read_documents(args.documents, args.text_key or "text", args.count_key,
                                                                   args.max_documents)
    text = args.text if args.file is None else _read_text(args.file)
    device = resolve_device(args.device)
    model = _model_name(args, device)
    engine = Engine(model, backend=args.backend, device=device, dtype=args.dtype, seed=args.seed, revision=args.revision)
    prefix_token = _prefix_token(args.prefix_token, engine)
    if documents is not None:
        texts = [counted for _, counted in documents]  # what words and bytes are counted in
        score = functools.partial(_score_documents, [engine.encode(scored) for scored, _ in documents])
    else:
        tokens = args.tokens if text is None else engine.encode(text)
        cut_text = False  # whether --max-tokens cut a text that would have had word and byte measures
        if args.max_tokens is not None and args.max_tokens < len(tokens):
            cut_text = text is not None and prefix_token is not None
            tokens, text = tokens[: args.max_tokens], None  # the text's measures are of the whole text
        texts = text

        def score(scorer):
            return scorer(tokens)

    scores = score(lambda tokens: engine.score(tokens, window=args.window, stride=args.stride, prefix_token=prefix_token,
                                               progress=documents is None))
    first = scores.documents[0] if documents is not None else scores
    run = [first] if documents is None else scores.documents
    results = {"model": engine.description, "backend": engine.backend_name, "dtype": str(engine.dtype).replace("torch.", ""),
               "device": str(engine.device), **({} if documents is None else {"documents": len(run)}),
               "tokens": sum(len(one.tokens) for one in run), "prefix_token": prefix_token, "window": first.window,
               "stride": first.stride, "windows": sum(one.windows for one in run), "neoxfuse": _scored(scores, texts)}
    overlap = ("overlapping by one" if first.stride == first.window - 1 else
               f"one every {first.stride} tokens: a token after the first window has at least {first.window - first.stride} "
               "tokens of context")
    print(f"model: {_engine_summary(engine)}")
    if documents is not None:
        which = (f"{_count(run, 'document')}, one at a time from an empty context: {len(scores.nll)} tokens, "
                 + (f"every token of each after the prefix token {prefix_token}" if prefix_token is not None else
                    "all but the first of each"))
    elif prefix_token is not None:
        which = f"the {len(tokens)} tokens of the text after the prefix token {prefix_token}"
    else:
        which = f"the {len(first.tokens) - 1} tokens after the first of {len(first.tokens)}"
    print(f"scored: {which}, in {_count(range(results['windows']), 'window')} of up to {first.window} tokens ({overlap})")
    if documents is None and cut_text:
        print("no word or byte perplexity: they are of a whole text, and --max-tokens cut it")
    print(f"neoxfuse ({engine.backend_name}): {_scores_line(scores, texts)}")
    if args.compare_hf:
        hf_model, _ = load_hf_model(model, dtype=engine.dtype, seed=args.seed, device=engine.device, revision=args.revision)
        reference = score(lambda tokens: hf_scores(hf_model, tokens, first.window, first.stride, prefix_token))
        difference = scores.difference(reference)
        results |= {"hf": _scored(reference, texts), "difference": dataclasses.asdict(difference)}
        print(f"HF transformers (one forward pass per window): {_scores_line(reference, texts)}")
        print(f"difference: perplexity {difference.relative_perplexity:.2e} relative; NLL per token: max |d| {difference.max_abs_nll:.2e}, "
              f"mean |d| {difference.mean_abs_nll:.2e}; the same token ranked first at {100 * difference.top1_agreement:.2f}% of positions")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.out}")
    return 0


def _score_documents(token_lists: list[list[int]], scorer) -> CorpusScores:
    """Each document's tokens scored by scorer(tokens) -> Scores, on a progress bar."""
    documents = []
    with progress_bar(len(token_lists), "documents", unit="doc") as bar:
        for number, tokens in enumerate(token_lists, 1):
            try:
                documents.append(scorer(tokens))
            except InvalidInputError as err:
                raise InvalidInputError(f"document {number}: {err}") from None
            bar.update(1)
    return CorpusScores(tuple(documents))


def _read_documents(path: str, text_key: str, count_key: str | None, limit: int | None) -> list[tuple[str, str]]:
    """--documents: (text scored, text whose words and bytes count) of each document of a JSON Lines
    file, one per line (blank lines skipped): a JSON string, or an object with them under text_key
    and count_key (None: the text scored); the first `limit` (None: all)."""
    documents = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{path}:{number} is not a line of JSON: {err}") from None
        if count_key is not None and not isinstance(value, dict):
            raise InvalidInputError(f"{path}:{number}: --count-key needs each document to be an object, got {value!r:.60}")
        texts = []
        for key in (text_key, text_key if count_key is None else count_key):
            text = value.get(key) if isinstance(value, dict) else value
            if isinstance(value, dict) and key not in value:
                raise InvalidInputError(f"{path}:{number}: the document has no {key!r} (its keys: {', '.join(sorted(value))})")
            if not isinstance(text, str) or not text:
                raise InvalidInputError(f"{path}:{number}: a document's text is a non-empty JSON string, got {text!r:.60}")
            texts.append(text)
        documents.append(tuple(texts))
        if len(documents) == limit:
            break
    if not documents:
        raise InvalidInputError(f"{path} holds no documents")
    return documents


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"{path} is not UTF-8 text: {err}") from None


def _prefix_token(value: str | None, engine: Engine) -> int | None:
    """--prefix-token: None, an id, or 'eos' for the tokenizer's end-of-text id."""
    if value is None:
        return None
    if value == "eos":
        eos = getattr(engine.tokenizer, "eos_token_id", None)
        if eos is None:
            raise InvalidInputError(f"--prefix-token eos needs a tokenizer with an end-of-text token, and {engine.description} "
                                    "has none: give the token's id")
        return eos
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"--prefix-token takes a token id or 'eos', got {value!r}") from None


def _text_measures(scores: Scores | CorpusScores, text: str | list[str] | None) -> TextMeasures | None:
    """The per-word and per-byte measures, where there is a whole text (or corpus) scored after a prefix token."""
    return None if text is None or scores.prefix_token is None else scores.text_measures(text)


def _scored(scores: Scores | CorpusScores, text: str | list[str] | None) -> dict:
    measures = _text_measures(scores, text)
    per_document = ({} if isinstance(scores, Scores) else
                    {"document_perplexities": [document.perplexity for document in scores.documents]})
    return {"perplexity": scores.perplexity, "mean_nll": scores.mean_nll, "ms_per_token": scores.ms_per_token,
            **({} if measures is None else dataclasses.asdict(measures)), **per_document}


def _scores_line(scores: Scores | CorpusScores, text: str | list[str] | None) -> str:
    line = (f"perplexity {scores.perplexity:.4f} (mean NLL {scores.mean_nll:.5f} nats per token); "
            f"{scores.ms_per_token:.3f} ms per token")
    if (measures := _text_measures(scores, text)) is not None:
        line += (f"; word perplexity {measures.word_perplexity:.4f} ({measures.words} words), byte perplexity "
                 f"{measures.byte_perplexity:.5f}, {measures.bits_per_byte:.5f} bits per byte ({measures.bytes} bytes)")
    return line


# ----------------------------------------------------------------------------------------------
# eval


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--tasks", required=True, help="lm-evaluation-harness task names, comma-separated (lambada_openai,"
                        "wikitext,...); their datasets come from the local Hugging Face datasets cache or --include-path's")
    parser.add_argument("--include-path", help="a folder of task YAML files of your own, for tasks on local data")
    parser.add_argument("--limit", type=float, help="only the first N documents of each task (N < 1: that fraction)")
    parser.add_argument("--num-fewshot", type=int, help="examples before each question (default: each task's)")
    parser.add_argument("--max-length", type=int, help="the context the model sees (default: all its positions)")
    parser.add_argument("--apply-chat-template", action="store_true", help="render each request's context with the "
                        "tokenizer's chat template (a chat model's), few-shot examples as turns: lm_eval's apply_chat_template")
    parser.add_argument("--compare-hf", action="store_true", help="run the same tasks through lm-evaluation-harness's HF "
                        "model (the checkpoint loaded by transformers, same device and dtype) and print both")
    parser.add_argument("--out", help="also write the metrics to this JSON file")


def _eval(args) -> int:
    """Run lm-evaluation-harness tasks with neoxfuse as the model and print its table of metrics.

    Every request goes through the Engine (neoxfuse.evaluation: on a GPU, each scored prediction
    and each generated token is a step of the fused kernels); --compare-hf runs the same tasks
    through lm-evaluation-harness's own HF model too, so the two tables say whether the kernels
    score what HF scores on real tasks. Needs a checkpoint with a tokenizer, and lm-eval installed.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from neoxfuse.evaluation import NeoxfuseLM
    except ImportError as err:
        raise NeoxfuseError(f"neoxfuse eval runs lm-evaluation-harness, which is not installed here ({err}): "
                            "pip install 'lm-eval[hf]'") from None
    device = resolve_device(args.device)
    model = _model_name(args, device)
    tasks = [name for name in args.tasks.split(",") if name]
    manager = TaskManager(include_path=args.include_path)
    if unknown := [name for name in tasks if name not in manager.all_tasks]:
        raise InvalidInputError(f"unknown lm-evaluation-harness tasks {unknown} (`lm_eval ls tasks` lists them; --include-path "
                                "adds your own)")
    ours = NeoxfuseLM(pretrained=model, backend=args.backend, device=str(device), dtype=args.dtype, max_length=args.max_length,
                      revision=args.revision)
    print(f"model: {_engine_summary(ours.engine)}")

    if args.apply_chat_template and getattr(ours.tokenizer, "chat_template", None) is None:
        raise InvalidInputError(f"--apply-chat-template: the tokenizer of {ours.engine.description} has no chat template")

    def evaluate(lm) -> dict:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                       num_fewshot=args.num_fewshot, log_samples=False, apply_chat_template=args.apply_chat_template)

    runs = {"neoxfuse": evaluate(ours)}
    print(f"neoxfuse ({ours.engine.backend_name}):\n{make_table(runs['neoxfuse'])}")
    if args.compare_hf:
        hf_model, _ = load_hf_model(model, dtype=ours.engine.dtype, device=ours.engine.device, revision=args.revision)
        runs["hf"] = evaluate(HFLM(pretrained=hf_model, tokenizer=ours.tokenizer, batch_size=1, max_length=ours.max_length))
        print(f"HF transformers (lm-evaluation-harness's HF model):\n{make_table(runs['hf'])}")
    if args.out:
        results = {"model": ours.engine.description, "backend": ours.engine.backend_name, "tasks": tasks, "limit": args.limit,
                   **{name: run["results"] for name, run in runs.items()}}
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results: {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# serve


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0: any free one)")
    parser.add_argument("--served-model-name", help="the model name requests give (default: the --model given)")
    parser.add_argument("--max-seq-len", type=int, help="KV cache positions (default: the model's maximum)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-initialised model's weights (default 0)")
    parser.add_argument("--prefix-cache", action="store_true", help="keep the KV cache a completion leaves for the next "
                        "request, which then prefills only its prompt after the longest prefix they share (a conversation's "
                        "next turn; usage.prompt_tokens_details.cached_tokens counts the rest); off by default, as the Engine's "
                        "prefix_cache, since reused keys and values round differently from a prefill's")
    parser.add_argument("--chat-template", type=Path, metavar="FILE", help="a Jinja chat template that renders "
                        "/v1/chat/completions messages into a prompt (default: the tokenizer's own, where it has one)")
    parser.add_argument("--max-waiting", type=int, metavar="N", help="refuse a request (503, code overloaded) when N "
                        "already wait behind the running one (default: any number wait)")
    parser.add_argument("--api-key", metavar="KEY", help="answer only requests that carry KEY (`Authorization: Bearer "
                        "KEY`, as OpenAI's clients send it; every route but /health); default: the environment's "
                        "NEOXFUSE_API_KEY, else none")


def _serve(args) -> int:
    """Serve OpenAI's completions and chat completions APIs (POST /v1/completions,
    POST /v1/chat/completions, GET /v1/models) and vLLM's tokenizer routes over HTTP until Ctrl-C.

    One Engine answers every request, one request at a time (batch 1); see neoxfuse.server for the
    fields it takes. `curl localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 16}'`;
    lm-evaluation-harness: `lm_eval --model local-completions --model_args
    model=NAME,base_url=http://127.0.0.1:8000/v1/completions` (NAME: --served-model-name, or --model).
    """
    device = resolve_device(args.device)
    model = _model_name(args, device)
    chat_template = _read_chat_template(args.chat_template)
    api_key = args.api_key if args.api_key is not None else os.environ.get("NEOXFUSE_API_KEY")
    check_serving(api_key, args.max_waiting)  # before the model loads
    engine = Engine(model, backend=args.backend, device=device, dtype=args.dtype, max_seq_len=args.max_seq_len, seed=args.seed,
                    revision=args.revision, prefix_cache=args.prefix_cache)
    try:
        server = CompletionServer(engine, (args.host, args.port), args.served_model_name or model, chat_template, api_key,
                                  args.max_waiting)
    except (OSError, OverflowError) as err:  # in use, not this machine's address, past 65535
        raise InvalidInputError(f"cannot listen on {args.host}:{args.port}: {getattr(err, 'strerror', None) or err}") from None
    print(f"model: {_engine_summary(engine)}", flush=True)
    print(f"neoxfuse: serving {server.model_name!r} at {server.url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    if api_key is None and not ipaddress.ip_address(server.server_address[0]).is_loopback:
        print(f"neoxfuse: warning: {args.host} is reachable from other machines and no API key is set: whoever reaches it "
              "can use it (--api-key KEY)", file=sys.stderr, flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("neoxfuse: stopped", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# env


def _nvml_summary() -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(driver version, [(name, sm)] of every GPU, why NVML could not tell) from nvidia-ml-py, if usable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # ImportError, or any NVMLError: no driver here
        return None, [], f"NVML not usable: {err or type(err).__name__}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append((pynvml.nvmlDeviceGetName(handle), f"{major}{minor}"))
        return (driver.decode() if isinstance(driver, bytes) else driver), gpus, None
    finally:
        pynvml.nvmlShutdown()


def _env(args) -> int:
    """Prints the GPUs, the driver, the library and what code it holds for each GPU, versions, and the backends."""
    print(f"neoxfuse {neoxfuse.__version__} (Python {platform.python_version()}, {platform.system()} {platform.machine()})")

    archs: list[str] = []
    library_gpus = None
    try:
        build = _lib.build_info()
        archs = _lib.archs()
        print(f"library: {_lib.library_path().resolve()}\n  build: {build}")
        library_gpus = devices()
    except NeoxfuseError as err:
        print(f"library: not usable: {_one_line(err)}")

    cuda = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
    print(f"torch: {torch.__version__} ({cuda}; CUDA {'available' if torch.cuda.is_available() else 'not available'})")
    try:
        import transformers

        print(f"transformers: {transformers.__version__}")
    except ImportError:
        print("transformers: not installed")

    driver, nvml_gpus, nvml_problem = _nvml_summary()
    if driver:
        print(f"driver: {driver} (NVML)")
    elif library_gpus:
        print(f"driver: CUDA {library_gpus[0].driver_version} (through the library)")
    if library_gpus:
        gpus = [(f"{d.name}, {d.multiprocessors} SMs, {d.total_memory_bytes / 2**30:.1f} GiB, L2 {d.l2_cache_bytes / 2**20:.0f} MiB", d.sm) for d in library_gpus]
    else:
        gpus = nvml_gpus
    if not gpus:
        why = [nvml_problem] if nvml_problem else []
        if library_gpus == []:
            why.append("the library sees no CUDA device")
        print("GPUs: none" + (f" ({'; '.join(why)})" if why else ""))
    for index, (description, sm) in enumerate(gpus):
        if archs:
            code = _lib.code_for(sm, archs) or f"NO code for sm_{sm} (the library holds {','.join(archs)}): its kernels cannot run here"
        else:
            code = "unknown (no library)"
        print(f"GPU {index}: {description}; compute capability {sm[:-1]}.{sm[-1]} -> {code}")

    device = resolve_device(None)
    dtype = resolve_dtype(None, device)
    print(f"backends (on {device}, {str(dtype).replace('torch.', '')}):")
    for name, availability in backend_availability(device, dtype).items():
        print(f"  {name}: {'yes' if availability else 'no'}: {availability.reason}")
    return 0
