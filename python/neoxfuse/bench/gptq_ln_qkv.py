"""`neoxfuse bench gptq-ln-qkv`: the fused LayerNorm + GPTQ int4 QKV kernel against its peers.

For each shape (tokens x K x N, group size, ordered or act-order groups) every provider computes

    out = LayerNorm(x) @ W + bias,   W[k, n] = scales[g(k), n] * (q[k, n] - z[g(k), n])

  neoxfuse       the gptq_ln_qkv kernel (neoxfuse.ops.gptq_ln_qkv): one launch, int4 weights
  torch_fp16     F.layer_norm + F.linear (cuBLAS) on the same weights dequantized once to fp16:
                 what an unquantized fp16 model runs, 4x the weight bytes
  torch_dequant  F.layer_norm, then W unpacked and dequantized to fp16 in PyTorch every call, then
                 F.linear: a GPTQ layer without a kernel of its own
Every GPTQ kernel package (auto_gptq, gptqmodel, vllm) is listed under `skipped` with why it is not
run: not installed, or installed but not wired up here (their kernels take repacked exllama/marlin
weights and no-LayerNorm inputs).

Each provider's calls are captured in one CUDA graph, one call per buffer set, the sets (weights
and inputs, all distinct) rotating through more than twice the L2 cache, so no call finds its
weights in L2 and no launch cost from Python is counted. A sample is one replay's time divided by
its calls (CUDA events); --replays samples give the median and P50/P90/P95/P99.
    bytes    = what the fused kernel must read and write: qweight K N / 2, scales 2 G N, qzeros G N / 2,
               g_idx 4 K (act-order), x 2 T K, LayerNorm weight and bias 4 K, bias 2 N, out 2 T N
    GBps     = bytes / median time (the same bytes for every provider: the function's floor);
    pct_copy = GBps / the copy rate measured in this run
    rel_err  = ||out - ref|| / ||ref||, ref the fp32 oracle on the same int4 weights
The results file is rewritten after each shape ("complete": false until the last), so a run stopped
part-way keeps the shapes it finished.

Targets (issue 5, H100, 1 x 2560 x 7680, group 128): median <= 8 us, >= 2x torch_fp16, >= 60%
of the copy rate. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

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
from neoxfuse.ops.gptq_ln_qkv import MAX_TOKENS, gptq_ln_qkv_layer, reference
from neoxfuse.quant.gptq import GPTQLinear, QuantConfig, quantize_rtn, unpack_int4_cols

SUITE = "gptq-ln-qkv"
RESULTS_SUITE = "gptq_ln_qkv"  # DESIGN.md §6
HELP = "fused LayerNorm + GPTQ int4 QKV projection vs fp16 LayerNorm + cuBLAS and dequantize-then-matmul in torch"

EPS = 1e-5
PROVIDERS = ("neoxfuse", "torch_fp16", "torch_dequant")
GPTQ_PACKAGES = ("auto_gptq", "gptqmodel", "vllm")

TARGET = "1x2560x7680:g128"
DEFAULT_SHAPES = (
    TARGET,
    "1x2560x7680:g128:act",
    "1x2560x7680:g32",
    "1x2560x7680:g-1",
    "3x2560x7680:g128",
    "8x2560x7680:g128",
    "1x1024x3072:g128",
    "1x4096x12288:g128",
    "1x5120x15360:g128",
)
MAX_SETS = 256


@dataclass(frozen=True)
class Shape:
    tokens: int
    K: int
    N: int
    group_size: int
    act_order: bool

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'TxKxN:gGROUP[:act]', e.g. '1x2560x7680:g128' or '1x2560x7680:g-1:act'."""
        parts = text.split(":")
        try:
            tokens, K, N = (int(v) for v in parts[0].lower().split("x"))
            if len(parts) not in (2, 3) or not parts[1].startswith("g") or parts[2:] not in ([], ["act"]):
                raise ValueError
            group_size = int(parts[1][1:])
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is TxKxN:gGROUP[:act], e.g. {TARGET}; got {text!r}") from None
        groups_ok = group_size == -1 or (group_size > 0 and group_size % 8 == 0 and K % group_size == 0)
        if not (1 <= tokens <= MAX_TOKENS and K > 0 and K % 8 == 0 and N > 0 and N % 8 == 0 and groups_ok):
            raise argparse.ArgumentTypeError(
                f"{text!r}: tokens 1..{MAX_TOKENS}, K and N multiples of 8, group -1 or a multiple of 8 dividing K")
        return cls(tokens, K, N, group_size, len(parts) == 3)

    def __str__(self) -> str:
        return f"{self.tokens}x{self.K}x{self.N}:g{self.group_size}" + (":act" if self.act_order else "")

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.K // self.group_size

    @property
    def bytes_moved(self) -> int:
        """What the fused function must read and write (module doc)."""
        T, K, N, G = self.tokens, self.K, self.N, self.groups
        weights = K * N // 2 + 2 * G * N + G * N // 2 + (4 * K if self.act_order else 0) + 2 * N
        return weights + 2 * T * K + 4 * K + 2 * T * N


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", dest="shapes", action="append", type=Shape.parse, metavar="TxKxN:gGROUP[:act]",
                        help=f"a shape to measure, repeatable (default: {len(DEFAULT_SHAPES)} shapes, {TARGET} first)")
    parser.add_argument("--providers", type=providers_arg(PROVIDERS), default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--replays", type=int, default=200, help="timed graph replays per provider and shape (default 200)")
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON results go (default bench/results)")


def dequantize_fp16(layer: GPTQLinear) -> torch.Tensor:
    """W^T [N, K] fp16 in plain PyTorch ops (the torch_dequant peer, every call):
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=layer.qweight.device)  # [8]
    codes = (layer.qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    codes = codes.reshape(-1, layer.out_features)  # [K, N]
    g = layer.g_idx.long()
    zeros = unpack_int4_cols(layer.qzeros).to(torch.int32) + layer.zero_offset  # [G, N]
    return ((codes - zeros[g]).half() * layer.scales[g]).t()


@dataclass
class BufferSet:
    x: torch.Tensor  # [T, K] fp16
    ln_weight: torch.Tensor  # [K] fp16
    ln_bias: torch.Tensor  # [K] fp16
    layer: GPTQLinear
    weight_fp16: torch.Tensor | None  # [N, K]: the dequantized weight, for torch_fp16


def _buffer_sets(shape: Shape, count: int, with_fp16: bool, generator: torch.Generator) -> list[BufferSet]:
    config = QuantConfig(group_size=shape.group_size, sym=False, desc_act=shape.act_order)
    sets = []
    for _ in range(count):
        weight = torch.randn(shape.N, shape.K, device="cuda", generator=generator) * 0.02  # [N, K]
        bias = torch.randn(shape.N, device="cuda", generator=generator) * 0.02
        layer = quantize_rtn(weight, bias, config=config)
        del weight
        sets.append(BufferSet(
            x=(torch.randn(shape.tokens, shape.K, device="cuda", generator=generator) + 0.5).half(),
            ln_weight=(1 + 0.1 * torch.randn(shape.K, device="cuda", generator=generator)).half(),
            ln_bias=(0.1 * torch.randn(shape.K, device="cuda", generator=generator)).half(),
            layer=layer,
            weight_fp16=layer.dequantize(torch.float16).t().contiguous() if with_fp16 else None,
        ))
    return sets


Call = Callable[[BufferSet], torch.Tensor]


def _calls(providers: list[str]) -> dict[str, Call]:
    def layer_norm(s: BufferSet) -> torch.Tensor:
        return F.layer_norm(s.x, (s.x.shape[1],), s.ln_weight, s.ln_bias, EPS)

    calls = {
        "neoxfuse": lambda s: gptq_ln_qkv_layer(s.x, s.ln_weight, s.ln_bias, s.layer, EPS),
        "torch_fp16": lambda s: F.linear(layer_norm(s), s.weight_fp16, s.layer.bias),
        "torch_dequant": lambda s: F.linear(layer_norm(s), dequantize_fp16(s.layer), s.layer.bias),
    }
    return {name: calls[name] for name in providers}


def _gptq_packages() -> dict[str, str]:
    """Every GPTQ kernel package, each with why it is not measured."""
    return {
        name: "installed; its GPTQ kernels take repacked (exllama/marlin) weights and are not wired into this benchmark"
        if importlib.util.find_spec(name) is not None else "not installed"
        for name in GPTQ_PACKAGES
    }


def _measure_shape(shape: Shape, calls: dict[str, Call], with_fp16: bool, replays: int, copy_GBps: float,
                   l2_bytes: int) -> list[dict]:
    """One row per provider: its calls timed over buffer sets beyond L2, its error against the fp32 reference."""
    generator = torch.Generator("cuda").manual_seed(0)
    sets = _buffer_sets(shape, buffer_set_count(shape.bytes_moved, l2_bytes, MAX_SETS), with_fp16, generator)
    first = sets[0]
    ref = reference(first.x, first.ln_weight, first.ln_bias, first.layer, EPS)
    rows = []
    for provider, call in calls.items():
        timing = time_graph(lambda i: call(sets[i]), len(sets), runs=replays)
        with torch.no_grad():
            out = call(first).float()
        rows.append({
            "tokens": shape.tokens, "K": shape.K, "N": shape.N, "group_size": shape.group_size,
            "act_order": shape.act_order, "provider": provider,
            **bandwidth_fields(timing, shape.bytes_moved, len(sets), copy_GBps, l2_bytes),
            "rel_err": ((out - ref).norm() / ref.norm()).item(),
        })
    del sets, first, ref
    torch.cuda.empty_cache()
    return rows


def _shape_of(row: dict) -> str:
    return str(Shape(row["tokens"], row["K"], row["N"], row["group_size"], row["act_order"]))


def _targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured)."""
    row = next((r for r in rows if r["provider"] == "neoxfuse" and _shape_of(r) == TARGET), None)
    return [
        target("median us", TARGET, row and row["median_us"], 8.0, at_most=True),
        target("speedup vs torch_fp16", TARGET, row and row.get("speedup_vs_torch_fp16"), 2.0),
        target("% of copy bandwidth", TARGET, row and row["pct_copy"], 60.0),
    ]


def run(args) -> int:
    require_cuda()
    if args.replays < 1:
        raise InvalidInputError("--replays must be >= 1")
    shapes = args.shapes or [Shape.parse(text) for text in DEFAULT_SHAPES]
    copy = copy_bandwidth()
    l2_bytes = devices()[torch.cuda.current_device()].l2_cache_bytes
    device = device_record(copy)
    results = ResultsFile(RESULTS_SUITE, device, args.out_dir)
    extra = {
        "copy": copy.as_dict(),
        "l2_bytes": l2_bytes,
        "replays": args.replays,
        "skipped": _gptq_packages(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with GpuMonitor(device_index=torch.cuda.current_device()) as monitor:

        def save(rows: list[dict], complete: bool) -> None:
            extra.update(targets=_targets(rows), nvml=monitor.summary())
            results.save(rows, extra, complete=complete)

        calls, with_fp16 = _calls(args.providers), "torch_fp16" in args.providers
        rows = measure_shapes(SUITE, shapes, lambda shape: _measure_shape(shape, calls, with_fp16, args.replays, copy.GBps, l2_bytes),
                              _shape_of, lambda done: save(done, complete=False))
    save(rows, complete=True)
    print(_table(rows, extra, device))
    print(f"wrote {results.path}")
    return 0


def _table(rows: list[dict], extra: dict, device: dict) -> str:
    lines = [f"gptq-ln-qkv on {device['name']}: copy rate {device['copy_GBps']:.0f} GB/s measured in this run; "
             f"times per call from CUDA-graph replays over buffers > 2x L2 ({extra['l2_bytes'] / 2**20:.0f} MiB)"]
    lines += kernel_table(rows, _shape_of)
    lines += [f"not measured: {name}: {why}" for name, why in extra["skipped"].items()]
    lines += target_lines("targets (issue 5, H100):", extra["targets"])
    return "\n".join(lines)
