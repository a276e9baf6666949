"""`neoxfuse bench sample`: choosing a sampled token from the logits, the sampling kernel against PyTorch.

    neoxfuse bench sample [--vocabs V,...] [--rule T:K:P]... [--providers neoxfuse,torch_graph,hf_eager]

Each provider turns logits [vocab] fp32 (N(0, 9), as a model gives them) into one token drawn by
a sampling rule (temperature T, top-k K, top-p P; 0 and 1 switch a filter off): the work a sampled
decode step adds after the LM head.

  neoxfuse     neoxfuse.ops.fused_decoder.sample_token: one cluster launch (kernels/fused_decoder/sample.cuh)
  torch_graph  neoxfuse.sampling's PyTorch ops for the same rule (probabilities, then
               exponential_race), captured in a CUDA graph: the fused step's sampler before the kernel
  hf_eager     what transformers' generate() runs per sampled token: its temperature, top-k and
               top-p logits warpers, softmax and torch.multinomial, eagerly (a host launch per op)

neoxfuse and torch_graph are captured `--calls` at a time in one CUDA graph (a sample is one
replay's time / calls); hf_eager is timed per call with CUDA events. The logits stay in L2 as
they do after the LM head wrote them. `match` is the fraction of MATCH_DRAWS draws, from one seed,
in which the kernel's token equals torch_graph's (neoxfuse.sampling: they part only where roundings
decide a near tie, so expect 1.0).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import transformers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from neoxfuse import sampling
from neoxfuse.bench.common import Timing, device_record, providers_arg, time_cuda, time_graph, write_results
from neoxfuse.checks import require_cuda
from neoxfuse.device import copy_bandwidth
from neoxfuse.errors import InvalidInputError
from neoxfuse.monitor import GpuMonitor
from neoxfuse.ops import fused_decoder
from neoxfuse.sampling import SamplingParams, exponential_race, probabilities

SUITE = "sample"
HELP = "choosing a sampled token from the logits: the sampling kernel vs PyTorch ops (CUDA graph) and HF's warpers"
PROVIDERS = ("neoxfuse", "torch_graph", "hf_eager")
DEFAULT_RULES = ("1.0:0:1.0", "0.8:50:1.0", "0.8:0:0.9", "0.7:50:0.95")  # T:K:P
DEFAULT_VOCABS = (8192, 50304, 65536)  # a small one, Pythia's, the most the kernel holds
MATCH_DRAWS = 64


def parse_rule(text: str) -> SamplingParams:
    """'T:K:P' (temperature, top-k, top-p), e.g. '0.7:50:0.95'; T > 0."""
    try:
        temperature, top_k, top_p = text.split(":")
        rule = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    except (ValueError, InvalidInputError) as err:
        raise argparse.ArgumentTypeError(f"a rule is T:K:P with T > 0, K >= 0, P in (0, 1], e.g. 0.7:50:0.95; "
                                         f"got {text!r} ({err})") from None
    if rule.greedy:
        raise argparse.ArgumentTypeError(f"{text!r}: temperature 0 is greedy decoding, which samples nothing")
    return rule


def _vocabs_arg(text: str) -> list[int]:
    try:
        vocabs = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vocabs = []
    if not vocabs or min(vocabs) < 1:
        raise argparse.ArgumentTypeError(f"vocabs are positive integers separated by commas; got {text!r}")
    return vocabs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocabs", type=_vocabs_arg, default=list(DEFAULT_VOCABS),
                        help=f"comma-separated vocabulary sizes (default {','.join(map(str, DEFAULT_VOCABS))})")
    parser.add_argument("--rule", dest="rules", action="append", type=parse_rule, metavar="T:K:P",
                        help=f"a sampling rule, repeatable (default: {', '.join(DEFAULT_RULES)})")
    parser.add_argument("--providers", type=providers_arg(PROVIDERS), default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--calls", type=int, default=32, help="calls per CUDA graph replay (default 32)")
    parser.add_argument("--runs", type=int, default=100, help="timed samples per provider and rule (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the logits and the draws")
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON results go (default bench/results)")


def hf_warpers(rule: SamplingParams) -> list:
    """transformers' logits warpers for the rule, as generate() picks them: temperature (unless 1),
    top-k (unless 0), top-p (unless 1), in that order."""
    warpers = [TemperatureLogitsWarper(rule.temperature)] if rule.temperature != 1 else []
    if rule.top_k:
        warpers.append(TopKLogitsWarper(rule.top_k))
    if rule.top_p < 1:
        warpers.append(TopPLogitsWarper(rule.top_p))
    return warpers


def hf_probabilities(logits: torch.Tensor, rule: SamplingParams) -> torch.Tensor:
    """The distribution generate() samples from: softmax of the warped scores. [vocab] fp32."""
    scores = logits[None].float()  # [1, vocab]
    for warper in hf_warpers(rule):
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def hf_choose(logits: torch.Tensor, rule: SamplingParams) -> torch.Tensor:
    """One token as generate() draws it: torch.multinomial over hf_probabilities. [1] long."""
    return torch.multinomial(hf_probabilities(logits, rule), 1)


def _measure(provider: str, logits: torch.Tensor, rule: SamplingParams, args) -> Timing:
    rng = rule.rng(logits.device)  # [2]
    if provider == "neoxfuse":
        tokens = torch.empty(args.calls, 1, dtype=torch.long, device=logits.device)

        def step(i):
            return fused_decoder.sample_token(logits, rng, rule.temperature, rule.top_k, rule.top_p, out=tokens[i])
        return time_graph(step, args.calls, runs=args.runs)
    if provider == "torch_graph":
        return time_graph(lambda i: exponential_race(probabilities(logits, rule), rng), args.calls, runs=args.runs)
    return time_cuda(lambda: hf_choose(logits, rule), runs=args.runs)


def _match(logits: torch.Tensor, rule: SamplingParams) -> float:
    """The fraction of MATCH_DRAWS draws from one seed in which the kernel's token is PyTorch's."""
    kernel_rng, torch_rng = rule.rng(logits.device), rule.rng(logits.device)  # the same seed: rule is seeded
    same = 0
    for _ in range(MATCH_DRAWS):
        got = fused_decoder.sample_token(logits, kernel_rng, rule.temperature, rule.top_k, rule.top_p)
        same += int(got) == int(exponential_race(probabilities(logits, rule), torch_rng))
    return same / MATCH_DRAWS


def _rule_text(rule: SamplingParams) -> str:
    return f"T={rule.temperature:g} k={rule.top_k} p={rule.top_p:g}"


def run(args) -> int:
    require_cuda()
    if args.runs < 1 or args.calls < 1:
        raise InvalidInputError("--runs and --calls must be >= 1")
    rules = [dataclasses.replace(rule, seed=args.seed) for rule in args.rules or [parse_rule(t) for t in DEFAULT_RULES]]
    device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    skipped = {}
    copy = copy_bandwidth()
    rows = []
    with GpuMonitor() as monitor:
        for vocab, rule in itertools.product(args.vocabs, rules):
            logits = (torch.randn(vocab, generator=generator) * 3).to(device)  # [vocab]
            providers = list(args.providers)
            if "neoxfuse" in providers and not sampling.sample_kernel_runs(device, vocab):
                providers.remove("neoxfuse")
                skipped[f"neoxfuse at vocab {vocab}"] = ("the sampling kernel needs an sm_90+ GPU, the library built "
                                                         f"with it and a vocabulary of at most {fused_decoder.MAX_SAMPLE_VOCAB}")
            timings = {p: _measure(p, logits, rule, args) for p in providers}
            match = _match(logits, rule) if "neoxfuse" in timings else None
            own_us = timings["neoxfuse"].median_us if "neoxfuse" in timings else None
            for provider, timing in timings.items():
                rows.append({
                    "vocab": vocab, "rule": _rule_text(rule), "temperature": rule.temperature, "top_k": rule.top_k,
                    "top_p": rule.top_p, "provider": provider, "median_us": timing.median_us, "p90_us": timing.p90_us,
                    "p99_us": timing.p99_us, "speedup_of_neoxfuse": None if own_us is None else timing.median_us / own_us,
                    "match": match if provider == "neoxfuse" else None,
                })  # fmt: skip
    extra = {"calls": args.calls, "copy": copy.as_dict(), "skipped": skipped, "nvml": monitor.summary(),
             "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    record = device_record(copy)
    path = write_results(SUITE, rows, device=record, out_dir=args.out_dir, extra=extra)
    print(_table(rows, record, skipped))
    print(f"wrote {path}")
    return 0


def _table(rows: list[dict], device: dict, skipped: dict) -> str:
    lines = [f"sample: one sampled token from the logits on {device['name']}"]
    header = f"{'vocab':>6} {'rule':<22} {'provider':<12} {'median us':>10} {'p90 us':>8} {'p99 us':>8} {'x neoxfuse':>10} {'match':>6}"
    lines += [header, "-" * len(header)]
    for row in rows:
        speedup = "n/a" if row["speedup_of_neoxfuse"] is None else f"{row['speedup_of_neoxfuse']:.2f}"
        match = "" if row["match"] is None else f"{row['match']:.2f}"
        lines.append(f"{row['vocab']:>6} {row['rule']:<22} {row['provider']:<12} {row['median_us']:>10.2f} {row['p90_us']:>8.2f} "
                     f"{row['p99_us']:>8.2f} {speedup:>10} {match:>6}")
    lines.append("x neoxfuse: this provider's median / the kernel's (how much faster the kernel is); "
                 "match: the kernel's tokens equal PyTorch's")
    lines += [f"skipped {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)
