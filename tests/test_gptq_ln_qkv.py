"""kernels/gptq_ln_qkv through neoxfuse.ops.gptq_ln_qkv: LayerNorm + GPTQ int4 dequant + QKV projection.

CPU: every bad input is a clear error (dtype and shape before device), the C launcher's own
checks, the fake implementation, the q/k/v view, and the fp32 oracle against HF's own fused
query_key_value (so the column order is HF's per-head order).
GPU: the kernel against the fp32 oracle (LayerNorm, then the dequantized weight) for every format
variant (group 32/64/128/per-channel, symmetric/asymmetric, v1/v2, act-order), every Pythia K/N
plus an odd N, tokens 1/3/8; outputs poisoned first; CUDA graphs, determinism, bad g_idx.
Emulated (`test_emulated_*`): the same kernel code on the CPU through the emulated library (tests/emulator,
the `emulated` fixture of conftest.py) against the same oracle and REL_TOL, on a grid sized for the
emulator: every format variant on K 2560 with 96 columns, with and without bias, smaller Pythia sizes,
the odd N and the largest K, Pythia-2.8B's full QKV for one token; the same bits whatever order a
block's threads run in; bad g_idx; the C launcher's own checks.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neoxfuse import _lib, bench
from neoxfuse.bench import gptq_ln_qkv as gptq_bench
from neoxfuse.errors import InvalidInputError, KernelError, NoGPUError, UnsupportedDeviceError
from neoxfuse.ops.gptq_ln_qkv import (
    _ARGTYPES,
    MAX_TOKENS,
    _check_arguments,
    gptq_ln_qkv,
    gptq_ln_qkv_layer,
    qkv_view,
    reference,
)
from neoxfuse.quant import (
    GPTQLinear,
    QuantConfig,
    act_order_g_idx,
    load_gptq_checkpoint,
    ordered_g_idx,
    pack_int4_cols,
    pack_int4_rows,
    quantize_gpt_neox,
    quantize_rtn,
    save_gptq_checkpoint,
)
from neoxfuse.quant import hf_gptq
from neoxfuse.quant.hf_gptq import GPTQLayerNormQKV, dequantized_gpt_neox, gptq_gpt_neox

EPS = 1e-5
# ||out - ref|| / ||ref|| against the fp32 oracle on the same int4 weights. The kernel rounds the
# LayerNorm output to fp16 (as HF's fp16 LayerNorm does: <= 2^-11 relative per element) and out to
# fp16; its fp32 sums add ~1e-6. Those two roundings, emulated in PyTorch over this file's shapes
# and inputs, give at most 4.6e-4 (random codes make columns with a non-zero mean, which cancel
# part of the signal). 2e-3 leaves a factor of 4; a wrong group, zero, nibble or column is O(1).
REL_TOL = 2e-3
# Run again under compute-sanitizer by the GPU pipeline (conftest.py): ordered and act-order
# paths, 1 and 8 tokens (8 takes the > 48 KB shared-memory path), the odd N's partial block.
SANITIZE = (
    "test_every_format_variant_on_pythia_2_8b_qkv[128-False-gptq-False-1]",
    "test_every_format_variant_on_pythia_2_8b_qkv[32-True-gptq_v2-True-8]",
    "test_every_pythia_size_and_an_odd_n[320-984-*-3]",
)

PYTHIA_KN = [(512, 1536), (768, 2304), (1024, 3072), (2048, 6144), (2560, 7680), (4096, 12288), (5120, 15360)]
ODD_KN = [(320, 984)]  # N = 3 * 328: the last block holds 24 of its 32 columns
TOKENS = [1, 3, 8]
GROUP_SIZES = [32, 64, 128, -1]
# The emulator runs every CUDA thread as a fiber, so its grid keeps most N small: 96 columns are 3
# blocks, and K 2560 gives each thread 10 packed rows (the 4-deep load ring refills twice).
EMULATED_N = 96
# (K, N, T): Pythia-70m's and the odd N's every token count, Pythia-2.8B's full QKV and the kernel's largest K
EMULATED_SIZES = [(K, N, T) for K, N in [(512, 1536), *ODD_KN] for T in TOKENS] + [(2560, 7680, 1), (8192, 96, 8)]


def random_layer(K, N, *, group_size=128, sym=False, checkpoint_format="gptq", act_order=False, bias=True, device="cpu",
                 seed=0):
    """A GPTQLinear of random int4 codes, fp16 scales, true zeros over all the format stores (v1 1..16,
    v2 0..15; 8 if sym), a random act-order g_idx if asked, and a bias unless bias=False."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else K // group_size
    offset = 1 if checkpoint_format == "gptq" else 0
    zeros = torch.full((groups, N), 8) if sym else torch.randint(offset, 16 + offset, (groups, N), generator=gen)
    g_idx = act_order_g_idx(torch.randperm(K, generator=gen), group_size) if act_order else ordered_g_idx(K, group_size)
    layer = GPTQLinear(
        qweight=pack_int4_rows(torch.randint(0, 16, (K, N), generator=gen)),
        qzeros=pack_int4_cols(zeros - offset),
        scales=(torch.rand(groups, N, generator=gen) * 0.02 + 0.005).half(),
        g_idx=g_idx,
        bias=(torch.randn(N, generator=gen) * 0.1).half() if bias else None,
        group_size=group_size,
        checkpoint_format=checkpoint_format,
    )
    return layer.to(device)


def random_inputs(T, K, device="cpu", seed=1, mean=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, K, generator=gen) * 2 + mean).half()
    ln_weight = (1 + 0.2 * torch.randn(K, generator=gen)).half()
    ln_bias = (0.1 * torch.randn(K, generator=gen)).half()
    return x.to(device), ln_weight.to(device), ln_bias.to(device)


def _raw_args(inputs, layer, **change):
    """gptq_ln_qkv's keyword arguments for inputs (x, ln_weight, ln_bias) and `layer`, with `change` applied."""
    x, ln_weight, ln_bias = inputs
    args = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, qweight=layer.qweight, qzeros=layer.qzeros, scales=layer.scales,
                g_idx=None if layer.ordered else layer.g_idx, bias=layer.bias, eps=EPS, group_size=layer.group_size,
                zero_offset=layer.zero_offset)
    args.update(change)
    return args


def _launcher_args(p, *, tokens=1, K=256, N=96, groups=2, group_size=128, zero_offset=1, eps=EPS, **offsets):
    """neoxfuse_gptq_ln_qkv's arguments for a valid call (K 256, N 96, 2 groups, no g_idx or bias) with
    every tensor at address p, changed as asked: a pointer named in `offsets` is p + that many bytes, or NULL."""
    offsets = dict(out=0, x=0, ln_weight=0, ln_bias=0, qweight=0, qzeros=0, scales=0, g_idx=None, bias=None) | offsets
    pointers = [None if o is None else p + o for o in offsets.values()]
    return (*pointers, tokens, K, N, groups, group_size, zero_offset, eps, None)


# The launcher's own checks: a change to _launcher_args' valid call, and the status it returns
# (kernels/common/status.h: 1 invalid argument, 2 misaligned, 3 unsupported).
LAUNCHER_ERRORS = [
    (dict(out=None), 1),
    (dict(tokens=0), 1),
    (dict(tokens=9), 3),
    (dict(K=252), 1),
    (dict(N=92), 1),
    (dict(K=8200, groups=1, group_size=8200), 3),
    (dict(group_size=96), 1),
    (dict(groups=3), 1),
    (dict(group_size=12, groups=1), 1),
    (dict(zero_offset=2), 1),
    (dict(eps=-1.0), 1),
    (dict(x=8), 2),
    (dict(g_idx=4), 2),
    (dict(groups=0, g_idx=0), 1),  # act-order with no group at all
]


# ---- CPU: argument checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=torch.zeros(9, 256, dtype=torch.float16)), "1..8 tokens"),
        (dict(x=torch.zeros(1, 256)), "x must be float16"),
        (dict(x=torch.zeros(256, dtype=torch.float16)), r"x must have shape \[\*, \*\]"),
        (dict(x=torch.zeros(1, 252, dtype=torch.float16)), "multiple of 8"),
        (dict(x=torch.zeros(1, 8192 + 8, dtype=torch.float16)), "beyond the kernel's limit"),
        (dict(ln_weight=torch.zeros(128, dtype=torch.float16)), r"ln_weight must have shape \[256\]"),
        (dict(ln_bias=torch.zeros(256)), "ln_bias must be float16"),
        (dict(qweight=torch.zeros(32, 96, dtype=torch.int64)), "qweight must be int32"),
        (dict(qweight=torch.zeros(16, 96, dtype=torch.int32)), r"qweight must have shape \[32, \*\]"),
        (dict(qweight=torch.zeros(32, 92, dtype=torch.int32)), "N=92"),
        (dict(scales=torch.zeros(2, 64, dtype=torch.float16)), r"scales must have shape \[\*, 96\]"),
        (dict(scales=torch.zeros(2, 96)), "scales must be float16"),
        (dict(qzeros=torch.zeros(2, 96, dtype=torch.int32)), r"qzeros must have shape \[2, 12\]"),
        (dict(group_size=96), "not divisible by group_size=96"),
        (dict(group_size=-1), "1 groups, got 2"),
        (dict(g_idx=torch.zeros(128, dtype=torch.int32)), r"g_idx must have shape \[256\]"),
        (dict(g_idx=torch.zeros(256, dtype=torch.int64)), "g_idx must be int32"),
        (dict(g_idx=torch.zeros(256, dtype=torch.int32), scales=torch.zeros(0, 96, dtype=torch.float16),
              qzeros=torch.zeros(0, 12, dtype=torch.int32)), "at least one group"),
        (dict(bias=torch.zeros(48, dtype=torch.float16)), r"bias must have shape \[96\]"),
        (dict(zero_offset=2), "zero_offset"),
        (dict(eps=float("nan")), "eps"),
    ],
)
def test_bad_arguments_are_clear_errors_before_any_device_check(change, message):
    layer = random_layer(256, 96, group_size=128)
    x, w, b = random_inputs(1, 256)
    with pytest.raises(InvalidInputError, match=message):
        gptq_ln_qkv(**_raw_args((x, w, b), layer, **change))


def test_cpu_tensors_are_refused():
    layer = random_layer(256, 96)
    x, w, b = random_inputs(2, 256)
    error = InvalidInputError if torch.cuda.is_available() else NoGPUError
    with pytest.raises(error):
        gptq_ln_qkv_layer(x, w, b, layer)


def test_fake_implementation_gives_the_output_shape():
    layer = random_layer(256, 96, act_order=True)
    x, w, b = random_inputs(3, 256)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = gptq_ln_qkv(**_raw_args((x, w, b), layer))
    assert list(out.shape) == [3, 96] and out.dtype == torch.float16
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(InvalidInputError, match="1..8 tokens"):
        gptq_ln_qkv(**_raw_args((torch.zeros(9, 256, dtype=torch.float16), w, b), layer))


def test_c_launcher_checks_its_own_arguments():
    fn = _lib.function("neoxfuse_gptq_ln_qkv", _ARGTYPES)
    p = 1 << 20  # an aligned fake address: every call below fails its checks before touching the device
    for change, status in LAUNCHER_ERRORS:
        assert fn(*_launcher_args(p, **change)) == status, change


def test_qkv_view_splits_hf_per_head_order():
    heads, head_dim, T = 4, 5, 2
    out = torch.arange(T * heads * 3 * head_dim, dtype=torch.float32).view(T, 3 * heads * head_dim)
    q, k, v = qkv_view(out, heads)
    per_head = out.view(T, heads, 3, head_dim)
    assert torch.equal(q, per_head[:, :, 0]) and torch.equal(k, per_head[:, :, 1]) and torch.equal(v, per_head[:, :, 2])
    assert qkv_view(out, heads).data_ptr() == out.data_ptr()
    with pytest.raises(InvalidInputError, match="3 \\* heads"):
        qkv_view(out, 7)


def test_reference_is_hf_layernorm_then_fused_qkv():
    """The oracle on a quantized weight equals HF's input_layernorm + query_key_value with the
    dequantized weight loaded: the kernel's output order is HF's."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=64)
    hf_layer = GPTNeoXForCausalLM(config).eval().gpt_neox.layers[0]
    qkv = hf_layer.attention.query_key_value
    layer = quantize_rtn(qkv.weight, qkv.bias, config=QuantConfig(group_size=32, sym=False))
    with torch.no_grad():
        qkv.weight.copy_(layer.dequantize().t())
        qkv.bias.copy_(layer.bias.float())
        hf_layer.input_layernorm.weight.copy_(hf_layer.input_layernorm.weight.half().float())
        hf_layer.input_layernorm.bias.copy_(torch.randn(64).half().float())
        x = torch.randn(3, 64).half()
        expected = qkv(hf_layer.input_layernorm(x.float()))
    ln = hf_layer.input_layernorm
    got = reference(x, ln.weight.half(), ln.bias.half(), layer, ln.eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- CPU: the benchmark's pieces -------------------------------------------------------------------------


def test_bench_suite_is_discovered_and_parses_shapes():
    found, _ = bench.suites()
    assert found["gptq-ln-qkv"] is gptq_bench
    shape = gptq_bench.Shape.parse("1x2560x7680:g128")
    assert (shape.tokens, shape.K, shape.N, shape.group_size, shape.act_order) == (1, 2560, 7680, 128, False)
    assert str(gptq_bench.Shape.parse("3x2560x7680:g-1:act")) == "3x2560x7680:g-1:act"
    # qweight + scales + qzeros + bias, x, LayerNorm weight and bias, out
    assert shape.bytes_moved == 2560 * 7680 // 2 + 2 * 20 * 7680 + 20 * 7680 // 2 + 2 * 7680 + 2 * 2560 + 4 * 2560 + 2 * 7680
    for bad in ["1x2560x7680", "9x2560x7680:g128", "1x2560x7680:g96", "1x2561x7680:g-1", "1x2560x7680:g128:x"]:
        with pytest.raises(Exception, match="shape|tokens"):
            gptq_bench.Shape.parse(bad)


@pytest.mark.parametrize("act_order", [False, True])
def test_bench_torch_dequant_peer_is_the_format(act_order):
    layer = random_layer(256, 48, group_size=64, act_order=act_order, checkpoint_format="gptq_v2")
    assert torch.equal(gptq_bench.dequantize_fp16(layer), layer.dequantize(torch.float16).t())


def test_bench_reports_every_gptq_package_as_skipped():
    skipped = gptq_bench._gptq_packages()
    assert set(skipped) == set(gptq_bench.GPTQ_PACKAGES) and all(skipped.values())


def test_bench_targets_read_the_target_row():
    row = dict(tokens=1, K=2560, N=7680, group_size=128, act_order=False, provider="neoxfuse", median_us=6.0,
               pct_copy=70.0, speedup_vs_torch_fp16=2.5)
    met = {t["target"]: t["met"] for t in gptq_bench._targets([row])}
    assert met == {"median us": True, "speedup vs torch_fp16": True, "% of copy bandwidth": True}
    slow = {t["target"]: t["met"] for t in gptq_bench._targets([dict(row, median_us=9.0, pct_copy=50.0)])}
    assert slow["median us"] is False and slow["% of copy bandwidth"] is False
    assert all(t["met"] is None for t in gptq_bench._targets([]))


def test_bench_table_gives_speedups_and_target_verdicts():
    from neoxfuse.bench.common import add_speedups

    def row(provider, median_us, act_order=False):
        return {"tokens": 1, "K": 2560, "N": 7680, "group_size": 128, "act_order": act_order, "provider": provider,
                "median_us": median_us, "p90_us": median_us, "p99_us": median_us, "GBps": 1.0, "pct_copy": 55.0,
                "rel_err": 1e-3, "beyond_l2": True}

    rows = [row("neoxfuse", 6.0), row("torch_fp16", 15.0), row("neoxfuse", 7.0, act_order=True), row("torch_fp16", 7.0, True)]
    add_speedups(rows, gptq_bench._shape_of)
    extra = {"l2_bytes": 50 * 2**20, "skipped": {"vllm": "not installed"}, "targets": gptq_bench._targets(rows)}
    lines = gptq_bench._table(rows, extra, {"name": "Test GPU", "copy_GBps": 3000.0}).splitlines()
    peers = {line.split()[0]: line.split()[-1] for line in lines if line.split()[1:2] == ["torch_fp16"]}
    assert peers == {"1x2560x7680:g128": "2.50", "1x2560x7680:g128:act": "1.00"}
    assert "not measured: vllm: not installed" in lines
    assert [line.rsplit(": ", 1)[1] for line in lines if line.startswith("  ")] == ["met", "met", "NOT met"]


def test_bench_stopped_between_shapes_keeps_the_shapes_it_finished(tmp_path, stand_in_kernel_suite):
    import json

    from neoxfuse.cli import main

    target, act = gptq_bench.Shape.parse(gptq_bench.TARGET), gptq_bench.Shape.parse("1x2560x7680:g128:act")

    def measure_shape(shape, calls, with_fp16, replays, copy_GBps, l2_bytes):
        if shape == act:
            raise KeyboardInterrupt  # as a pipeline's --budget or a user stops it
        assert list(calls) == ["neoxfuse", "torch_fp16"] and with_fp16
        return [{"tokens": shape.tokens, "K": shape.K, "N": shape.N, "group_size": shape.group_size,
                 "act_order": shape.act_order, "provider": provider, "median_us": median_us, "pct_copy": 70.0}
                for provider, median_us in (("neoxfuse", 6.0), ("torch_fp16", 15.0))]

    stand_in_kernel_suite(gptq_bench, measure_shape)
    args = ["bench", "gptq-ln-qkv", "--shape", str(target), "--shape", str(act), "--providers", "neoxfuse,torch_fp16"]
    assert main([*args, "--out-dir", str(tmp_path)]) == 130
    [path] = tmp_path.glob("gptq_ln_qkv-*.json")
    record = json.loads(path.read_text())
    assert record["complete"] is False
    assert [(row["provider"], row.get("speedup_vs_torch_fp16")) for row in record["rows"]] == [("neoxfuse", 2.5),
                                                                                               ("torch_fp16", None)]
    assert [t["met"] for t in record["targets"]] == [True, True, True]


# ---- GPU: against the fp32 oracle ---------------------------------------------------------------------------


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def run_poisoned(args: dict) -> torch.Tensor:
    """The op's output, with the allocator's block it is likely to reuse filled with NaN first,
    so an element the kernel does not write shows."""
    T, N = args["x"].shape[0], args["qweight"].shape[1]
    poison = torch.full((T, N), float("nan"), dtype=torch.float16, device="cuda")
    del poison
    out = gptq_ln_qkv(**args)
    torch.cuda.synchronize()
    return out


def run_emulated(emulated, args: dict) -> torch.Tensor:
    """The op's C ABI on the CPU through the emulated library (conftest.py), for the op's keyword
    arguments `args` on CPU tensors (checked as the op checks them, passed as guarded copies: an
    access past the end of one faults), into an output filled with NaN."""
    T, K, N, groups = _check_arguments(**args)
    out = emulated.guarded(torch.full((T, N), float("nan"), dtype=torch.float16))  # [T, N]
    names = ("x", "ln_weight", "ln_bias", "qweight", "qzeros", "scales", "g_idx", "bias")
    inputs = [None if args[name] is None else emulated.guarded(args[name]) for name in names]  # alive for the call
    pointers = [None if t is None else t.data_ptr() for t in inputs]
    group_size = K if args["group_size"] == -1 else args["group_size"]
    emulated.call("neoxfuse_gptq_ln_qkv", _ARGTYPES, out.data_ptr(), *pointers, T, K, N, groups, group_size,
                  args["zero_offset"], args["eps"], None)
    return out


def check_against_reference(T, K, N, emulated=None, mean=0.0, **layer_args):
    """A random layer and T tokens of mean `mean` through the kernel, on the GPU or, given `emulated`
    (conftest.py), on the CPU, against the fp32 oracle."""
    device = "cuda" if emulated is None else "cpu"
    layer = random_layer(K, N, device=device, **layer_args)
    x, w, b = random_inputs(T, K, device, seed=T, mean=mean)
    args = _raw_args((x, w, b), layer)
    out = run_poisoned(args) if emulated is None else run_emulated(emulated, args)
    assert out.shape == (T, N) and out.dtype == torch.float16
    assert bool(torch.isfinite(out).all()), "an output element is NaN/inf (unwritten or wrong)"
    ref = reference(x, w, b, layer, EPS)
    assert rel_error(out, ref) < REL_TOL, rel_error(out, ref)


def check_real_quantized_weights_and_no_bias(run, device):
    """Pythia-2.8B's QKV weight, RTN-quantized (act-order, asymmetric, group 128, no bias), one token:
    run(x, ln_weight, ln_bias, layer) against the oracle, and against the unquantized fp32 layer."""
    torch.manual_seed(2)
    weight = torch.randn(7680, 2560, device=device) * 0.02
    layer = quantize_rtn(weight, None, config=QuantConfig(group_size=128, sym=False, desc_act=True))
    x, w, b = random_inputs(1, 2560, device)
    out = run(x, w, b, layer)
    assert rel_error(out, reference(x, w, b, layer, EPS)) < REL_TOL
    # and the quantized layer is close to the fp32 one (4-bit RTN: ~0.1 relative)
    exact = F.layer_norm(x.float(), (2560,), w.float(), b.float(), EPS) @ weight.t()
    assert rel_error(out, exact) < 0.15


@pytest.mark.gpu
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_every_format_variant_on_pythia_2_8b_qkv(group_size, sym, checkpoint_format, act_order, T):
    check_against_reference(T, 2560, 7680, group_size=group_size, sym=sym, checkpoint_format=checkpoint_format, act_order=act_order)


@pytest.mark.gpu
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("K,N", PYTHIA_KN + ODD_KN)
def test_every_pythia_size_and_an_odd_n(K, N, act_order, T):
    check_against_reference(T, K, N, group_size=64 if K == 320 else 128, act_order=act_order, seed=K)


@pytest.mark.gpu
@pytest.mark.parametrize("T", range(1, MAX_TOKENS + 1))
def test_every_token_count_and_a_large_mean(T):
    layer = random_layer(768, 2304, device="cuda")
    x, w, b = random_inputs(T, 768, "cuda", seed=T, mean=30.0)  # |mean| >> std: two-pass statistics
    out = run_poisoned(_raw_args((x, w, b), layer))
    assert rel_error(out, reference(x, w, b, layer, EPS)) < REL_TOL


@pytest.mark.gpu
def test_a_gpu_without_code_in_the_library_is_refused_before_the_launch(monkeypatch):
    monkeypatch.setattr(_lib, "missing_code", lambda index: f"no code for cuda:{index}, as pretended")
    args = _raw_args(random_inputs(1, 768, "cuda"), random_layer(768, 2304, device="cuda"))
    with pytest.raises(UnsupportedDeviceError, match="as pretended"):
        gptq_ln_qkv(**args)


@pytest.mark.gpu
def test_real_quantized_weights_and_no_bias():
    check_real_quantized_weights_and_no_bias(gptq_ln_qkv_layer, "cuda")


@pytest.mark.gpu
@pytest.mark.quick
def test_deterministic_and_graph_capturable():
    layer = random_layer(2560, 7680, device="cuda", act_order=False)
    x, w, b = random_inputs(1, 2560, "cuda")
    first = gptq_ln_qkv_layer(x, w, b, layer)
    assert torch.equal(first, gptq_ln_qkv_layer(x, w, b, layer))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gptq_ln_qkv_layer(x, w, b, layer)
    x.copy_(random_inputs(1, 2560, "cuda", seed=9)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, gptq_ln_qkv_layer(x, w, b, layer))
    assert not torch.equal(captured, first)


@pytest.mark.gpu
def test_torch_compile_sees_the_op():
    layer = random_layer(512, 1536, device="cuda")
    x, w, b = random_inputs(2, 512, "cuda")
    compiled = torch.compile(lambda x: gptq_ln_qkv_layer(x, w, b, layer).float() * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), gptq_ln_qkv_layer(x, w, b, layer).float() * 2)


@pytest.mark.gpu
def test_out_of_range_g_idx_is_refused_by_the_layer_and_never_read_by_the_kernel():
    layer = random_layer(256, 96, device="cuda", act_order=True)
    bad = layer.g_idx.clone()
    bad[5] = 7  # only 2 groups
    with pytest.raises(InvalidInputError, match="g_idx must lie in 0..1"):
        GPTQLinear(layer.qweight, layer.qzeros, layer.scales, bad, layer.bias, layer.group_size, layer.checkpoint_format)
    x, w, b = random_inputs(1, 256, "cuda")
    out = gptq_ln_qkv(**_raw_args((x, w, b), layer, g_idx=bad))
    torch.cuda.synchronize()
    assert bool(torch.isnan(out).all()), "every column sums over row 5, whose group is out of range"


@pytest.mark.gpu
def test_device_layout_errors():
    layer = random_layer(256, 96, device="cuda")
    x, w, b = random_inputs(2, 256, "cuda")
    with pytest.raises(InvalidInputError, match="must be on a CUDA device"):
        gptq_ln_qkv_layer(x, w.cpu(), b, layer)
    with pytest.raises(InvalidInputError, match="contiguous"):
        gptq_ln_qkv_layer(torch.zeros(256, 2, dtype=torch.float16, device="cuda").t(), w, b, layer)
    with pytest.raises(InvalidInputError, match="16-byte boundary"):
        gptq_ln_qkv_layer(torch.zeros(2 * 256 + 1, dtype=torch.float16, device="cuda")[1:].view(2, 256), w, b, layer)


# ---- emulated: the kernel on the CPU (tests/emulator) against the fp32 oracle ----------------------------


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_emulated_every_format_variant_on_pythia_2_8b_k(emulated, group_size, sym, checkpoint_format, act_order, T):
    """K 2560 as Pythia-2.8B's QKV, EMULATED_N columns; 8 tokens take the > 48 KB shared-memory path."""
    check_against_reference(T, 2560, EMULATED_N, emulated, group_size=group_size, sym=sym,
                            checkpoint_format=checkpoint_format, act_order=act_order)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("act_order", [False, True])
def test_emulated_without_bias(emulated, act_order, T):
    check_against_reference(T, 2560, EMULATED_N, emulated, act_order=act_order, bias=False)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("K,N,T", EMULATED_SIZES)
def test_emulated_pythia_sizes_an_odd_n_and_the_largest_k(emulated, K, N, T, act_order):
    check_against_reference(T, K, N, emulated, group_size=64 if K == 320 else 128, act_order=act_order, seed=K)


@pytest.mark.parametrize("T", range(1, MAX_TOKENS + 1))
def test_emulated_every_token_count_and_a_large_mean(emulated, T):
    check_against_reference(T, 768, EMULATED_N, emulated, mean=30.0)  # |mean| >> std: two-pass statistics


def test_emulated_real_quantized_weights_and_no_bias(emulated):
    check_real_quantized_weights_and_no_bias(
        lambda x, w, b, layer: run_emulated(emulated, _raw_args((x, w, b), layer)), "cpu")


@pytest.mark.parametrize("T,K,N,act_order", [(1, 2560, 96, False), (8, 2560, 96, True), (3, 320, 984, False)])
def test_emulated_result_is_the_same_whatever_order_threads_run_in(emulated, T, K, N, act_order):
    # A read that no barrier orders after its write sees other data in the reverse order.
    layer = random_layer(K, N, group_size=64, act_order=act_order)
    args = _raw_args(random_inputs(T, K, seed=T), layer)
    forward = run_emulated(emulated, args)
    with emulated.reverse_schedule():
        reverse = run_emulated(emulated, args)
    assert bool(torch.isfinite(forward).all()) and torch.equal(reverse, forward)


@pytest.mark.parametrize("T,K,N,act_order", [(1, 2560, 7680, False), (8, 2560, 96, True), (3, 320, 984, False)])
def test_emulated_every_packed_weight_is_read_once(emulated, T, K, N, act_order):
    # The kernel's one streaming load is qweight's (read once per call): its bytes must add up to qweight's.
    layer = random_layer(K, N, group_size=64 if K == 320 else 128, act_order=act_order)
    emulated.take_streamed_bytes()
    run_emulated(emulated, _raw_args(random_inputs(T, K), layer))
    assert emulated.take_streamed_bytes() == layer.qweight.numel() * 4  # int32 [K/8, N]


def test_emulated_rtx_5090_runs_what_its_shared_memory_holds_and_refuses_the_rest(emulated):
    # sm_120 allows 99 KiB per block: 8 tokens of K 5120 (Pythia-12B) take 88 KiB, of K 8192 136 KiB.
    with emulated.device(emulated.RTX_5090):
        check_against_reference(8, 5120, EMULATED_N, emulated=emulated)
        with pytest.raises(KernelError, match="unsupported"):
            run_emulated(emulated, _raw_args(random_inputs(8, 8192), random_layer(8192, EMULATED_N)))


def test_emulated_out_of_range_g_idx_is_never_read(emulated):
    layer = random_layer(256, 96, act_order=True)
    bad = layer.g_idx.clone()
    bad[5], bad[77], bad[200] = 2, 7, -1  # only 2 groups: 2 is the first past the end
    out = run_emulated(emulated, _raw_args(random_inputs(1, 256), layer, g_idx=bad))
    assert bool(torch.isnan(out).all()), "every column sums over rows 5 and 200, whose groups are out of range"


def test_emulated_c_launcher_takes_the_unchanged_call(emulated):
    memory = torch.zeros(1 << 20, dtype=torch.uint8)  # every tensor of the call: zeros give out = 0
    emulated.call("neoxfuse_gptq_ln_qkv", _ARGTYPES, *_launcher_args(memory.data_ptr()))
    assert not memory.any()


@pytest.mark.parametrize("change,status", LAUNCHER_ERRORS)
def test_emulated_c_launcher_checks_its_own_arguments(emulated, change, status):
    memory = torch.zeros(1 << 20, dtype=torch.uint8)  # room for every size in LAUNCHER_ERRORS, were a check missing
    with pytest.raises(KernelError, match=_lib.STATUS_NAMES[status]) as error:
        emulated.call("neoxfuse_gptq_ln_qkv", _ARGTYPES, *_launcher_args(memory.data_ptr(), **change))
    assert error.value.status == status


# ---- integration: an HF GPT-NeoX with its attention input path on the kernel ------------------------------


def _gptq_checkpoint(tmp_path, *, hidden=64, heads=4, layers=2, parallel=True, quant=None):
    torch.manual_seed(3)
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, vocab_size=256, max_position_embeddings=128,
                           use_parallel_residual=parallel)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # LayerNorms away from the identity, so a skipped or doubled LN1 shows
        for block in model.gpt_neox.layers:
            block.input_layernorm.weight.normal_(1.0, 0.3)
            block.input_layernorm.bias.normal_(0.0, 0.3)
    quant = quant or QuantConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq")
    save_gptq_checkpoint(quantize_gpt_neox(model, quant), tmp_path)
    return load_gptq_checkpoint(tmp_path)


def _teacher_forced_logits(model, tokens, prefill):
    """Logits of a prefill of tokens[:prefill], then one decode step per remaining token (KV cache)."""
    with torch.no_grad():
        out = model(torch.tensor([tokens[:prefill]], device=model.device), use_cache=True)
        logits, cache = [out.logits[0].float()], out.past_key_values
        for token in tokens[prefill:]:
            out = model(torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0].float())
            cache = out.past_key_values
    return torch.cat(logits)


@pytest.mark.parametrize("parallel", [True, False])
def test_patched_hf_model_matches_the_dequantized_model_on_cpu(tmp_path, parallel):
    """On CPU the fused module runs the fp32 oracle: this checks the patch itself (LN1 moved into
    query_key_value, the column order HF's attention reads) against the unpatched model."""
    checkpoint = _gptq_checkpoint(tmp_path, parallel=parallel)
    patched = gptq_gpt_neox(checkpoint, device="cpu").float()
    for block in patched.gpt_neox.layers:
        assert isinstance(block.input_layernorm, torch.nn.Identity)
        assert isinstance(block.attention.query_key_value, GPTQLayerNormQKV)
    plain = dequantized_gpt_neox(checkpoint, "cpu", torch.float16).float()  # the same fp16-rounded dense/MLP weights
    tokens = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    got, want = _teacher_forced_logits(patched, tokens, 9), _teacher_forced_logits(plain, tokens, 9)
    # The plain model holds the dequantized QKV weight rounded to fp16 (2^-11 relative per weight),
    # the fused module the exact int4 values in fp32: ~1e-4 apart. A skipped or doubled LayerNorm,
    # or a wrong column order, is O(1).
    assert rel_error(got, want) < 1e-3


def test_checkpoint_names_as_the_ecosystem_writes_them(tmp_path):
    """Real GPT-NeoX checkpoints name the output embedding embed_out (transformers 5's module is
    lm_head) and older ones hold the causal-mask and rotary buffers: both load as HF's loader does."""
    checkpoint = _gptq_checkpoint(tmp_path, layers=1)
    assert "embed_out.weight" in checkpoint.tensors and "lm_head.weight" not in checkpoint.tensors
    checkpoint.tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
    checkpoint.tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    checkpoint.tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    model = dequantized_gpt_neox(checkpoint, "cpu", torch.float32)
    assert torch.equal(model.get_output_embeddings().weight, checkpoint.tensors["embed_out.weight"].float())
    gptq_gpt_neox(checkpoint, device="cpu")


def test_patch_needs_a_quantized_qkv(tmp_path):
    checkpoint = _gptq_checkpoint(tmp_path, layers=1)
    del checkpoint.linears["gpt_neox.layers.0.attention.query_key_value"]
    with pytest.raises(InvalidInputError, match="query_key_value is not GPTQ-quantized"):
        gptq_gpt_neox(checkpoint, device="cpu")


END_TO_END_QUANTS = [QuantConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq"),
                     QuantConfig(group_size=128, sym=True, checkpoint_format="gptq_v2")]


def _end_to_end_logits(checkpoint, device):
    """The checkpoint as the patched fp16 model and dequantized to fp16 for HF unpatched, teacher
    forced over an 11-token prefill and 5 decode steps: (patched logits, plain logits), fp32."""
    patched = gptq_gpt_neox(checkpoint, device=device)
    plain = dequantized_gpt_neox(checkpoint, device, torch.float16)
    tokens = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    return _teacher_forced_logits(patched, tokens, 11), _teacher_forced_logits(plain, tokens, 11)


def test_emulated_patched_hf_model_runs_the_kernel_end_to_end(tmp_path, monkeypatch, emulated):
    """The GPU test below on the CPU, two layers of its act-order checkpoint (the kernel's g_idx
    path; every format variant runs at kernel level above): the patched module hands its fp16
    tokens to the real kernel code on the emulator, 8 tokens per launch (the 11-token prefill:
    8 + 3, then one per step)."""
    launches = []

    def emulated_layer(x, ln_weight, ln_bias, layer, eps):
        launches.append(x.shape[0])
        return run_emulated(emulated, {
            "x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "qweight": layer.qweight, "qzeros": layer.qzeros,
            "scales": layer.scales, "g_idx": None if layer.ordered else layer.g_idx, "bias": layer.bias, "eps": eps,
            "group_size": layer.group_size, "zero_offset": layer.zero_offset,
        })  # fmt: skip

    monkeypatch.setattr(hf_gptq, "_kernel_takes", lambda x: x.dtype == torch.float16)
    monkeypatch.setattr(hf_gptq, "gptq_ln_qkv_layer", emulated_layer)
    checkpoint = _gptq_checkpoint(tmp_path, hidden=768, heads=12, layers=2, quant=END_TO_END_QUANTS[0])
    got, want = _end_to_end_logits(checkpoint, "cpu")
    assert launches == [8, 3] * 2 + [1] * 10  # per layer: the prefill in two launches, then 5 steps
    assert rel_error(got, want) < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("quant", END_TO_END_QUANTS)
def test_patched_hf_model_runs_the_kernel_end_to_end(tmp_path, quant):
    """The patched model on the GPU (LN1 + int4 QKV on the kernel) against HF unpatched."""
    got, want = _end_to_end_logits(_gptq_checkpoint(tmp_path, hidden=768, heads=12, layers=3, quant=quant), "cuda")
    # both are fp16 models differing only in how LN1 + QKV round (fp32 sums on int4 in the kernel,
    # fp16 LayerNorm output times fp16 weights in cuBLAS); 3 layers amplify that to ~1e-3.
    assert rel_error(got, want) < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
