"""`neoxfuse bench ln-residual`: the fused residual add + LayerNorm kernels against their peers,
per shape, and their end-to-end effect on Hugging Face decoding.

Kernel rows. For each shape (tokens x hidden, dtype, variant) every provider computes one function,

    h = x + r_1 (+ r_2);  y_k = LayerNorm_k(h)   for one or two LayerNorms   (VARIANTS below)

  neoxfuse       the ln_residual kernel (neoxfuse.ops.ln_residual): one launch
  torch_eager    the same function unfused in PyTorch: an add per residual, F.layer_norm per LN
  torch_compile  that PyTorch function under torch.compile (inductor, default mode)
  flashinfer     flashinfer.norm.layernorm where it accepts the call: the plain `layernorm`
                 variant in bf16 (it takes bf16 input with fp32 weight and bias)

Each provider's calls are captured in one CUDA graph, one call per buffer set, the sets rotating
through more than twice the L2 cache (inputs, parameters and outputs all distinct), so no call
finds its data in L2 and no host launch cost is counted; a sample is one replay's time divided
by its calls (CUDA events), and --replays samples give the median and P50/P90/P95/P99.
    bytes   = element size x (rows x hidden x (1 + residuals + outputs) + 2 x LNs x hidden)
    GBps    = bytes / median time;   pct_copy = GBps / the copy rate measured in this run
    rel_err = ||y - ref|| / ||ref|| of the provider's first LayerNorm output (ref: fp64 oracle)

End-to-end (--e2e): a random-initialised Pythia-2.8B in fp16 decoding greedily with HF's
`generate`, plain and after neoxfuse.hf.fuse_layernorms: eager (dynamic cache) and, with
--e2e all, static cache + torch.compile(mode="reduce-overhead"), timed per step as
`neoxfuse bench decode` times them. Reported under `decode_tpot` in the results file.

The results file is rewritten after each shape with the rows measured so far ("complete": false
until the end-to-end part is done too), so a run stopped part-way keeps the shapes it finished.

The issue's targets (H100) are checked and printed: decode 1 x 2560 fp16 dual LN >= 2.5x
torch_eager and >= 1.2x torch_compile; prefill 16384 x 2560 >= 85% of the copy rate and not
slower than torch_compile. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from neoxfuse import hf
from neoxfuse.bench.common import (
    ResultsFile,
    bandwidth_fields,
    buffer_set_count,
    device_record,
    kernel_table,
    measure_shapes,
    providers_arg,
    time_graph,
)
from neoxfuse.bench.targets import target, target_lines
from neoxfuse.checks import require_cuda
from neoxfuse.device import copy_bandwidth, devices
from neoxfuse.errors import InvalidInputError
from neoxfuse.monitor import GpuMonitor
from neoxfuse.ops import ln_residual
from neoxfuse.reference import layer_norm
from neoxfuse.weights import random_model

SUITE = "ln-residual"
RESULTS_SUITE = "ln_residual"  # DESIGN.md §6
HELP = "fused residual add + LayerNorm kernels vs torch eager / torch.compile / FlashInfer, and HF decode TPOT"

EPS = 1e-5
PROVIDERS = ("neoxfuse", "torch_eager", "torch_compile", "flashinfer")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# variant: (residuals, LayerNorms, h written)
VARIANTS = {
    "layernorm": (0, 1, False),
    "dual_layernorm": (0, 2, False),
    "add_layernorm": (1, 1, True),  # sequential GPT-NeoX block
    "add_dual_layernorm": (2, 2, True),  # parallel GPT-NeoX block (Pythia)
    "final": (2, 1, False),  # the last layer's adds and the final LayerNorm
}

DECODE_TARGET = "1x2560:fp16:add_dual_layernorm"
PREFILL_TARGET = "16384x2560:fp16:add_dual_layernorm"
DEFAULT_SHAPES = (  # the targets' shapes first: a run stopped part-way keeps them
    DECODE_TARGET,
    PREFILL_TARGET,
    "1x2560:fp16:add_layernorm",
    "1x2560:fp16:final",
    "1x5120:fp16:add_dual_layernorm",
    "128x2560:fp16:add_dual_layernorm",
    "4096x2560:fp16:add_dual_layernorm",
    "16384x2560:fp16:layernorm",
    "16384x2560:bf16:add_dual_layernorm",
    "16384x2560:fp32:add_dual_layernorm",
    "16384x2561:fp16:add_dual_layernorm",
    "1x2560:bf16:layernorm",
    "16384x2560:bf16:layernorm",
)
MAX_SETS = 4096  # buffer sets per graph; tiny shapes may then fit in L2, which the row records


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    dtype: str
    variant: str

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'TOKENSxHIDDEN:DTYPE:VARIANT', e.g. '1x2560:fp16:add_dual_layernorm'."""
        try:
            size, dtype, variant = text.split(":")
            tokens, hidden = (int(n) for n in size.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is TOKENSxHIDDEN:DTYPE:VARIANT, got {text!r}") from None
        if dtype not in DTYPES or variant not in VARIANTS or tokens < 1 or not 1 <= hidden <= ln_residual.MAX_HIDDEN:
            raise argparse.ArgumentTypeError(
                f"{text!r}: tokens >= 1, 1 <= hidden <= {ln_residual.MAX_HIDDEN}, dtype one of {', '.join(DTYPES)}, "
                f"variant one of {', '.join(VARIANTS)}"
            )
        return cls(tokens, hidden, dtype, variant)

    def __str__(self) -> str:
        return f"{self.tokens}x{self.hidden}:{self.dtype}:{self.variant}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layout(self) -> tuple[int, int, bool]:
        return VARIANTS[self.variant]

    @property
    def bytes_moved(self) -> int:
        """What the function must read and write at least (module doc)."""
        residuals, norms, write_sum = self.layout
        per_row = 1 + residuals + norms + int(write_sum)
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return element * (self.tokens * self.hidden * per_row + 2 * norms * self.hidden)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", dest="shapes", action="append", type=Shape.parse, metavar="TxH:DTYPE:VARIANT",
                        help=f"a shape to measure, repeatable (default: {len(DEFAULT_SHAPES)} shapes, decode and prefill of "
                        f"Pythia-2.8B first); variants: {', '.join(VARIANTS)}")
    parser.add_argument("--providers", type=providers_arg(PROVIDERS), default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--replays", type=int, default=200, help="timed graph replays per provider and shape (default 200)")
    parser.add_argument("--e2e", choices=("none", "eager", "all"), default="all",
                        help="HF decode TPOT with and without fusion: none, eager only, or eager and torch.compile (default all)")
    parser.add_argument("--e2e-tokens", type=int, default=64, help="tokens generated per end-to-end run (default 64)")
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON results go (default bench/results)")


# ---------------------------------------------------------------------------------------------
# The function, per provider.

Call = Callable[[torch.Tensor, list, list, list], list]  # (x, residuals, weights, biases) -> [h?, y_1, y_2?]


def _neoxfuse_call(shape: Shape) -> Call:
    ops = {
        "layernorm": lambda x, rs, ws, bs: [ln_residual.layernorm(x, ws[0], bs[0], EPS)],
        "dual_layernorm": lambda x, rs, ws, bs: list(ln_residual.dual_layernorm(x, ws, bs, EPS)),
        "add_layernorm": lambda x, rs, ws, bs: list(ln_residual.add_layernorm(x, rs, ws[0], bs[0], EPS)),
        "add_dual_layernorm": lambda x, rs, ws, bs: list(ln_residual.add_dual_layernorm(x, rs, ws, bs, EPS)),
        "final": lambda x, rs, ws, bs: [ln_residual.layernorm(x, ws[0], bs[0], EPS, residuals=rs)],
    }
    return ops[shape.variant]


def _torch_call(shape: Shape) -> Call:
    write_sum = shape.layout[2]

    def unfused(x, residuals, weights, biases):
        h = x
        for residual in residuals:
            h = h + residual
        ys = [torch.nn.functional.layer_norm(h, (shape.hidden,), w, b, EPS) for w, b in zip(weights, biases)]
        return ([h] if write_sum else []) + ys

    return unfused


def _flashinfer_call(shape: Shape) -> Call | str:
    """FlashInfer's layernorm, or why it does not apply to this shape."""
    if shape.variant != "layernorm" or shape.dtype != "bf16":
        return "flashinfer.norm.layernorm computes a plain LayerNorm of bf16 input only"
    try:
        from flashinfer.norm import layernorm as flashinfer_layernorm
    except Exception as err:  # not installed, or its import fails on this machine
        return f"flashinfer does not import: {type(err).__name__}: {err}"
    return lambda x, rs, ws, bs: [flashinfer_layernorm(x, ws[0], bs[0], EPS)]


def _calls(shape: Shape, providers: list[str]) -> tuple[dict[str, Call], dict[str, str]]:
    """({provider: call}, {provider: why it does not run this shape})."""
    calls, skipped = {}, {}
    for provider in providers:
        if provider == "neoxfuse":
            calls[provider] = _neoxfuse_call(shape)
        elif provider == "torch_eager":
            calls[provider] = _torch_call(shape)
        elif provider == "torch_compile":
            # Every shape compiles the same code object; past Dynamo's recompile limit (8) it would
            # silently run eagerly, so each shape starts from an empty cache.
            torch._dynamo.reset()
            calls[provider] = torch.compile(_torch_call(shape), dynamic=False)
        else:
            found = _flashinfer_call(shape)
            if isinstance(found, str):
                skipped[provider] = found
            else:
                calls[provider] = found
    return calls, skipped


# ---------------------------------------------------------------------------------------------
# Buffers and timing.


@dataclass
class BufferSet:
    x: torch.Tensor  # [tokens, hidden]
    residuals: list[torch.Tensor]  # [tokens, hidden] each
    weights: list[torch.Tensor]  # [hidden] each
    biases: list[torch.Tensor]

    def params_for(self, provider: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if provider == "flashinfer":  # fp32 weight and bias
            return [w.float() for w in self.weights], [b.float() for b in self.biases]
        return self.weights, self.biases


def _buffer_sets(shape: Shape, count: int, generator: torch.Generator) -> list[BufferSet]:
    residuals, norms, _ = shape.layout

    def randn(*size, scale=1.0, shift=0.0):
        return (torch.randn(size, device="cuda", generator=generator) * scale + shift).to(shape.torch_dtype)

    return [
        BufferSet(
            x=randn(shape.tokens, shape.hidden, shift=1.0),
            residuals=[randn(shape.tokens, shape.hidden) for _ in range(residuals)],
            weights=[randn(shape.hidden, scale=0.1, shift=1.0) for _ in range(norms)],
            biases=[randn(shape.hidden, scale=0.1) for _ in range(norms)],
        )
        for _ in range(count)
    ]


def _relative_error(call: Call, provider: str, s: BufferSet, shape: Shape) -> float:
    """||y_1 - ref|| / ||ref|| for the provider's first LayerNorm output on buffer set s."""
    ws, bs = s.params_for(provider)
    with torch.no_grad():
        y = call(s.x, s.residuals, ws, bs)[int(shape.layout[2])].double()
    h = s.x.double()
    for residual in s.residuals:
        h = h + residual.double()
    ref = layer_norm(h, s.weights[0].double(), s.biases[0].double(), EPS)
    return ((y - ref).norm() / ref.norm()).item()


def _measure_shape(shape: Shape, providers: list[str], replays: int, copy_GBps: float, l2_bytes: int,
                   skipped: dict[str, dict[str, str]]) -> list[dict]:
    """One row per provider that runs at this shape: its calls timed over buffer sets beyond L2, its error against
    the fp64 oracle. skipped[str(shape)] = {provider: why it did not run} (empty when all did)."""
    generator = torch.Generator("cuda").manual_seed(0)
    calls, why_not = _calls(shape, providers)
    skipped[str(shape)] = why_not
    sets = _buffer_sets(shape, buffer_set_count(shape.bytes_moved, l2_bytes, MAX_SETS), generator)
    rows = []
    for provider, call in calls.items():
        try:
            params = [s.params_for(provider) for s in sets]  # (weights, biases) per buffer set
            timing = time_graph(lambda i: call(sets[i].x, sets[i].residuals, *params[i]), len(sets), runs=replays)
        except Exception as err:  # a peer that cannot run here (FlashInfer without its JIT toolchain, say)
            why_not[provider] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            continue
        rows.append({
            "tokens": shape.tokens,
            "hidden": shape.hidden,
            "dtype": shape.dtype,
            "variant": shape.variant,
            "provider": provider,
            **bandwidth_fields(timing, shape.bytes_moved, len(sets), copy_GBps, l2_bytes),
            "rel_err": _relative_error(call, provider, sets[0], shape),
        })
    del sets
    torch.cuda.empty_cache()
    return rows


def _shape_of(row: dict) -> str:
    return str(Shape(row["tokens"], row["hidden"], row["dtype"], row["variant"]))


# ---------------------------------------------------------------------------------------------
# End to end: HF decode TPOT, fused or not.


def _decode_tpot(e2e: str, tokens: int) -> list[dict]:
    """TPOT of HF generate on a random Pythia-2.8B fp16, with and without fuse_layernorms."""
    from neoxfuse.bench.decode import HFContender  # the decode suite's timing of HF generate

    model = random_model("pythia-2.8b", seed=0, dtype=torch.float16, attn_implementation="sdpa", device="cuda")
    model.generation_config.eos_token_id = None
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    modes = ["hf_eager"] + (["hf_compile"] if e2e == "all" else [])
    rows = []
    for mode in modes:
        runs, launches = {}, {}
        for fused in (False, True):
            (hf.fuse_layernorms if fused else hf.unfuse_layernorms)(model)
            torch._dynamo.reset()
            contender = HFContender(model, mode, compiled=mode == "hf_compile")
            contender.generate(prompt, tokens)  # warm up (compiles and captures for hf_compile)
            before = ln_residual.launch_count()
            runs[fused] = contender.generate(prompt, tokens)
            launches[fused] = ln_residual.launch_count() - before
        unfused_tpot = statistics.fmean(runs[False].decode_ms)
        for fused, run in runs.items():
            tpot = statistics.fmean(run.decode_ms)
            rows.append({
                "model": "pythia-2.8b (random-initialised)",
                "backend": mode + ("+ln_residual" if fused else ""),
                "generated": tokens,
                "tpot_ms": tpot,
                "speedup_vs_unfused": unfused_tpot / tpot,
                "match": run.tokens == runs[False].tokens,
                # launches through Python; replays of CUDA graphs (hf_compile) run the kernels uncounted
                "ln_residual_launches": launches[fused],
            })
    hf.unfuse_layernorms(model)
    return rows


# ---------------------------------------------------------------------------------------------


def _targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured ratio and whether it is met (None: not measured)."""

    def find(shape: str) -> dict | None:
        return next((r for r in rows if r["provider"] == "neoxfuse" and _shape_of(r) == shape), None)

    decode, prefill = find(DECODE_TARGET), find(PREFILL_TARGET)
    return [
        target("decode speedup vs torch_eager", DECODE_TARGET, decode and decode.get("speedup_vs_torch_eager"), 2.5),
        target("decode speedup vs torch_compile", DECODE_TARGET, decode and decode.get("speedup_vs_torch_compile"), 1.2),
        target("prefill % of copy bandwidth", PREFILL_TARGET, prefill and prefill["pct_copy"], 85.0),
        target("prefill speedup vs torch_compile", PREFILL_TARGET, prefill and prefill.get("speedup_vs_torch_compile"), 1.0),
    ]


def run(args) -> int:
    require_cuda()
    if args.replays < 1 or args.e2e_tokens < 2:
        raise InvalidInputError("--replays must be >= 1 and --e2e-tokens >= 2")
    shapes = args.shapes or [Shape.parse(text) for text in DEFAULT_SHAPES]
    copy = copy_bandwidth()
    l2_bytes = devices()[torch.cuda.current_device()].l2_cache_bytes
    device = device_record(copy)
    results = ResultsFile(RESULTS_SUITE, device, args.out_dir)
    extra = {
        "copy": copy.as_dict(),
        "l2_bytes": l2_bytes,
        "replays": args.replays,
        "decode_tpot": [],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    skipped: dict[str, dict[str, str]] = {}  # {shape: {provider: why not}}
    with GpuMonitor() as sampler:

        def save(rows: list[dict], complete: bool) -> None:
            extra.update(skipped={shape: why for shape, why in skipped.items() if why}, targets=_targets(rows),
                         nvml=sampler.summary())
            results.save(rows, extra, complete=complete)

        # saved after each shape, so a run stopped part-way (the end-to-end part is the longest) keeps its kernel rows
        rows = measure_shapes(SUITE, shapes, lambda shape: _measure_shape(shape, args.providers, args.replays, copy.GBps,
                                                                          l2_bytes, skipped),
                              _shape_of, lambda done: save(done, complete=False))
        if args.e2e != "none":
            extra["decode_tpot"] = _decode_tpot(args.e2e, args.e2e_tokens)
    save(rows, complete=True)
    print(_table(rows, extra, device))
    print(f"wrote {results.path}")
    return 0


def _table(rows: list[dict], extra: dict, device: dict) -> str:
    lines = [f"ln-residual on {device['name']}: copy rate {device['copy_GBps']:.0f} GB/s measured in this run; "
             f"times per call from CUDA-graph replays over buffers > 2x L2 ({extra['l2_bytes'] / 2**20:.0f} MiB)"]
    lines += kernel_table(rows, _shape_of)
    for shape, why in extra["skipped"].items():
        lines += [f"skipped {provider} for {shape}: {reason}" for provider, reason in why.items()]
    lines += target_lines("targets (issue 3, H100):", extra["targets"])
    if extra["decode_tpot"]:
        lines.append("HF decode, random Pythia-2.8B fp16:")
        for row in extra["decode_tpot"]:
            lines.append(f"  {row['backend']:<26} TPOT {row['tpot_ms']:.3f} ms  x{row['speedup_vs_unfused']:.3f} vs unfused  "
                         f"tokens match: {'yes' if row['match'] else 'no'}  launches counted: {row['ln_residual_launches']}")
    return "\n".join(lines)
