"""`neoxfuse bench layer`: one GPT-NeoX decoder layer for one token, fused kernels against PyTorch.

    neoxfuse bench layer --layer N --seq-len L --runs R [--model pythia-2.8b | DIR] [--dtype fp16 | bf16]

Every provider computes layer N for one token at position L-1 (so it attends over L keys):

  fused            neoxfuse.ops.fused_decoder.decoder_layer: two cluster launches, with PDL
  fused_nopdl      the same without programmatic dependent launch
  torch_graph      the same math in PyTorch ops (cuBLAS GEMVs, SDPA) in --dtype, captured in a CUDA graph
  reference_eager  neoxfuse.reference.decoder_layer in --dtype, eager: the reference ops as they run

Weights and KV cache are --dtype (fp16 by default, or bf16) for every provider.

The fused and torch_graph calls are captured `--calls` at a time in one CUDA graph, chained as in
a model (each call's output is the next call's input) and rotating through copies of the layer
and its KV cache that together exceed twice the L2 cache, so no call finds its weights in L2
and no host launch cost is counted; a sample is one replay's time divided by its calls (CUDA
events). reference_eager is timed per call (its attention reads the position on the host).

    bytes    = the layer's weights and biases + L keys and values of this layer (2 bytes each)
    floor_us = bytes / the copy rate neoxfuse.device.copy_bandwidth() measured in this run
    rel_err  = ||(y - x) - (y_ref - x)|| / ||y_ref - x|| of one call against the fp32 oracle

A random-initialised layer of the model's shape unless --model is a checkpoint directory (then
its layer N). Needs a CUDA GPU with sm_90+ for the fused providers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F
import transformers

from neoxfuse import reference as ref
from neoxfuse.bench.common import Timing, device_record, providers_arg, time_cuda, time_graph, write_results
from neoxfuse.checks import require_cuda
from neoxfuse.configs import MODEL_NAMES, NeoXShape, pythia_config, shape_of
from neoxfuse.device import copy_bandwidth, devices
from neoxfuse.engine import DTYPES
from neoxfuse.errors import InvalidInputError
from neoxfuse.monitor import GpuMonitor
from neoxfuse.ops import fused_decoder
from neoxfuse.weights import LayerWeights, describe_checkpoint, load_checkpoint, model_source

SUITE = "layer"
HELP = "one decoder layer for one token: fused kernels vs PyTorch (CUDA graph) and the reference ops, vs the floor"
PROVIDERS = ("fused", "fused_nopdl", "torch_graph", "reference_eager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="pythia-2.8b",
                        help=f"a model name ({', '.join(MODEL_NAMES)}; random weights), an HF checkpoint directory or a Hub repo id in the local HF cache")
    parser.add_argument("--layer", type=int, default=0, help="which layer (default 0)")
    parser.add_argument("--seq-len", type=int, default=1024, help="keys attended over: the token sits at position L-1")
    parser.add_argument("--runs", type=int, default=100, help="timed samples per provider (default 100)")
    parser.add_argument("--calls", type=int, default=16, help="layer calls per CUDA graph replay (default 16)")
    parser.add_argument("--cluster-size", type=int, help="force the fused kernels' cluster size (1..8)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="weights and KV cache (default fp16)")
    parser.add_argument("--providers", type=providers_arg(PROVIDERS), default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON results go (default bench/results)")


def _load_layer(source: str, index: int, seed: int, dtype: torch.dtype) -> tuple[NeoXShape, LayerWeights, str]:
    """(shape, CUDA weights of layer `index` in `dtype`, description)."""
    resolved = model_source(source)
    if isinstance(resolved, str):
        shape = shape_of(pythia_config(resolved))
        _check_index(index, shape)
        return shape, _random_layer(shape, seed, dtype), f"{resolved} (random layer)"
    weights, _ = load_checkpoint(resolved)
    _check_index(index, weights.shape)
    return weights.shape, weights.layers[index].to(device="cuda", dtype=dtype), describe_checkpoint(source, resolved)


def _check_index(index: int, shape: NeoXShape) -> None:
    if not 0 <= index < shape.layers:
        raise InvalidInputError(f"--layer must be in 0..{shape.layers - 1}, got {index}")


def _random_layer(shape: NeoXShape, seed: int, dtype: torch.dtype) -> LayerWeights:
    """HF's initialisation (normal, std 0.02; LayerNorm 1 and 0; zero biases made small-random) in `dtype`."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h, f = shape.hidden, shape.ffn

    def normal(*size, std=0.02, mean=0.0):
        return (torch.randn(*size, generator=g, device="cuda") * std + mean).to(dtype)

    return LayerWeights(
        ln1_weight=normal(h, mean=1.0), ln1_bias=normal(h), ln2_weight=normal(h, mean=1.0), ln2_bias=normal(h),
        qkv_weight=normal(3 * h, h), qkv_bias=normal(3 * h), dense_weight=normal(h, h), dense_bias=normal(h),
        fc_in_weight=normal(f, h), fc_in_bias=normal(f), fc_out_weight=normal(h, f), fc_out_bias=normal(h),
    )  # fmt: skip


def _layer_bytes(layer: LayerWeights) -> int:
    return sum(getattr(layer, f.name).nbytes for f in dataclasses.fields(layer))


@dataclasses.dataclass
class Copy:
    """One copy of the layer and its cache [heads, L, head_dim] (the layer's dtype), positions 0..L-2 filled."""

    layer: LayerWeights
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def _copies(shape: NeoXShape, layer: LayerWeights, seq_len: int, l2_bytes: int, seed: int) -> list[Copy]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    cache_size = (shape.heads, seq_len, shape.head_dim)
    one = _layer_bytes(layer) + 2 * math.prod(cache_size) * 2
    copies = []
    for i in range(max(1, math.ceil(2 * l2_bytes / one))):
        weights = layer if i == 0 else dataclasses.replace(layer, **{f.name: getattr(layer, f.name).clone()
                                                                    for f in dataclasses.fields(layer)})
        k, v = (torch.randn(cache_size, generator=g, device="cuda").to(layer.qkv_weight.dtype) for _ in range(2))
        copies.append(Copy(weights, k, v))
    return copies


def torch_layer(x: torch.Tensor, layer: LayerWeights, shape: NeoXShape, k_cache, v_cache, position: int,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The layer in PyTorch ops with static shapes (capturable), in x's dtype: x [1, hidden] -> y [1, hidden].

    cos, sin [1, rotary_dims] from neoxfuse.reference.rotary_cos_sin at `position`.
    """
    h, eps = shape.hidden, shape.eps
    ln1 = F.layer_norm(x, (h,), layer.ln1_weight, layer.ln1_bias, eps)
    ln2 = F.layer_norm(x, (h,), layer.ln2_weight, layer.ln2_bias, eps)
    q, k, v = F.linear(ln1, layer.qkv_weight, layer.qkv_bias).view(1, shape.heads, 3, shape.head_dim).unbind(2)
    q = ref.apply_rotary(q, cos, sin, shape.rotary_dims)  # [1, heads, head_dim]
    k = ref.apply_rotary(k, cos, sin, shape.rotary_dims)
    k_cache[:, position] = k[0]
    v_cache[:, position] = v[0]
    keys, values = k_cache[:, : position + 1], v_cache[:, : position + 1]  # [heads, L, head_dim]
    attn = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values)  # [heads, 1, head_dim]
    attn = F.linear(attn.reshape(1, h), layer.dense_weight, layer.dense_bias)
    mlp = F.linear(F.gelu(F.linear(ln2, layer.fc_in_weight, layer.fc_in_bias)), layer.fc_out_weight, layer.fc_out_bias)
    return x + attn + mlp


def _measure(provider: str, shape: NeoXShape, copies: list[Copy], position: int, args) -> Timing:
    residual = [torch.randn(shape.hidden, device="cuda") for _ in range(2)]  # ping-pong, fp32
    if provider in ("fused", "fused_nopdl"):
        workspace = fused_decoder.Workspace.allocate(shape, "cuda")
        position_tensor = torch.tensor([position], dtype=torch.int32, device="cuda")

        def fused_step(i: int) -> None:
            c = copies[i % len(copies)]
            fused_decoder.decoder_layer(residual[i % 2], c.layer, shape, c.k_cache, c.v_cache, position_tensor,
                                        out=residual[(i + 1) % 2], workspace=workspace, cluster_size=args.cluster_size,
                                        pdl=provider == "fused")

        return time_graph(fused_step, args.calls, runs=args.runs)
    dtype = copies[0].layer.qkv_weight.dtype
    residual16 = [r.to(dtype)[None] for r in residual]  # [1, hidden]
    cos, sin = (t.to(dtype) for t in ref.rotary_cos_sin(torch.tensor([position], device="cuda"), shape.rotary_dims,
                                                      shape.rotary_base))  # [1, rotary_dims]
    if provider == "torch_graph":

        def torch_step(i: int) -> None:
            c = copies[i % len(copies)]
            residual16[(i + 1) % 2].copy_(torch_layer(residual16[i % 2], c.layer, shape, c.k_cache, c.v_cache, position,
                                                      cos, sin))

        return time_graph(torch_step, args.calls, runs=args.runs)
    calls = iter(range(10**9))

    def reference_step() -> None:
        i = next(calls)
        c = copies[i % len(copies)]
        ref.decoder_layer(residual16[i % 2], c.layer, shape, c.k_cache, c.v_cache, position)

    return time_cuda(reference_step, warmup=5, runs=args.runs)


def _fused_error(shape: NeoXShape, copy: Copy, position: int, cluster_size: int | None) -> float:
    """rel_err of y - x for one fused call against the fp32 oracle on the same weights and cache."""
    x = torch.randn(shape.hidden, device="cuda")
    k32, v32 = copy.k_cache.float(), copy.v_cache.float()
    want = ref.decoder_layer(x[None], copy.layer.to(dtype=torch.float32), shape, k32, v32, position)[0] - x
    got = fused_decoder.decoder_layer(x, copy.layer, shape, copy.k_cache, copy.v_cache, position,
                                      cluster_size=cluster_size) - x
    return float((got - want).norm() / want.norm())


def run(args) -> int:
    require_cuda()
    if args.runs < 1 or args.calls < 1:
        raise InvalidInputError("--runs and --calls must be >= 1")
    dtype = DTYPES[args.dtype]
    shape, layer, description = _load_layer(args.model, args.layer, args.seed, dtype)
    if not 1 <= args.seq_len <= shape.max_positions:
        raise InvalidInputError(f"--seq-len must be in 1..{shape.max_positions}, got {args.seq_len}")
    position = args.seq_len - 1
    copy = copy_bandwidth()
    l2_bytes = devices()[torch.cuda.current_device()].l2_cache_bytes
    copies = _copies(shape, layer, args.seq_len, l2_bytes, args.seed)
    moved = _layer_bytes(layer) + args.seq_len * 2 * shape.hidden * 2  # weights + this layer's keys and values
    floor_us = moved / (copy.GBps * 1e9) * 1e6

    fused_ok = fused_decoder.unsupported_reason(shape)
    plan = None if fused_ok is not None else fused_decoder.plan(shape, cluster_size=args.cluster_size, dtype=dtype)
    skipped, timings = {}, {}
    with GpuMonitor() as monitor:
        for provider in args.providers:
            if provider.startswith("fused") and fused_ok is not None:
                skipped[provider] = fused_ok
                continue
            timings[provider] = _measure(provider, shape, copies, position, args)
    rel_err = _fused_error(shape, copies[0], position, args.cluster_size) if plan else None

    fused_us = timings["fused"].median_us if "fused" in timings else None
    rows = []
    for provider, timing in timings.items():
        rows.append({
            "model": description, "layer": args.layer, "seq_len": args.seq_len, "dtype": args.dtype, "provider": provider,
            "median_us": timing.median_us, "p90_us": timing.p90_us, "p99_us": timing.p99_us, "floor_us": floor_us,
            "pct_of_floor": 100 * floor_us / timing.median_us, "GBps": moved / timing.median_us / 1e3,
            "speedup_of_fused": None if fused_us is None else timing.median_us / fused_us,
            "rel_err": rel_err if provider.startswith("fused") else None,
        })  # fmt: skip
    extra = {
        "bytes": moved, "copy": copy.as_dict(), "l2_bytes": l2_bytes, "copies": len(copies), "calls": args.calls,
        "plan": dataclasses.asdict(plan) if plan else None, "skipped": skipped, "nvml": monitor.summary(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }  # fmt: skip
    device = device_record(copy)
    path = write_results(SUITE, rows, device=device, out_dir=args.out_dir, extra=extra)
    print(_table(rows, extra, device, description))
    print(f"wrote {path}")
    return 0


def _grid_text(grid: dict) -> str:
    return f"{grid['clusters']} clusters x {grid['cluster_size']} blocks"


def _table(rows: list[dict], extra: dict, device: dict, description: str) -> str:
    plan = extra["plan"]
    lines = [
        f"layer: {description}, layer {rows[0]['layer'] if rows else '?'}, seq_len {rows[0]['seq_len'] if rows else '?'}, "
        f"{rows[0]['dtype'] if rows else '?'} on {device['name']}",
        f"floor = {extra['bytes'] / 1e6:.1f} MB / {device['copy_GBps']:.0f} GB/s copy rate measured in this run"
        + (f"; fused plan: {_grid_text(plan['attn_mlp_in'])} (attn_mlp_in), {_grid_text(plan['out_proj'])} (out_proj)"
           if plan else ""),
    ]
    header = f"{'provider':<16} {'median us':>10} {'p90 us':>8} {'p99 us':>8} {'floor us':>9} {'% floor':>8} {'GB/s':>7} {'x fused':>8} {'rel err':>9}"
    lines += [header, "-" * len(header)]
    for row in rows:
        speedup = "n/a" if row["speedup_of_fused"] is None else f"{row['speedup_of_fused']:.2f}"
        err = "" if row["rel_err"] is None else f"{row['rel_err']:.2e}"
        lines.append(f"{row['provider']:<16} {row['median_us']:>10.2f} {row['p90_us']:>8.2f} {row['p99_us']:>8.2f} "
                     f"{row['floor_us']:>9.2f} {row['pct_of_floor']:>8.1f} {row['GBps']:>7.0f} {speedup:>8} {err:>9}")
    lines.append("x fused: this provider's median / fused's median (how much faster fused is)")
    lines += [f"skipped {name}: {why}" for name, why in extra["skipped"].items()]
    return "\n".join(lines)
