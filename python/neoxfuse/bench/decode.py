"""`neoxfuse bench decode`: time per output token (TPOT) of batch-1 decoding, per backend, against
the memory floor and against Hugging Face peers, over generated lengths.

Every contender generates L tokens (each length of --lengths) after the same random one-token
prompt, so the last decode step reads a KV cache of `context` = L positions. Greedily by default;
with --temperature > 0 (and --top-k, --top-p, --min-p, --typical-p, --epsilon-cutoff,
--eta-cutoff) every contender samples instead (the Engine
backends with neoxfuse.sampling, seeded by --seed; HF with its own sampler), which times what
choosing a token costs on top of the step (the fused backend draws inside its CUDA graph):

- each neoxfuse Engine backend that can run here (`fused` on a GPU; the `reference` oracle on a
  GPU only when --backends names it, since it adds minutes and measures nothing of interest);
- hf_eager: `model.generate` with HF's dynamic cache, no compilation;
- hf_compile: `model.generate` with a static cache and torch.compile(mode="reduce-overhead")
  (CUDA graphs), HF's own recipe for fast decoding; CUDA only.

A row's tpot_ms is the mean time of the run's L-1 decode steps (token 1 comes from the
prefill); every step is timed between CUDA events (neoxfuse.engine.StepClock; for HF recorded in
a logits processor), so the clock adds no host waits. Its floor is what those steps must read, at the copy rate this run
measured with neoxfuse.device.copy_bandwidth():

    floor_ms = mean over steps of (weight_bytes + keys_read * kv_bytes_per_token) / copy_GBps
             = (weight_bytes + (L + 2) / 2 * kv_bytes_per_token) / copy_GBps

(decode step i reads the i + 1 keys of positions 0..i). On a CPU there is no copy probe:
floor fields are null and the default model is the tiny shape. `match` says whether the run's
tokens equal the baseline's (hf_eager when it ran); `matched_tokens` how many agree before the
first difference (fp16 runs of different kernels may part at a near tie). Sampled runs draw from
different generators, so their rows have null `match` and `matched_tokens`; every row says how
it chose tokens in `sampling`, and their results file is suite `decode_sampled`. The file is
rewritten after each run with the rows measured so far, "complete" false until the last: a suite
stopped part-way (the pipeline's --budget, say) keeps what it measured.

Issue 4's targets (H100) are checked and printed for greedy fp16 runs of a Pythia-2.8B-shaped
model: the fused TPOT at most 1.15x its floor at every context <= 512 and 1.25x at 2048, and at
least 1.3x faster than hf_compile and 5x faster than hf_eager at every context measured.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from neoxfuse.bench.common import ResultsFile, device_record, percentile
from neoxfuse.bench.targets import target, target_lines
from neoxfuse.configs import MODEL_NAMES, pythia_config, shape_of
from neoxfuse.device import copy_bandwidth
from neoxfuse.engine import BACKENDS, DTYPES, Engine, StepClock, load_hf_model, resolve_device, resolve_dtype
from neoxfuse.errors import InvalidInputError, SequenceTooLongError
from neoxfuse.monitor import GpuMonitor
from neoxfuse.progress import progress_bar
from neoxfuse.sampling import LATER_FILTERS, SAMPLED_ONLY, SamplingParams

SUITE = "decode"
SAMPLED_SUITE = "decode_sampled"  # the results of sampled runs (--temperature > 0)
HELP = "TPOT of batch-1 decoding (greedy or sampled) per backend vs the memory floor and HF peers, over generated lengths"

GPU_MODEL, CPU_MODEL = "pythia-2.8b", "tiny"
GPU_LENGTHS, CPU_LENGTHS = (16, 64, 256, 1024, 2048), (16, 64)
HF_PEERS = ("hf_eager", "hf_compile")
BASELINE = "hf_eager"
WARMUP_TOKENS = 8
TARGET_MODEL = "pythia-2.8b"  # issue 4's targets are for greedy fp16 runs of this shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"a model name ({', '.join(MODEL_NAMES)}; random-initialised), an HF checkpoint "
                        f"directory or a Hub repo id in the local HF cache, GPTQ ones dequantized (default: {GPU_MODEL} on a GPU, {CPU_MODEL} on a CPU)")
    parser.add_argument("--lengths", type=_lengths, help="generated lengths, comma-separated "
                        f"(default: {','.join(map(str, GPU_LENGTHS))} on a GPU, {','.join(map(str, CPU_LENGTHS))} on a CPU)")
    parser.add_argument("--backends", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        help="contenders, comma-separated (default: every Engine backend and HF peer that can run here, "
                        "the reference oracle only on a CPU)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on a GPU, fp32 on a CPU")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: every contender samples")
    parser.add_argument("--top-k", type=int, default=0, help="sampled runs: keep the k most likely tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampled runs: keep the most likely tokens of mass top-p (default 1: all)")
    for flag, default, what in [("--min-p", 0.0, "min_p"), ("--typical-p", 1.0, "typical_p"), ("--epsilon-cutoff", 0.0, "epsilon_cutoff"),
                                ("--eta-cutoff", 0.0, "eta_cutoff")]:
        parser.add_argument(flag, type=float, default=default, help=f"sampled runs: transformers' {what} (default {default:g}: off)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random model, the prompt and the draws (default 0)")
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON results go (default bench/results)")


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers separated by commas, got {text!r}") from None
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError("each length must be >= 2 (a run of L tokens times L-1 decode steps)")
    return lengths


@dataclass
class Run:
    tokens: list[int]  # the generated tokens
    prefill_ms: float
    decode_ms: list[float]  # one per decode step


class EngineContender:
    """A neoxfuse Engine backend, timed by Engine.generate (tokens are chosen on the device, each
    step timed between CUDA events)."""

    warm_up_each_length = False

    def __init__(self, engine: Engine, name: str, sampling: SamplingParams):
        self.engine = engine
        self.name = name
        self.sampling = sampling

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        out = self.engine.generate(prompt, new_tokens, self.sampling)
        return Run(out.tokens, out.prefill_ms, out.decode_ms)


class StepMarker(transformers.LogitsProcessor):
    """A logits processor that marks the end of each forward pass of model.generate on a
    neoxfuse StepClock (CUDA events on a GPU: the host never waits)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clock: StepClock | None = None

    def start(self) -> None:
        self.clock = StepClock(self.device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.clock.mark()
        return scores


class HFContender:
    """`model.generate`: eager with a dynamic cache, or static cache + torch.compile; greedy, or
    sampled with HF's own warpers (temperature, top-k, top-p and the filters after them)."""

    def __init__(self, model, name: str, compiled: bool, sampling: SamplingParams):
        self.model = model
        self.name = name
        self.compiled = compiled
        self.sampling = sampling
        self.warm_up_each_length = compiled  # the static cache is sized per length: compiled and captured per length
        self.marker = StepMarker(model.device)

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)  # [1, P]
        if self.compiled:
            cache = {"cache_implementation": "static", "compile_config": transformers.CompileConfig(mode="reduce-overhead")}
        else:
            cache = {"disable_compile": True}
        if self.sampling.greedy:
            choice = {"do_sample": False}
        else:
            choice = {"do_sample": True, "temperature": self.sampling.temperature, "top_k": self.sampling.top_k,
                      "top_p": self.sampling.top_p, **self.sampling.filters_on(LATER_FILTERS)}
        config = transformers.GenerationConfig(max_new_tokens=new_tokens, **choice, **cache)
        self.marker.start()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            logits_processor=transformers.LogitsProcessorList([self.marker]),
        )
        intervals = self.marker.clock.intervals_ms()  # the prefill, then each decode step
        return Run(out[0, len(prompt) :].tolist(), intervals[0], intervals[1:])


def _hf_model(source: str, dtype: torch.dtype, device: torch.device, seed: int):
    """(GPTNeoXForCausalLM on `device` with SDPA attention, its description): engine.load_hf_model, a
    GPTQ checkpoint dequantized to `dtype` (the kernels and the HF peers run dense weights)."""
    model, description = load_hf_model(source, dtype=dtype, seed=seed, device=device)
    model.generation_config.eos_token_id = None  # every run generates exactly the tokens asked for
    return model, description


def _sampling(args) -> SamplingParams:
    """How every contender chooses tokens: greedy unless --temperature > 0 (InvalidInputError for bad values)."""
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed, **{name: getattr(args, name) for name in SAMPLED_ONLY})
    if sampling.greedy and sampling.filters_on():
        raise InvalidInputError("--top-k, --top-p, --min-p, --typical-p, --epsilon-cutoff and --eta-cutoff apply to sampled "
                                "runs: give --temperature > 0 too")
    return sampling


def _contenders(args, model, device, dtype, max_seq_len, sampling: SamplingParams) -> tuple[list, dict[str, str]]:
    """The contenders that run here, each choosing tokens by `sampling`, and {name: why not} for those that cannot."""
    shape = shape_of(model.config)
    known = [*sorted(BACKENDS), *HF_PEERS]
    wanted, skipped = args.backends or known, {}
    if not args.backends and device.type == "cuda":  # the oracle would only add minutes of GPU time
        wanted = [name for name in known if name != "reference"]
        skipped["reference"] = "the oracle, not a speed contender on a GPU: ask for it with --backends"
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise InvalidInputError(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    contenders = []
    for name in wanted:
        if name in BACKENDS:
            availability = BACKENDS[name].available(device, dtype, shape)
            if not availability:
                skipped[name] = availability.reason
                continue
            engine = Engine(model, backend=name, device=device, dtype=dtype, max_seq_len=max_seq_len)
            contenders.append(EngineContender(engine, name, sampling))
        elif name == "hf_compile" and device.type != "cuda":
            skipped[name] = "reduce-overhead mode replays CUDA graphs: needs a GPU"
        else:
            contenders.append(HFContender(model, name, compiled=name == "hf_compile", sampling=sampling))
    if not contenders:
        raise InvalidInputError("no contender can run here: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return contenders, skipped


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args) -> int:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    sampling = _sampling(args)  # bad values fail here, before a model is loaded
    model_name = args.model or (GPU_MODEL if on_gpu else CPU_MODEL)
    lengths = args.lengths or list(GPU_LENGTHS if on_gpu else CPU_LENGTHS)
    if not args.model and not on_gpu:
        print(f"neoxfuse: no GPU: benchmarking a random-initialised {CPU_MODEL} model on the CPU (lengths "
              f"{','.join(map(str, lengths))}) so the suite runs anywhere; there is no copy probe, so floor fields are null",
              file=sys.stderr)

    copy = copy_bandwidth() if on_gpu else None
    model, description = _hf_model(model_name, dtype, device, args.seed)
    shape = shape_of(model.config)
    max_seq_len = max(lengths)  # a one-token prompt and L new tokens fill L cache positions
    if max_seq_len > shape.max_positions:
        raise SequenceTooLongError(f"length {max_seq_len} needs {max_seq_len} KV cache positions; "
                                   f"{description} has {shape.max_positions}: choose shorter --lengths")
    contenders, skipped = _contenders(args, model, device, dtype, max_seq_len, sampling)
    prompt = torch.randint(0, shape.vocab, (1,), generator=torch.Generator().manual_seed(args.seed)).tolist()

    dtype_bytes = torch.finfo(dtype).bits // 8
    names = [contender.name for contender in contenders]
    floor = {"weight_bytes": shape.weight_bytes(dtype_bytes), "kv_bytes_per_token": shape.kv_bytes_per_token(dtype_bytes)}
    targets_apply = shape == shape_of(pythia_config(TARGET_MODEL)) and dtype == torch.float16 and sampling.greedy
    extra = {
        "model": description,
        "dtype": str(dtype).replace("torch.", ""),
        "lengths": lengths,
        "sampling": _sampling_record(sampling),
        "baseline": BASELINE if BASELINE in names else names[0],
        "skipped": skipped,
        "floor": floor,
        "copy": copy.as_dict() if copy else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    device_entry = device_record(copy)
    suite = SUITE if sampling.greedy else SAMPLED_SUITE  # the dashboard keeps the two apart
    monitor = GpuMonitor() if on_gpu else None
    results = ResultsFile(suite, device_entry, args.out_dir)

    def save(runs: dict[tuple[str, int], Run], complete: bool) -> tuple[list[dict], dict]:
        """Writes the rows of the runs done so far (the same file each time); returns them and the record's extra."""
        rows = _rows(runs, names, lengths, description, floor, copy.GBps if copy else None, sampling)
        record = extra | {
            "nvml": monitor.summary() if monitor else {"available": False, "reason": "a CPU run has no GPU to sample"},
            "targets": _targets(rows) if targets_apply else [],
        }
        results.save(rows, record, complete=complete)
        return rows, record

    with monitor or contextlib.nullcontext():
        runs = _measure(contenders, prompt, lengths, lambda done: save(done, complete=False))
    rows, record = save(runs, complete=True)
    print(_table(rows, description, record, device_entry))
    print(f"wrote {results.path}")
    return 0


def _measure(contenders: list, prompt: list[int], lengths: list[int],
             on_run: Callable[[dict[tuple[str, int], Run]], object]) -> dict[tuple[str, int], Run]:
    """{(contender, length): its timed run}, each after a warm-up (per length where shapes are compiled per length);
    on_run(the runs so far) after each."""
    runs = {}
    with progress_bar(len(contenders) * len(lengths), "bench decode", unit="run") as bar:
        for contender in contenders:
            for index, length in enumerate(lengths):
                bar.set_postfix_str(f"{contender.name} L={length}")
                if contender.warm_up_each_length:
                    contender.generate(prompt, length)
                elif index == 0:
                    contender.generate(prompt, min(WARMUP_TOKENS, length))
                runs[contender.name, length] = contender.generate(prompt, length)
                on_run(runs)
                bar.update(1)
    return runs


def _sampling_record(sampling: SamplingParams) -> str | dict:
    if sampling.greedy:
        return "greedy"
    return {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            **sampling.filters_on(LATER_FILTERS), "seed": sampling.seed}


def _rows(runs, names: list[str], lengths: list[int], description: str, floor: dict, copy_GBps: float | None,
          sampling: SamplingParams) -> list[dict]:
    """One results row per (length, contender) that has run: TPOT, its floor, the speedup over the best HF peer
    that has run at that length, the token match with the baseline (greedy runs; None before the baseline has run)."""
    baseline = BASELINE if BASELINE in names else names[0]
    rows = []
    for length in lengths:
        peer_tpots = [statistics.fmean(runs[name, length].decode_ms) for name in names
                      if name in HF_PEERS and (name, length) in runs]
        mean_keys = (length + 2) / 2  # decode steps 1..L-1 read 2..L keys
        floor_ms = None
        if copy_GBps is not None:
            floor_ms = (floor["weight_bytes"] + mean_keys * floor["kv_bytes_per_token"]) / (copy_GBps * 1e9) * 1e3
        for name in names:
            if (name, length) not in runs:
                continue
            result, expected = runs[name, length], runs.get((baseline, length))
            compared = sampling.greedy and expected is not None
            tpot = statistics.fmean(result.decode_ms)
            rows.append({
                "model": description,
                "backend": name,
                "context": length,
                "generated": length,
                "tpot_ms": tpot,
                "tpot_p50_ms": percentile(result.decode_ms, 50),
                "tpot_p90_ms": percentile(result.decode_ms, 90),
                "tpot_p99_ms": percentile(result.decode_ms, 99),
                "prefill_ms": result.prefill_ms,
                "floor_ms": floor_ms,
                "pct_of_floor": None if floor_ms is None else 100 * floor_ms / tpot,
                "speedup_vs_best_peer": min(peer_tpots) / tpot if peer_tpots else None,
                "sampling": _sampling_record(sampling),
                "match": result.tokens == expected.tokens if compared else None,
                "matched_tokens": _common_prefix(result.tokens, expected.tokens) if compared else None,
            })
    return rows


def _targets(rows: list[dict]) -> list[dict]:
    """Issue 4's targets on the fused rows, each with the worst value over the contexts it covers and whether
    it is met (None: not measured, e.g. no fused row, no floor, no such peer)."""
    fused = {row["context"]: row for row in rows if row["backend"] == "fused"}

    def worst(values: list[float | None], pick) -> float | None:
        measured = [value for value in values if value is not None]
        return pick(measured) if measured else None

    def floor_ratio(row: dict) -> float | None:
        return None if row["floor_ms"] is None else row["tpot_ms"] / row["floor_ms"]

    def speedup_over(peer: str) -> float | None:
        return worst([row["tpot_ms"] / fused[row["context"]]["tpot_ms"] for row in rows
                      if row["backend"] == peer and row["context"] in fused], min)

    at_2048 = fused.get(2048)
    return [
        target("TPOT / floor", "fused, context <= 512", worst([floor_ratio(r) for c, r in fused.items() if c <= 512], max),
               1.15, at_most=True),
        target("TPOT / floor", "fused, context 2048", at_2048 and floor_ratio(at_2048), 1.25, at_most=True),
        target("speedup vs hf_compile", "fused, every context", speedup_over("hf_compile"), 1.3),
        target("speedup vs hf_eager", "fused, every context", speedup_over("hf_eager"), 5.0),
    ]


def _table(rows: list[dict], description: str, extra: dict, device: dict) -> str:
    def number(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    floor = extra["floor"]
    choice = extra["sampling"] if extra["sampling"] == "greedy" else "sampled " + ", ".join(
        f"{key} {value}" for key, value in extra["sampling"].items())
    lines = [f"decode: {description}, {extra['dtype']} on {device['name']}, {choice}"]
    if device["copy_GBps"] is None:
        lines.append("floor: n/a (no copy probe on a CPU; floor fields are null)")
    else:
        lines.append(f"floor = ({floor['weight_bytes'] / 1e9:.2f} GB weights + keys read x {floor['kv_bytes_per_token'] / 1024:.0f} KiB KV) "
                     f"/ {device['copy_GBps']:.0f} GB/s copy rate measured in this run")
    header = f"{'context':>7}  {'backend':<12} {'TPOT ms':>9} {'p90 ms':>9} {'floor ms':>9} {'% floor':>8} {'vs best peer':>12}  match"
    lines += [header, "-" * len(header)]
    for row in rows:
        match = "n/a" if row["match"] is None else f"{'yes' if row['match'] else 'no'} ({row['matched_tokens']}/{row['generated']})"
        lines.append(
            f"{row['context']:>7}  {row['backend']:<12} {number(row['tpot_ms'], 3):>9} {number(row['tpot_p90_ms'], 3):>9} "
            f"{number(row['floor_ms'], 3):>9} {number(row['pct_of_floor'], 1):>8} {number(row['speedup_vs_best_peer']):>12}  {match}"
        )
    lines.append(f"match: tokens equal to {extra['baseline']}'s (greedy runs); vs best peer: fastest HF peer's TPOT / this TPOT")
    lines += [f"skipped {name}: {why}" for name, why in extra["skipped"].items()]
    if extra["targets"]:
        lines += target_lines("targets (issue 4, H100):", extra["targets"])
    else:
        lines.append(f"targets (issue 4): for greedy fp16 runs of a {TARGET_MODEL}-shaped model; not this run")
    return "\n".join(lines)
