"""The fused decoder (kernels/fused_decoder, neoxfuse.ops.fused_decoder) and the `fused` backend.

Oracle: neoxfuse.reference in fp32 on the same fp16 (or bf16) weights and the same cache contents.
Relative errors are ||out - ref|| / ||ref||; the tolerances, and why:

- MLP_TOL 1e-4 (GELU(fc_in) scratch): fp32 on both sides; only the summation order differs
  (~1e-6 for rows of 2560..4096 products).
- ATTN_TOL 2e-3 for fp16, 1.6e-2 for bf16 (attention output, y - x): the kernel rounds the current
  token's k and v to the cache's dtype before attending over them, the oracle keeps them fp32: one
  rounding of one attended row, at most 2^-11 = 4.9e-4 relative in fp16 and 2^-8 = 3.9e-3 in bf16
  (8 significant bits against 11); 4x margin. Nothing else is rounded.
- CACHE_TOL 1e-3 for fp16, 8e-3 for bf16 (the k, v written at position p): the rounding of the
  oracle's fp32 k, v, at most 2^-12 and 2^-9 relative; and each entry must be the nearest one.
- The layer is compared on y - x (what the layer adds), not y, so a small x cannot hide an error
  in attention or MLP, and weights are scaled so that both terms are O(1) and softmax is peaked.

The `test_emulated_*` tests run the same kernel code on the CPU through the emulated library
(tests/emulator, the `emulated` fixture of conftest.py) against the same oracle and tolerances:
the kernels' indexing, barriers and cluster reductions are checked on machines without a GPU.
"""

import copy
import ctypes
import dataclasses
import functools
import math
import re
import subprocess

import pytest
import torch

import neoxfuse.fused
import neoxfuse.hf

from neoxfuse import _lib
from neoxfuse import reference as ref
from neoxfuse.configs import NeoXShape, pythia_config, shape_of
from neoxfuse.engine import Engine, StepClock
from neoxfuse.errors import InvalidInputError, KernelError, NoGPUError, SequenceTooLongError, UnsupportedModelError
from neoxfuse.fused import FusedBackend
from neoxfuse.ops import fused_decoder as fd
from neoxfuse.sampling import SamplingParams, exponential_race, next_token, probabilities
from neoxfuse.scoring import hf_scores, logprobs_of
from neoxfuse.weights import LayerWeights, from_hf, random_model

MLP_TOL = 1e-4
ATTN_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CACHE_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
LOGITS_TOL = 1e-4  # lm_head: fp32 LayerNorm and dot products on both sides
# A bf16 model's decode logits against fp32 on the same weights: the prefill runs in bf16 (PyTorch
# ops) and the cache is bf16, 8 significant bits against fp16's 11, so 8x fp16's 1e-2.
BF16_LOGITS_TOL = 8e-2
# Run again under compute-sanitizer by the GPU pipeline (conftest.py): clusters of 1, 3 and 4
# blocks (uneven slices at 3) for every head size, bf16 at 3, a full Pythia-2.8B layer, a position
# past the cache, the LM head (fp16 and bf16) with a vocabulary that is not a multiple of anything.
SANITIZE = (
    *(f"test_every_cluster_size_matches_fp32_oracle[d80-h8-299-{c}]" for c in (1, 3, 4)),
    *(f"test_every_cluster_size_matches_fp32_oracle[d128-h3-76-{c}]" for c in (1, 3, 4)),
    *(f"test_every_cluster_size_matches_fp32_oracle[d64-h5-130-{c}]" for c in (1, 3)),
    *(f"test_every_cluster_size_matches_fp32_oracle[d256-h3-149-{c}]" for c in (1, 3)),
    *(f"test_every_cluster_size_matches_fp32_oracle[d96-h6-96-{c}]" for c in (1, 3)),
    "test_pythia_layer_matches_fp32_oracle[pythia-2.8b-127]",
    "test_device_position_past_the_cache_gives_nan_and_writes_nothing",
    "test_bf16_layer_matches_fp32_oracle[d80-h8-299-3]",
    "test_lm_head_matches_fp32_oracle[640-7-*]",
)

KERNELS = (  # mangled names: each layer kernel for __half and for __nv_bfloat16
    *(f"attn_mlp_in_kernelILi{d}E{t}" for d in fd.SUPPORTED_HEAD_DIMS for t in ("6__half", "13__nv_bfloat16")),
    *(f"{k}I{t}" for k in ("out_proj_kernel", "lm_head_kernel") for t in ("6__half", "13__nv_bfloat16")),
    "sample_token_kernel",
)
FULL_SIZE_LAYERS = {  # one full-size layer of each head_dim the kernels are built for
    "pythia-410m": NeoXShape(hidden=1024, layers=1, heads=16, head_dim=64, rotary_dims=16, ffn=4096, vocab=50304,
                             max_positions=2048),
    "pythia-1b": NeoXShape(hidden=2048, layers=1, heads=8, head_dim=256, rotary_dims=64, ffn=8192, vocab=50304,
                           max_positions=2048),
    "pythia-2.8b": NeoXShape(hidden=2560, layers=1, heads=32, head_dim=80, rotary_dims=20, ffn=10240, vocab=50304,
                             max_positions=2048),
    "pythia-6.9b": NeoXShape(hidden=4096, layers=1, heads=32, head_dim=128, rotary_dims=32, ffn=16384, vocab=50432,
                             max_positions=2048),
    "gpt-neox-20b": NeoXShape(hidden=6144, layers=1, heads=64, head_dim=96, rotary_dims=24, ffn=24576, vocab=50432,
                              max_positions=2048),
}  # fmt: skip
GPT_NEOX_20B = pythia_config("pythia-2.8b", hidden_size=6144, num_attention_heads=64, intermediate_size=24576,
                             num_hidden_layers=44, vocab_size=50432, rotary_pct=0.25)  # EleutherAI/gpt-neox-20b's sizes
BF16_CASES = [("d80-h8", 299), ("d128-h3", 76), ("d64-h5", 130), ("d256-h3", 149), ("d96-h6", 96)]  # at clusters of 1, 3, 8
CLUSTER_CASES = [("d80-h8", 0), ("d80-h8", 5), ("d80-h8", 299), ("d128-h3", 3), ("d128-h3", 76), ("d64-h5", 130),
                 ("d256-h3", 0), ("d256-h3", 149), ("d96-h6", 96)]  # (ODD_LAYERS name, position) run at every cluster size
ODD_LAYERS = {  # small and awkward: few heads, ffn not a multiple of 64, caches of odd length
    "d80-h8": NeoXShape(hidden=640, layers=1, heads=8, head_dim=80, rotary_dims=20, ffn=1000, vocab=1001, max_positions=300),
    "d128-h3": NeoXShape(hidden=384, layers=1, heads=3, head_dim=128, rotary_dims=32, ffn=1368, vocab=997, max_positions=77),
    "d64-h5": NeoXShape(hidden=320, layers=1, heads=5, head_dim=64, rotary_dims=16, ffn=1288, vocab=1003, max_positions=131),
    "d256-h3": NeoXShape(hidden=768, layers=1, heads=3, head_dim=256, rotary_dims=64, ffn=2056, vocab=1009, max_positions=150),
    "d96-h6": NeoXShape(hidden=576, layers=1, heads=6, head_dim=96, rotary_dims=24, ffn=2312, vocab=1013, max_positions=97),
}


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.double() - want.double()).norm() / want.double().norm())


def _random_layer(shape: NeoXShape, seed: int, device="cuda", dtype=torch.float16) -> LayerWeights:
    """Weights of `dtype` scaled so every projection's outputs are O(1) (scores O(2): a peaked softmax)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, f = shape.hidden, shape.ffn

    def normal(*size, std=1.0, mean=0.0):
        return (torch.randn(*size, generator=g) * std + mean).to(device=device, dtype=dtype)

    return LayerWeights(
        ln1_weight=normal(h, std=0.1, mean=1.0), ln1_bias=normal(h, std=0.1),
        ln2_weight=normal(h, std=0.1, mean=1.0), ln2_bias=normal(h, std=0.1),
        qkv_weight=normal(3 * h, h, std=1.5 / math.sqrt(h)), qkv_bias=normal(3 * h, std=0.1),
        dense_weight=normal(h, h, std=1 / math.sqrt(h)), dense_bias=normal(h, std=0.1),
        fc_in_weight=normal(f, h, std=1 / math.sqrt(h)), fc_in_bias=normal(f, std=0.1),
        fc_out_weight=normal(h, f, std=1 / math.sqrt(f)), fc_out_bias=normal(h, std=0.1),
    )  # fmt: skip


def _layer_inputs(shape: NeoXShape, position: int, seed: int, device="cuda", dtype=torch.float16):
    """x [hidden] (fp32, off-centre), and caches [heads, max_seq, head_dim] of `dtype` holding random
    rows before `position` and NaN from `position` on: the slot at `position` must be written by the
    kernel, and a read past it would poison the output."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape.hidden, generator=g) * 2 + 0.5).to(device)
    caches = []
    for _ in range(2):
        cache = torch.randn(shape.heads, shape.max_positions, shape.head_dim, generator=g).to(dtype)
        cache[:, position:] = float("nan")
        caches.append(cache.to(device))
    return x, caches[0], caches[1]


def _oracle(x, layer, shape, k_cache, v_cache, position):
    """The fp32 oracle: y, the attention output (before dense), GELU(fc_in), and k, v at position."""
    layer32 = layer.to(dtype=torch.float32)
    k32, v32 = k_cache.float(), v_cache.float()
    y = ref.decoder_layer(x[None], layer32, shape, k32, v32, position)[0]  # writes k32, v32 at position
    qkv = ref.layer_norm(x, layer32.ln1_weight, layer32.ln1_bias, shape.eps) @ layer32.qkv_weight.T + layer32.qkv_bias
    q = qkv.view(shape.heads, 3, shape.head_dim)[:, 0]  # [heads, head_dim]
    cos, sin = ref.rotary_cos_sin(torch.tensor([position], device=x.device), shape.rotary_dims, shape.rotary_base)
    q = ref.apply_rotary(q[None], cos, sin, shape.rotary_dims)[0]
    attn = ref.attention(q[:, None], k32, v32, position)  # [heads, 1, head_dim]
    mlp = ref.gelu(ref.layer_norm(x, layer32.ln2_weight, layer32.ln2_bias, shape.eps) @ layer32.fc_in_weight.T
                   + layer32.fc_in_bias)
    return {"y": y, "attn": attn.reshape(-1), "mlp": mlp, "k": k32[:, position], "v": v32[:, position]}


def _run_layer(x, layer, shape, k_cache, v_cache, position, **kwargs):
    """The kernel's y and scratch, every output poisoned with NaN first."""
    workspace = fd.Workspace.allocate(shape, "cuda")
    for t in (workspace.attn, workspace.mlp):
        t.fill_(float("nan"))
    y = torch.full_like(x, float("nan"))
    fd.decoder_layer(x, layer, shape, k_cache, v_cache, position, out=y, workspace=workspace, **kwargs)
    torch.cuda.synchronize()
    return {"y": y, "attn": workspace.attn, "mlp": workspace.mlp}


def _emulated_plan(emulated, shape: NeoXShape, cluster_size: int = 0, dtype=torch.float16) -> fd._Plan:
    """The plan's C ABI on the emulated library (a 132-SM sm_90); cluster_size 0: the plan's choice."""
    plan = fd._Plan()
    emulated.call("neoxfuse_fused_decoder_plan", [ctypes.POINTER(fd._Shape), ctypes.c_int, ctypes.POINTER(fd._Plan)],
                  ctypes.byref(fd._c_shape(shape, 1, dtype)), cluster_size, ctypes.byref(plan))
    return plan


def _emulated_layer(emulated, x, layer, shape, k_cache, v_cache, position, y, workspace, cluster_size=0, watch=None,
                    plan=None):
    """The layer's C ABI on the emulated library (CPU tensors): plan (unless given), then launch; the
    caches, the workspace and y written. Every tensor is passed as a guarded copy (conftest.py), so an
    access past the end of one faults; the written ones are copied back. watch: the name of a tensor
    (fd._LAYER_TENSORS) whose bytes read by the kernels are counted and returned."""
    plan = _emulated_plan(emulated, shape, cluster_size, k_cache.dtype) if plan is None else plan
    if not isinstance(position, torch.Tensor):
        position = torch.tensor([position], dtype=torch.int32)
    tensors = [x, *(getattr(layer, name) for name in fd._LAYER_TENSORS[1:13]), k_cache, v_cache, position,
               workspace.attn, workspace.mlp, y]
    guarded = [emulated.guarded(t) for t in tensors]
    c_layer = fd._Layer(*(t.data_ptr() for t in guarded))
    watched = guarded[fd._LAYER_TENSORS.index(watch)] if watch else torch.empty(0)
    with emulated.watch(watched) as read:
        emulated.call("neoxfuse_fused_decoder_layer",
                      [ctypes.POINTER(fd._Shape), ctypes.POINTER(fd._Layer), ctypes.POINTER(fd._Plan), ctypes.c_int,
                       ctypes.c_void_p],
                      ctypes.byref(fd._c_shape(shape, k_cache.shape[1], k_cache.dtype)), ctypes.byref(c_layer),
                      ctypes.byref(plan), 1,
                      None)
    for t, written in list(zip(tensors, guarded))[-6:]:  # k_cache, v_cache, (position), attn, mlp, y
        t.copy_(written)
    return read[0] if watch else None


def _run_layer_emulated(emulated, x, layer, shape, k_cache, v_cache, position, cluster_size=0, plan=None):
    """_run_layer on the CPU through the emulated library (with `plan` if given)."""
    workspace = fd.Workspace.allocate(shape, "cpu")
    for t in (workspace.attn, workspace.mlp):
        t.fill_(float("nan"))
    y = torch.full_like(x, float("nan"))
    _emulated_layer(emulated, x, layer, shape, k_cache, v_cache, position, y, workspace, cluster_size, plan=plan)
    return {"y": y, "attn": workspace.attn, "mlp": workspace.mlp}


def _layer_weight_bytes(shape: NeoXShape) -> int:
    """The bytes of a layer's 16-bit matrices: qkv, dense, fc_in, fc_out."""
    h, f = shape.hidden, shape.ffn
    return 2 * (3 * h * h + h * h + f * h + h * f)


def _within_half_ulp(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether `got` (fp16 or bf16) is fp32 `want` rounded to nearest: within half an ulp of it in
    got's dtype, plus 2e-5 of want's largest entry for the kernel's and the oracle's different fp32 sums."""
    info = torch.finfo(got.dtype)
    significand_bits = {torch.float16: 11, torch.bfloat16: 8}[got.dtype]
    exponent = torch.floor(torch.log2(want.abs().clamp_min(info.tiny)))  # subnormals share the smallest normal's ulp
    half_ulp = torch.exp2(exponent - significand_bits)
    return bool(((got.float() - want).abs() <= half_ulp + 2e-5 * want.abs().max()).all())


def _check_against_oracle(x, layer, shape, position, k_cache, v_cache, run=_run_layer, **kwargs):
    k_before, v_before = k_cache.clone(), v_cache.clone()
    want = _oracle(x, layer, shape, k_cache, v_cache, position)
    got = run(x, layer, shape, k_cache, v_cache, position, **kwargs)
    for name in ("y", "attn", "mlp"):
        assert torch.isfinite(got[name]).all(), f"{name} has unwritten or non-finite entries"
    errors = {
        "mlp": rel_err(got["mlp"], want["mlp"]),
        "attn": rel_err(got["attn"], want["attn"]),
        "y - x": rel_err(got["y"] - x, want["y"] - x),
        "k": rel_err(k_cache[:, position].float(), want["k"]),
        "v": rel_err(v_cache[:, position].float(), want["v"]),
    }
    print(f"position {position} ({k_cache.dtype}): " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["mlp"] < MLP_TOL, errors
    assert errors["attn"] < ATTN_TOL[k_cache.dtype], errors
    assert errors["y - x"] < ATTN_TOL[k_cache.dtype], errors
    assert errors["k"] < CACHE_TOL[k_cache.dtype] and errors["v"] < CACHE_TOL[k_cache.dtype], errors
    for name, cache in (("k", k_cache), ("v", v_cache)):  # rounded to nearest, as HF's fp16 / bf16 does
        assert _within_half_ulp(cache[:, position], want[name]), f"{name} at the position is not {name} rounded to nearest"
    others = torch.ones(shape.max_positions, dtype=torch.bool)
    others[position] = False
    for got_cache, before in [(k_cache, k_before), (v_cache, v_before)]:  # NaN == NaN for this check
        assert torch.equal(got_cache[:, others].nan_to_num(7.0), before[:, others].nan_to_num(7.0)), "wrote another slot"


# ------------------------------------------------------------------------------------------------
# Without a GPU: build, shapes, argument checks.


def test_kernels_are_built_for_every_arch_without_spills(cuobjdump):
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(_lib.library_path())], capture_output=True,
                           text=True, check=True).stdout
    arch = None
    found = {}
    lines = usage.splitlines()
    for line, next_line in zip(lines, lines[1:] + [""]):
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        kernel = next((k for k in KERNELS if k in line and "fused_decoder" in line), None)
        if line.strip().startswith("Function") and kernel:
            found[(arch, kernel)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", next_line)}
    for arch in ("sm_90a", "sm_120"):
        for kernel in KERNELS:
            assert (arch, kernel) in found, f"{kernel} missing for {arch}"
            # No register spills: the only local memory is sincosf's 32-byte slow-path buffer.
            assert found[(arch, kernel)]["STACK"] <= 32, (arch, kernel, found[(arch, kernel)])


def test_the_whole_pythia_suite_and_gpt_neox_20b_are_supported():
    for name in ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b", "pythia-6.9b",
                 "pythia-12b"):
        assert fd.unsupported_reason(shape_of(pythia_config(name))) is None, name
    assert fd.unsupported_reason(shape_of(GPT_NEOX_20B)) is None
    assert "sequential" in fd.unsupported_reason(shape_of(pythia_config("pythia-2.8b", use_parallel_residual=False)))
    with pytest.raises(UnsupportedModelError, match="head_dim 112"):
        fd.check_shape(shape_of(pythia_config("pythia-2.8b", hidden_size=3584)))  # 32 heads of 112


def _cpu_call(shape=ODD_LAYERS["d80-h8"], position=3, **changes):
    """A layer call on CPU tensors of the right sizes, with `changes` applied to the layer or the call."""
    layer = _random_layer(shape, seed=0, device="cpu")
    layer = dataclasses.replace(layer, **{k: v for k, v in changes.items() if hasattr(layer, k)})
    args = {
        "x": torch.randn(shape.hidden),
        "k_cache": torch.zeros(shape.heads, shape.max_positions, shape.head_dim, dtype=torch.float16),
        "v_cache": torch.zeros(shape.heads, shape.max_positions, shape.head_dim, dtype=torch.float16),
        "position": position,
        "shape": shape,
    }
    args.update({k: v for k, v in changes.items() if k in args or k in ("cluster_size",)})
    fd.decoder_layer(args.pop("x"), layer, args.pop("shape"), args.pop("k_cache"), args.pop("v_cache"),
                     args.pop("position"), **args)


@pytest.mark.parametrize("changes, error, message", [
    ({"x": torch.randn(640, dtype=torch.float64)}, InvalidInputError, "x must be float32"),
    ({"x": torch.randn(641)}, InvalidInputError, "x must have shape"),
    ({"qkv_weight": torch.zeros(3 * 640, 640)}, InvalidInputError, "qkv_weight must be float16"),
    ({"fc_out_weight": torch.zeros(640, 999, dtype=torch.float16)}, InvalidInputError, "fc_out_weight must have shape"),
    ({"k_cache": torch.zeros(8, 300, 80)}, InvalidInputError, "k_cache must be float16"),
    ({"k_cache": torch.zeros(8, 300, 80, dtype=torch.bfloat16)}, InvalidInputError, "k_cache must be float16, got bfloat16"),
    ({"ln1_weight": torch.ones(640)}, InvalidInputError, "ln1_weight must be float16, bfloat16, got float32"),
    ({"fc_in_bias": torch.zeros(1000, dtype=torch.bfloat16)}, InvalidInputError, "fc_in_bias must be float16, got bfloat16"),
    ({"v_cache": torch.zeros(8, 299, 80, dtype=torch.float16)}, InvalidInputError, "v_cache must have shape"),
    ({"position": 300}, SequenceTooLongError, "past the KV cache of 300"),
    ({"position": -1}, InvalidInputError, "position must be >= 0"),
    ({"position": 2.0}, InvalidInputError, "position must be an int"),
    ({"position": torch.zeros(1, dtype=torch.int64)}, InvalidInputError, "position must be int32"),
    ({"cluster_size": 9}, InvalidInputError, "cluster_size"),
    ({"shape": dataclasses.replace(ODD_LAYERS["d80-h8"], heads=20, head_dim=32)}, UnsupportedModelError, "head_dim 32"),
    ({"shape": dataclasses.replace(ODD_LAYERS["d80-h8"], parallel_residual=False)}, UnsupportedModelError, "sequential"),
])  # fmt: skip
def test_bad_layer_arguments_are_named_before_any_launch(changes, error, message):
    with pytest.raises(error, match=message):
        _cpu_call(**changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_layer_on_cpu_machine_says_no_gpu():
    with pytest.raises(NoGPUError, match="need a CUDA GPU"):
        _cpu_call()


def test_fake_implementations_check_shapes_without_running():
    # On the meta device the ops run their fake implementations: right sizes pass, wrong ones are named.
    shape = ODD_LAYERS["d80-h8"]
    layer = _random_layer(shape, seed=0, device="meta")
    x = torch.empty(shape.hidden, device="meta")
    k_cache, v_cache = (torch.empty(shape.heads, shape.max_positions, shape.head_dim, dtype=torch.float16, device="meta")
                        for _ in range(2))
    y = fd.decoder_layer(x, layer, shape, k_cache, v_cache, 5)
    assert (y.shape, y.dtype, y.device.type) == (x.shape, torch.float32, "meta")
    with pytest.raises(InvalidInputError, match="fc_in_bias must have shape"):
        short_bias = torch.empty(shape.ffn - 1, dtype=torch.float16, device="meta")
        fd.decoder_layer(x, dataclasses.replace(layer, fc_in_bias=short_bias), shape, k_cache, v_cache, 5)
    embed_out = torch.empty(shape.vocab, shape.hidden, dtype=torch.float16, device="meta")
    logits = fd.lm_head(x, layer.ln1_weight, layer.ln1_bias, embed_out)
    assert (logits.shape, logits.dtype) == ((shape.vocab,), torch.float32)
    bf16 = _random_layer(shape, seed=0, device="meta", dtype=torch.bfloat16)
    y = fd.decoder_layer(x, bf16, shape, k_cache.bfloat16(), v_cache.bfloat16(), 5)
    assert (y.shape, y.dtype) == (x.shape, torch.float32)
    with pytest.raises(InvalidInputError, match="ln_weight must be float16, got bfloat16"):  # one dtype per call
        fd.lm_head(x, bf16.ln1_weight, bf16.ln1_bias, embed_out)
    assert fd.lm_head(x, bf16.ln1_weight, bf16.ln1_bias, embed_out.bfloat16()).dtype == torch.float32
    rng = torch.empty(2, dtype=torch.long, device="meta")
    token = fd.sample_token(logits, rng, 0.8, 50, 0.9)
    assert (token.shape, token.dtype, token.device.type) == ((1,), torch.long, "meta")
    with pytest.raises(InvalidInputError, match="rng must be int64"):
        fd.sample_token(logits, rng.int(), 0.8)


def test_c_abi_refuses_null_arguments_without_touching_a_device():
    import ctypes

    plan = _lib.function("neoxfuse_fused_decoder_plan", [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p])
    with pytest.raises(KernelError, match="invalid argument"):
        _lib.call(plan, None, 0, None)
    layer = _lib.function("neoxfuse_fused_decoder_layer", [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p])
    with pytest.raises(KernelError, match="invalid argument"):
        _lib.call(layer, None, None, None, 1, None)


def test_backend_availability_says_why_not():
    assert not FusedBackend.available(torch.device("cpu"), torch.float16)
    if torch.cuda.is_available():
        assert "fp16 or bf16" in FusedBackend.available(torch.device("cuda"), torch.float32).reason
        if torch.cuda.get_device_capability() >= fd.MIN_CAPABILITY:
            assert FusedBackend.available(torch.device("cuda"), torch.bfloat16)
        shape = shape_of(pythia_config("pythia-2.8b", hidden_size=3584))  # 32 heads of 112
        assert "head_dim 112" in FusedBackend.available(torch.device("cuda"), torch.float16, shape).reason


class _OracleKernels:
    """neoxfuse.ops.fused_decoder as FusedBackend uses it, computed by the fp32 oracle on the CPU,
    so the backend's own logic (token buffer, device position, caches, steps) runs without a GPU."""

    Workspace = fd.Workspace
    check_weights = staticmethod(lambda weights: fd.check_shape(weights.shape))
    plan = staticmethod(lambda shape, device, cluster_size, dtype: None)

    @staticmethod
    def decoder_layer(x, layer, shape, k_cache, v_cache, position, *, out, workspace, cluster_size, pdl):
        p = int(position)  # the kernel reads the int32 [1] position on the device
        k32, v32 = k_cache.float(), v_cache.float()
        out.copy_(ref.decoder_layer(x[None], layer.to(dtype=torch.float32), shape, k32, v32, p)[0])
        k_cache[:, p], v_cache[:, p] = k32[:, p].to(k_cache.dtype), v32[:, p].to(v_cache.dtype)

    @staticmethod
    def lm_head(x, ln_weight, ln_bias, embed_out, eps, *, out, pdl):
        out.copy_(ref.layer_norm(x, ln_weight.float(), ln_bias.float(), eps) @ embed_out.float().T)

    MAX_SAMPLE_VOCAB = fd.MAX_SAMPLE_VOCAB

    @staticmethod
    def sample_token(logits, rng, temperature, top_k, top_p, *, out):
        return out.copy_(exponential_race(probabilities(logits, SamplingParams(temperature, top_k, top_p)), rng))


@pytest.fixture
def oracle_backend(monkeypatch):
    """A 2-layer FusedBackend (head_dim 64, fp16 weights) on the CPU over _OracleKernels, no graphs,
    and the fp32 ReferenceModel of the same weights."""
    monkeypatch.setattr(neoxfuse.fused, "ops", _OracleKernels)
    config = pythia_config("tiny", hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=300,
                           max_position_embeddings=64)
    weights = from_hf(random_model(config, seed=5)).to(dtype=torch.float16)
    return FusedBackend(weights, 40, use_graph=False), ref.ReferenceModel(weights.to(dtype=torch.float32), max_seq_len=40)


def _check_backend_logits(backend, oracle, tokens: torch.Tensor, prompt: int, tol: float = 1e-2) -> None:
    """Prefill tokens[:prompt], then decode the rest one step at a time: the backend's logits are
    the oracle's, to the 16-bit prefill and KV cache (tol), and the device position follows."""
    cache, want_cache = backend.new_cache(), oracle.new_cache()
    backend.prefill(tokens[:prompt], cache)
    oracle.prefill(tokens[:prompt], want_cache)
    got = torch.stack([backend.decode_step(int(t), cache) for t in tokens[prompt:]])  # [steps, vocab]
    want = torch.stack([oracle.decode_step(int(t), want_cache) for t in tokens[prompt:]])
    assert cache.length == int(backend._position) == len(tokens)
    err = rel_err(got, want)
    print(f"logits against the fp32 oracle: {err:.2e}")
    assert err < tol


def test_backend_on_oracle_kernels_gives_the_oracles_logits(oracle_backend):
    backend, oracle = oracle_backend
    tokens = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second generation reuses the backend's KV storage from position 0
        _check_backend_logits(backend, oracle, tokens, 5)


def _decode_step_tokens(backend, prompt, sampling, steps, device):
    """On a new cache: prefill `prompt`, then `steps` decode_steps, each token chosen on the host
    from the logits returned. (the prefill's argmax, the chosen tokens, the rng they were drawn with)"""
    cache = backend.new_cache()
    first = int(backend.prefill(prompt, cache).argmax())
    rng, history, chosen, token = sampling.rng(device), _history(backend, prompt, first, sampling), [], first
    counts = sampling.counts([first], backend.shape.vocab, device)
    for _ in range(steps):
        token = next_token(backend.decode_step(token, cache), sampling, rng, history, counts=counts)
        chosen.append(token)
    return first, chosen, rng


def _history(backend, prompt, first, sampling):
    """The sequence a rule reads after `prompt` and the token `first` (None for rules that read none)."""
    return sampling.history([*prompt.tolist(), first], backend.max_seq_len + 1, prompt.device)


# A penalty below 1 makes the tiny random models repeat themselves, so it changes their choices
# (above 1 it changes nothing there: they do not repeat).
_PENALIZED = [SamplingParams(repetition_penalty=0.3), SamplingParams(temperature=1.5, top_k=40, seed=2, repetition_penalty=0.3)]
# Suppressed tokens: the first two that oracle_backend's model chooses without them (greedy, and sampled with seed 2).
_SUPPRESSING = [SamplingParams(suppress_tokens={26, 126}), SamplingParams(temperature=1.5, top_k=40, seed=2, suppress_tokens={191, 200})]
# Bans over the sequence so far, with the penalty that makes oracle_backend's model repeat itself:
# greedy, it would choose 118 after the prompt [3, 1, 4, 1, 5] and its first token 118, then 4 and
# 31 again and again; sampled with seed 2, 118 first too.
_BANNING = [SamplingParams(repetition_penalty=0.3, no_repeat_ngram_size=2, bad_sequences={(118, 118), (4, 4)}),
            SamplingParams(temperature=1.5, top_k=40, seed=2, repetition_penalty=0.3, bad_sequences={(1, 5, 118, 118)})]
_MIN_P = SamplingParams(temperature=1.5, top_k=40, seed=2, min_p=0.3)  # sampled among the likelier tokens only
# A typical filter after top-k and top-p: the step applies all three before the draw (and the draw none).
_TYPICAL = SamplingParams(temperature=1.5, top_k=40, top_p=0.8, seed=2, typical_p=0.5)
# Biases: a token the rule chose without them made unlikely, and 7 (greedy) or 9 (sampled) all but
# certain right after the second choice, by a two-token sequence's bias of 25.
_BIASED = [SamplingParams(sequence_bias={(173,): -20.0, (126, 7): 25.0}),
           SamplingParams(temperature=1.5, top_k=40, seed=2, sequence_bias={(15,): -20.0, (200, 9): 25.0})]
# Presence and frequency penalties: a negative presence penalty makes the tokens chosen likelier (the
# tiny models then repeat themselves), a frequency penalty less likely the more often they come.
_COUNTING = [SamplingParams(presence_penalty=-2.0, frequency_penalty=1.0),
             SamplingParams(temperature=1.5, top_k=40, seed=2, presence_penalty=-2.0, frequency_penalty=1.0)]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.5, top_k=40, seed=2), *_PENALIZED, *_SUPPRESSING,
                                      *_BANNING, _MIN_P, _TYPICAL, *_BIASED, *_COUNTING],
                         ids=["greedy", "sampled", "greedy-penalized", "sampled-penalized", "greedy-suppressing",
                              "sampled-suppressing", "greedy-banning", "sampled-banning", "sampled-min-p", "sampled-typical",
                              "greedy-biased", "sampled-biased", "greedy-counting", "sampled-counting"])
def test_backend_on_oracle_kernels_chooses_on_the_device_what_decode_steps_give(oracle_backend, sampling):
    backend = oracle_backend[0]
    prompt = torch.tensor([3, 1, 4, 1, 5])
    first, want, _ = _decode_step_tokens(backend, prompt, sampling, 13, "cpu")

    cache = backend.new_cache()
    backend.prefill(prompt, cache)
    rng, history = sampling.rng("cpu"), _history(backend, prompt, first, sampling)
    counts = sampling.counts([first], backend.shape.vocab, "cpu")
    got = backend.decode_tokens(first, cache, 5, sampling, rng, StepClock(torch.device("cpu")), history, counts=counts).tolist()
    got += backend.decode_tokens(got[-1], cache, 7, sampling, rng, StepClock(torch.device("cpu")), history, counts=counts).tolist()
    assert got == want[:12]
    assert cache.length == int(backend._position) == 17
    assert next_token(backend.decode_step(got[-1], cache), sampling, rng, history, counts=counts) == want[12]
    if sampling.needs_history:  # the whole sequence, the tokens chosen on the device too
        assert history.tolist() == [3, 1, 4, 1, 5, first, *want, *[-1] * (41 - 19)]
    if sampling.counts_chosen:  # the tokens chosen, on the device too, and not the prompt's
        assert counts.tolist() == torch.bincount(torch.tensor([first, *want]), minlength=backend.shape.vocab).tolist()
        assert len(set(want)) < len(want)  # the rule made the model repeat itself
    unbanned = dataclasses.replace(sampling, suppress_tokens=(), no_repeat_ngram_size=0, bad_sequences=())
    for without in {unbanned, dataclasses.replace(sampling, repetition_penalty=1.0), dataclasses.replace(sampling, min_p=0.0),
                    dataclasses.replace(sampling, typical_p=1.0), dataclasses.replace(sampling, sequence_bias=()),
                    dataclasses.replace(sampling, presence_penalty=0.0), dataclasses.replace(sampling, frequency_penalty=0.0)} - {sampling}:
        assert want != _decode_step_tokens(backend, prompt, without, 13, "cpu")[1]  # each part of the rule changed the choices
    assert not sampling.suppress_tokens & {*want, *got}
    with pytest.raises(SequenceTooLongError):
        backend.decode_tokens(got[-1], cache, 23, sampling, rng, StepClock(torch.device("cpu")), history, counts=counts)
    with pytest.raises(InvalidInputError, match="steps"):
        backend.decode_tokens(got[-1], cache, 0, sampling, rng, StepClock(torch.device("cpu")), history, counts=counts)
    assert cache.length == 18


def test_backend_samples_a_vocabulary_over_the_kernels_with_pytorch_ops(monkeypatch):
    # 65537 logits: more than the sampling kernel holds, so the step samples with neoxfuse.sampling's
    # PyTorch ops (the kernel would refuse them) and draws what decode_step's logits give.
    class Kernels(_OracleKernels):
        @staticmethod
        def sample_token(*args, **kwargs):
            raise AssertionError("the sampling kernel was called for a vocabulary it does not hold")

    monkeypatch.setattr(neoxfuse.fused, "ops", Kernels)
    config = pythia_config("tiny", hidden_size=64, num_attention_heads=1, intermediate_size=128,
                           vocab_size=fd.MAX_SAMPLE_VOCAB + 1, max_position_embeddings=32)
    backend = FusedBackend(from_hf(random_model(config, seed=7)).to(dtype=torch.float16), 16, use_graph=False)
    sampling = SamplingParams(temperature=2.0, top_k=1000, top_p=0.9, seed=4)
    prompt = torch.tensor([3, 65536, 9])
    first, want, _ = _decode_step_tokens(backend, prompt, sampling, 4, "cpu")
    cache = backend.new_cache()
    backend.prefill(prompt, cache)
    got = backend.decode_tokens(first, cache, 4, sampling, sampling.rng("cpu"), StepClock(torch.device("cpu"))).tolist()
    assert got == want and len(set(want)) > 1


def test_backend_steps_need_their_rules_state_before_running(oracle_backend):
    backend = oracle_backend[0]
    cache = backend.new_cache()
    backend.prefill(torch.tensor([3, 1, 4]), cache)
    with pytest.raises(InvalidInputError, match="random state"):
        backend.decode_tokens(5, cache, 2, SamplingParams(temperature=1.0), None, StepClock(torch.device("cpu")))
    banning = SamplingParams(no_repeat_ngram_size=2)
    with pytest.raises(InvalidInputError, match="an n-gram ban or bad sequences need the sequence so far"):
        backend.decode_tokens(5, cache, 2, banning, None, StepClock(torch.device("cpu")))
    with pytest.raises(InvalidInputError, match=r"history must be long \[41\] \(max_seq_len \+ 1\), .* got torch.int64 \[40\]"):
        backend.decode_tokens(5, cache, 2, banning, None, StepClock(torch.device("cpu")), banning.history([3, 1, 4], 40, "cpu"))
    bad = SamplingParams(bad_sequences={(3, 300)})
    with pytest.raises(InvalidInputError, match=r"token ids in \[0, 300\); got 300"):
        backend.decode_tokens(5, cache, 2, bad, None, StepClock(torch.device("cpu")), bad.history([3, 1, 4], 41, "cpu"))
    counting = SamplingParams(presence_penalty=0.5)
    with pytest.raises(InvalidInputError, match="a presence or frequency penalty needs the counts of the tokens chosen"):
        backend.decode_tokens(5, cache, 2, counting, None, StepClock(torch.device("cpu")))
    with pytest.raises(InvalidInputError, match=r"counts must be int32 \[300\] \(the vocabulary\), .* got \[299\]"):
        backend.decode_tokens(5, cache, 2, counting, None, StepClock(torch.device("cpu")), counts=counting.counts([], 299, "cpu"))
    assert cache.length == 3 and int(backend._position) == 0  # nothing ran, nothing was put on the device


def test_backend_keeps_a_graph_per_selection_rule_and_the_last_sampling_ones(oracle_backend, monkeypatch):
    # Graphs stood in for by replays of the eager step: one for logits, one for greedy steps and
    # the last 4 (MAX_SAMPLING_GRAPHS) sampling rules captured (the seed is not part of a rule).
    backend = oracle_backend[0]

    class StepGraph:
        def __init__(self, cache, selection, constraints):
            self.replay = lambda: backend._step(cache, selection, constraints)

    monkeypatch.setattr(backend, "use_graph", True)
    monkeypatch.setattr(backend, "_capture", StepGraph)
    monkeypatch.setattr(neoxfuse.fused, "MAX_SAMPLING_GRAPHS", 4)
    cache = backend.new_cache()
    backend.prefill(torch.tensor([3, 1, 4]), cache)
    backend.decode_step(5, cache)
    backend.decode_tokens(6, cache, 2, SamplingParams(), None, StepClock(torch.device("cpu")))
    temperatures = [0.5, 0.6, 0.7, 0.8, 0.9, 0.6, 0.5]  # 0.9 drops 0.5; 0.6 replays; 0.5 drops 0.6
    for t in temperatures:
        sampling = SamplingParams(temperature=t, seed=int(t * 10))
        backend.decode_tokens(7, cache, 2, sampling, sampling.rng("cpu"), StepClock(torch.device("cpu")))
    sampled = [rule.temperature for rule in backend._graphs if rule is not None and not rule.greedy]
    assert sampled == [0.7, 0.8, 0.9, 0.5]
    assert None in backend._graphs and SamplingParams() in backend._graphs
    assert all(rule is None or rule.seed is None for rule in backend._graphs)
    filtered = SamplingParams(top_k=5, top_p=0.5, min_p=0.1, typical_p=0.5, epsilon_cutoff=0.1, eta_cutoff=0.1)  # greedy: no effect,
    backend.decode_tokens(7, cache, 2, filtered, None, StepClock(torch.device("cpu")))  # plain greedy's graph replays
    penalized = SamplingParams(repetition_penalty=1.2)  # a greedy rule, but not plain greedy's: it drops 0.7
    backend.decode_tokens(7, cache, 2, penalized, None, StepClock(torch.device("cpu")), penalized.history([7], 41, "cpu"))
    assert [rule for rule in backend._graphs if rule not in (None, SamplingParams())] == [
        *(SamplingParams(temperature=t) for t in (0.8, 0.9, 0.5)), penalized]
    banning = SamplingParams(bad_sequences={(7, 8)}, suppress_tokens={9})  # its graph reads its constraints, kept with it
    backend.decode_tokens(7, cache, 2, banning, None, StepClock(torch.device("cpu")), banning.history([7], 41, "cpu"))
    constraints = backend._graphs[banning][1]
    assert constraints.bad_sequences.tolist() == [[7, 8]] and constraints.suppressed.nonzero().flatten().tolist() == [9]
    assert cache.length == 3 + 1 + 2 + 2 * len(temperatures) + 2 + 2 + 2


class _EmulatedKernels(_OracleKernels):
    """neoxfuse.ops.fused_decoder as FusedBackend uses it, with the real kernels run on the CPU by
    the emulated library: the backend and the kernels together, without a GPU."""

    def __init__(self, emulated):
        self.emulated = emulated

    def decoder_layer(self, x, layer, shape, k_cache, v_cache, position, *, out, workspace, cluster_size, pdl):
        _emulated_layer(self.emulated, x, layer, shape, k_cache, v_cache, position, out, workspace, cluster_size or 0)

    def lm_head(self, x, ln_weight, ln_bias, embed_out, eps, *, out, pdl):
        _emulated_lm_head(self.emulated, x, ln_weight, ln_bias, embed_out, eps, out)

    def sample_token(self, logits, rng, temperature, top_k, top_p, *, out):
        self.emulated.sample_token(logits, rng, out, temperature, top_k, top_p)
        return out


TINY = dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, vocab_size=300, max_position_embeddings=64)


@torch.inference_mode()
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, BF16_LOGITS_TOL)], ids=["fp16", "bf16"])
def test_emulated_backend_gives_the_oracles_logits(monkeypatch, emulated, dtype, tol):
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    weights = from_hf(random_model(pythia_config("tiny", **TINY), seed=5)).to(dtype=dtype)
    backend = FusedBackend(weights, 24, use_graph=False)
    oracle = ref.ReferenceModel(weights.to(dtype=torch.float32), max_seq_len=24)
    tokens = torch.randint(0, 300, (14,), generator=torch.Generator().manual_seed(0))
    _check_backend_logits(backend, oracle, tokens, 4, tol)


@torch.inference_mode()
def test_emulated_backend_at_pythia_2_8b_size_gives_hf_fp32_logits(monkeypatch, emulated):
    # Two full-size layers and the 50K-row LM head: the GPU's teacher-forced test, three steps long.
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    model16 = random_model(pythia_config("pythia-2.8b", num_hidden_layers=2), seed=0).half().eval()
    tokens = torch.randint(0, model16.config.vocab_size, (19,), generator=torch.Generator().manual_seed(0))
    want = copy.deepcopy(model16).float()(tokens[None]).logits[0, 16:].float()  # [3, vocab]
    backend = FusedBackend(from_hf(model16), 32, use_graph=False)
    cache = backend.new_cache()
    backend.prefill(tokens[:16], cache)
    got = torch.stack([backend.decode_step(int(t), cache) for t in tokens[16:]])  # [3, vocab]
    assert rel_err(got, want) < 1e-2  # as on the GPU: fp16 prefill and KV cache


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_backend_greedy_tokens_match_hf_in_the_same_dtype(monkeypatch, emulated, dtype):
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    model = _decisive(random_model(pythia_config("tiny", **TINY), seed=3).to(dtype).eval())
    prompt = torch.tensor([5, 17, 250, 3])
    hf_tokens = _hf_greedy(model, prompt, 12)

    backend = FusedBackend(from_hf(model), 32, use_graph=False)
    cache = backend.new_cache()
    first = int(backend.prefill(prompt, cache).argmax())  # prefill: neoxfuse.reference in the model's dtype
    got = backend.decode_tokens(first, cache, 11, SamplingParams(), None, StepClock(torch.device("cpu"))).tolist()
    assert [first, *got] == hf_tokens


@torch.inference_mode()
def test_emulated_engine_reuses_its_prefix_cache_on_the_fused_backend(monkeypatch, emulated):
    # The engine cuts the kept cache back; the backend's device position must follow it.
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    model = _decisive(random_model(pythia_config("tiny", **TINY), seed=3).half().eval())
    engine = Engine(model, device="cpu", dtype=torch.float16, backend="reference", max_seq_len=32, prefix_cache=True)
    engine.backend = FusedBackend(engine.weights, engine.max_seq_len, use_graph=False)  # no CUDA: not selectable
    first = engine.generate([5, 17, 250, 3], 4)
    for prompt, reused in [([5, 17, 250, 3, *first.tokens, 8, 9], 7), ([5, 17, 1], 2)]:
        got = engine.generate(prompt, 4)
        assert got.reused_tokens == reused and got.tokens == _hf_greedy(model, torch.tensor(prompt), 4)


@torch.inference_mode()
def test_emulated_engine_logprobs_are_the_fused_steps_logits_before_the_rule(monkeypatch, emulated):
    # A sampled rule with a repetition penalty: the logprobs are those of the logits the kernels
    # wrote (the prefill's for the first token), bitwise, not the penalized ones chosen from.
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    model = random_model(pythia_config("tiny", **TINY), seed=3).half().eval()
    engine = Engine(model, device="cpu", dtype=torch.float16, backend="reference", max_seq_len=32)
    engine.backend = FusedBackend(engine.weights, engine.max_seq_len, use_graph=False)  # no CUDA: not selectable
    prompt = torch.tensor([5, 17, 250, 3])
    out = engine.generate(prompt, 6, SamplingParams(temperature=1.2, repetition_penalty=0.3, seed=4), logprobs=2)
    backend = FusedBackend(engine.weights, engine.max_seq_len, use_graph=False)
    cache = backend.new_cache()
    logits = [backend.prefill(prompt, cache), *(backend.decode_step(token, cache) for token in out.tokens[:-1])]
    assert out.logprobs == logprobs_of(torch.stack(logits), torch.tensor(out.tokens), 2)


@torch.inference_mode()
def test_emulated_engine_shares_a_questions_context_prefill_on_the_fused_backend(monkeypatch, emulated):
    # The choices of one context prefill it once (Engine._score_spans); the backend's device
    # position must follow the cache cut back to that prefill: the same loglikelihoods, bitwise,
    # as an engine that prefills the context for each, before and after a generation in between.
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    model = random_model(pythia_config("tiny", **TINY), seed=3).half().eval()
    ours, fresh = (Engine(model, device="cpu", dtype=torch.float16, backend="reference", max_seq_len=32) for _ in range(2))
    for engine in (ours, fresh):
        engine.backend = FusedBackend(engine.weights, engine.max_seq_len, use_graph=False)  # no CUDA: not selectable
    context = [5, 17, 250, 3, 9, 40]
    for continuation in ([7, 8, 9], [11], [7, 8, 9], "generate", [12, 13]):
        if continuation == "generate":
            ours.generate([1, 2, 3, 4, 5, 6, 7], 3)
            continue
        fresh._prefilled = None  # prefills every time
        assert ours.loglikelihood(context, continuation) == fresh.loglikelihood(context, continuation)


@torch.inference_mode()
def test_emulated_engine_scores_on_the_fused_backend_what_hf_scores(monkeypatch, emulated):
    # Every prediction a fused decode step, over three windows each from an empty cache: the first
    # all decode steps, the later ones (a stride of 3) first prefilling their context in PyTorch into
    # the cache the kernels read. Scoring writes the backend's one KV storage, so a generation after
    # it must not reuse what was kept there.
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    model = random_model(pythia_config("tiny", **TINY), seed=3).half().eval()
    engine = Engine(model, device="cpu", dtype=torch.float16, backend="reference", max_seq_len=32, prefix_cache=True)
    engine.backend = FusedBackend(engine.weights, engine.max_seq_len, use_graph=False)  # no CUDA: not selectable
    tokens = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    first = engine.generate(tokens[:4], 2)
    got = engine.score(tokens, window=8, stride=3)
    difference = got.difference(hf_scores(copy.deepcopy(model).float(), tokens, 8, 3))  # measured: 1.3e-5, max 4.9e-4
    assert got.windows == 3 and difference.relative_perplexity < 1e-4 and difference.max_abs_nll < 2e-3 and difference.top1_agreement == 1.0
    assert engine.generate([*tokens[:4], *first.tokens], 1).reused_tokens == 0


@torch.inference_mode()
@pytest.mark.parametrize("rule", [{}, {"repetition_penalty": 0.3}, {"suppress_tokens": range(0, 300, 2)}, {"no_repeat_ngram_size": 1},
                                  {"presence_penalty": -2.0, "frequency_penalty": 1.0}],
                         ids=["plain", "penalized", "suppressing", "banning", "counting"])
def test_emulated_backend_draws_in_the_step_what_the_pytorch_race_draws_after_decode_steps(monkeypatch, emulated, rule):
    # The sampling kernel inside the step (as the GPU's graph holds it) against decode_step's
    # logits sampled from with PyTorch ops: the same seed gives the same tokens, and rng ends
    # advanced by one per token either way; with a repetition penalty, the even ids suppressed
    # (their logits -inf in the kernel), or presence and frequency penalties, too.
    monkeypatch.setattr(neoxfuse.fused, "ops", _EmulatedKernels(emulated))
    backend = FusedBackend(from_hf(random_model(pythia_config("tiny", **TINY), seed=4)).to(dtype=torch.float16), 32,
                           use_graph=False)
    sampling = SamplingParams(temperature=1.3, top_k=50, top_p=0.95, seed=2**40 + 9, **rule)
    prompt = torch.tensor([9, 2, 6])
    first, want, rng = _decode_step_tokens(backend, prompt, sampling, 10, "cpu")
    assert rng.tolist() == [2**40 + 9, 10]

    cache = backend.new_cache()
    backend.prefill(prompt, cache)
    rng, history = sampling.rng("cpu"), _history(backend, prompt, first, sampling)
    counts = sampling.counts([first], backend.shape.vocab, "cpu")
    got = backend.decode_tokens(first, cache, 6, sampling, rng, StepClock(torch.device("cpu")), history, counts=counts).tolist()
    got += backend.decode_tokens(got[-1], cache, 4, sampling, rng, StepClock(torch.device("cpu")), history, counts=counts).tolist()
    assert got == want
    assert rng.tolist() == [2**40 + 9, 10]
    assert len(set(want)) > 3  # a real draw, not the argmax every step
    assert not sampling.suppress_tokens & set(want)
    if sampling.no_repeat_ngram_size == 1:  # no token twice
        assert len({9, 2, 6, first, *want}) == 4 + len(want)


def test_layer_benchmark_table_shows_both_kernels_grids():
    from neoxfuse.bench.layer import _table

    plan = fd.FusedPlan(attn_mlp_in=fd.FusedGrid(3, 42, 42, 52_000), out_proj=fd.FusedGrid(2, 66, 66, 26_000))
    row = {"layer": 0, "seq_len": 512, "dtype": "bf16", "provider": "fused", "median_us": 60.0, "p90_us": 61.0,
           "p99_us": 62.0, "floor_us": 55.0, "pct_of_floor": 91.7, "GBps": 2700.0, "speedup_of_fused": 1.0, "rel_err": 1e-4}
    text = _table([row], {"plan": dataclasses.asdict(plan), "bytes": 157e6, "skipped": {}},
                  {"name": "H100", "copy_GBps": 3e3}, "pythia-2.8b")
    assert "fused plan: 42 clusters x 3 blocks (attn_mlp_in), 66 clusters x 2 blocks (out_proj)" in text
    assert "seq_len 512, bf16 on H100" in text


def test_layer_benchmark_torch_peer_computes_the_layer():
    # neoxfuse bench layer's torch_graph peer must compute what the kernel does (checked in fp32 on CPU).
    from neoxfuse.bench.layer import torch_layer

    shape, position = ODD_LAYERS["d128-h3"], 40
    layer = _random_layer(shape, seed=8, device="cpu").to(dtype=torch.float32)
    x = torch.randn(1, shape.hidden)
    k_cache, v_cache = (torch.randn(shape.heads, shape.max_positions, shape.head_dim) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cos, sin = ref.rotary_cos_sin(torch.tensor([position]), shape.rotary_dims, shape.rotary_base)
    got = torch_layer(x, layer, shape, k_cache, v_cache, position, cos, sin)
    want = ref.decoder_layer(x, layer, shape, k_ref, v_ref, position)
    assert rel_err(got - x, want - x) < 1e-5
    assert rel_err(k_cache[:, position], k_ref[:, position]) < 1e-5
    assert rel_err(v_cache[:, position], v_ref[:, position]) < 1e-5


# ------------------------------------------------------------------------------------------------
# One layer against the oracle (GPU).


@pytest.fixture(scope="module", params=sorted(FULL_SIZE_LAYERS))
def pythia_layer(request):
    shape = FULL_SIZE_LAYERS[request.param]
    return shape, _random_layer(shape, seed=1)


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("position", [0, 1, 127, 1023, 2047])
def test_pythia_layer_matches_fp32_oracle(pythia_layer, position):
    shape, layer = pythia_layer
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position)
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster_size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name, position", CLUSTER_CASES)
def test_every_cluster_size_matches_fp32_oracle(name, position, cluster_size):
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=cluster_size)
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position)
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache, cluster_size=cluster_size)


@pytest.mark.parametrize("cluster_size", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name, position", CLUSTER_CASES)
def test_emulated_every_cluster_size_matches_fp32_oracle(emulated, name, position, cluster_size):
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=cluster_size, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position, device="cpu")
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache, functools.partial(_run_layer_emulated, emulated),
                          cluster_size=cluster_size)


@pytest.mark.parametrize("cluster_size", [1, 3, 8])
@pytest.mark.parametrize("name, position", BF16_CASES)
def test_emulated_bf16_layer_matches_fp32_oracle_and_streams_each_weight_byte_once(emulated, name, position, cluster_size):
    # bf16 weights and cache: the same kernels read them as bf16 (8 significant bits, fp32's
    # exponent range) and round the new k, v to nearest bf16.
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=cluster_size, device="cpu", dtype=torch.bfloat16)
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position, device="cpu", dtype=torch.bfloat16)
    emulated.take_streamed_bytes()
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache, functools.partial(_run_layer_emulated, emulated),
                          cluster_size=cluster_size)
    assert emulated.take_streamed_bytes() == _layer_weight_bytes(shape)


@pytest.mark.parametrize("position", [0, 2047])
@pytest.mark.parametrize("name", sorted(FULL_SIZE_LAYERS))
def test_emulated_pythia_layer_matches_fp32_oracle(emulated, name, position):
    # Full-size layers with the plan's grids on the emulated 132-SM device (for 32 heads: 33 clusters of 4 and 22 of 6).
    shape = FULL_SIZE_LAYERS[name]
    layer = _random_layer(shape, seed=1, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position, device="cpu")
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache, functools.partial(_run_layer_emulated, emulated))


@pytest.mark.parametrize("cluster_size", [1, 3, 8])
@pytest.mark.parametrize("name, position", [("d80-h8", 0), ("d80-h8", 299), ("d256-h3", 149), ("d64-h5", 37)])
def test_emulated_layer_reads_each_cached_key_and_value_once(emulated, name, position, cluster_size):
    # Attention over positions 0..p splits them over the cluster's blocks: every key and value row
    # up to p (the new one included) is read exactly once, none past it.
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=4, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=5, device="cpu")
    workspace = fd.Workspace.allocate(shape, "cpu")
    row_bytes = shape.head_dim * 2  # fp16
    for cache in ("k_cache", "v_cache"):
        read = _emulated_layer(emulated, x, layer, shape, k_cache, v_cache, position, torch.empty_like(x), workspace,
                               cluster_size, watch=cache)
        assert read == shape.heads * (position + 1) * row_bytes, cache


@pytest.mark.parametrize("rotary_dims", [0, 2, 64])
def test_emulated_rotary_on_none_some_or_all_of_the_head(emulated, rotary_dims):
    shape = dataclasses.replace(ODD_LAYERS["d64-h5"], rotary_dims=rotary_dims)
    layer = _random_layer(shape, seed=rotary_dims, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, 100, seed=11, device="cpu")
    _check_against_oracle(x, layer, shape, 100, k_cache, v_cache, functools.partial(_run_layer_emulated, emulated),
                          cluster_size=3)


def test_emulated_attention_when_every_score_is_far_below_zero(emulated):
    # q = u and every key -u outside the rotary dims: every score is -|u|^2 / sqrt(head_dim), about
    # -240, whose exp underflows unless the softmax subtracts the largest real score. A block's
    # slots past its positions must count as no score at all, not as a score of 0.
    shape, position = ODD_LAYERS["d80-h8"], 150
    layer = _random_layer(shape, seed=8, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=9, device="cpu")
    u = torch.zeros(shape.head_dim, dtype=torch.float16)
    u[shape.rotary_dims:] = 6.0
    qkv_weight = layer.qkv_weight.view(shape.heads, 3, shape.head_dim, shape.hidden)
    qkv_bias = layer.qkv_bias.view(shape.heads, 3, shape.head_dim)
    qkv_weight[:, :2] = 0.0  # q and k are their biases
    qkv_bias[:, 0], qkv_bias[:, 1] = u, -u
    k_cache[:, :position] = -u
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache, functools.partial(_run_layer_emulated, emulated),
                          cluster_size=3)


@pytest.mark.parametrize("cluster_size", [1, 3, 8])
@pytest.mark.parametrize("name", sorted(ODD_LAYERS))
def test_emulated_layer_streams_every_weight_byte_once(emulated, name, cluster_size):
    # The memory floor assumes each weight byte crosses the memory bus once per token: the kernels'
    # streaming loads (weights only) must add up to the layer's weight bytes exactly.
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=2, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, 9, seed=3, device="cpu")
    emulated.take_streamed_bytes()
    _run_layer_emulated(emulated, x, layer, shape, k_cache, v_cache, 9, cluster_size)
    assert emulated.take_streamed_bytes() == _layer_weight_bytes(shape)


@pytest.mark.parametrize("name, position, cluster_size", [("d80-h8", 299, 8), ("d128-h3", 40, 3), ("d256-h3", 149, 5)])
def test_emulated_layer_is_the_same_whatever_order_threads_run_in(emulated, name, position, cluster_size):
    # A read that no barrier orders after its write sees other data in the reverse order.
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=6, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=7, device="cpu")
    forward = _run_layer_emulated(emulated, x, layer, shape, k_cache, v_cache, position, cluster_size)
    forward_k = k_cache.clone()
    with emulated.reverse_schedule():
        reverse = _run_layer_emulated(emulated, x, layer, shape, k_cache, v_cache, position, cluster_size)
    for name_ in forward:
        assert torch.equal(reverse[name_], forward[name_]), name_
    assert torch.equal(k_cache.nan_to_num(7.0), forward_k.nan_to_num(7.0))


def test_emulated_position_past_the_cache_gives_nan_and_writes_nothing(emulated):
    shape = ODD_LAYERS["d80-h8"]
    layer = _random_layer(shape, seed=4, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, 10, seed=5, device="cpu")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    for position in (shape.max_positions, -1):
        got = _run_layer_emulated(emulated, x, layer, shape, k_cache, v_cache, torch.tensor([position], dtype=torch.int32))
        assert torch.isnan(got["y"]).all()
        assert torch.equal(k_cache.nan_to_num(7.0), k_before.nan_to_num(7.0))
        assert torch.equal(v_cache.nan_to_num(7.0), v_before.nan_to_num(7.0))


@pytest.mark.parametrize("grid, field, change", [
    ("attn_mlp_in", "clusters", lambda plan, shape: shape.heads - 1),  # a head without its cluster
    ("attn_mlp_in", "clusters", lambda plan, shape: plan.attn_mlp_in.clusters + 1),  # head blocks' shares < their QKV rows
    ("attn_mlp_in", "cluster_size", lambda plan, shape: 9),
    ("out_proj", "cluster_size", lambda plan, shape: 9),
    ("out_proj", "clusters", lambda plan, shape: 0),
])  # fmt: skip
def test_emulated_layer_refuses_a_plan_its_work_split_cannot_take(emulated, grid, field, change):
    shape = ODD_LAYERS["d64-h5"]
    layer = _random_layer(shape, seed=1, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, 3, seed=2, device="cpu")
    workspace = fd.Workspace.allocate(shape, "cpu")
    plan = _emulated_plan(emulated, shape, cluster_size=8)  # attn_mlp_in: 12 clusters, the most the shares allow
    setattr(getattr(plan, grid), field, change(plan, shape))
    with pytest.raises(KernelError, match="invalid argument"):
        _emulated_layer(emulated, x, layer, shape, k_cache, v_cache, 3, torch.empty_like(x), workspace, plan=plan)


def _grid(grid) -> tuple[int, int]:
    return grid.cluster_size, grid.clusters


@pytest.mark.parametrize("heads, attn_mlp_in", [(32, (4, 33)), (16, (8, 16)), (8, (8, 15)), (40, (3, 44)), (64, (2, 66)),
                                                (100, (1, 106))])
def test_emulated_plan_fills_one_wave_of_clusters(emulated, heads, attn_mlp_in):
    # The emulated device has 132 SMs, one block each, and no GPCs: 132 // C clusters of C at once.
    # attn_mlp_in takes a cluster per head and more for fc_in rows while the head blocks' shares
    # hold their QKV rows (8 heads: no more than 15 clusters of 8); sizes within 1/16 of the most
    # blocks go to the larger cluster (16 heads: 16 x 8 = 128 blocks, not 33 x 4 = 132). out_proj
    # takes the most blocks, ties to the larger cluster: 22 clusters of 6.
    shape = dataclasses.replace(ODD_LAYERS["d64-h5"], heads=heads, hidden=64 * heads)
    plan = _emulated_plan(emulated, shape)
    assert (_grid(plan.attn_mlp_in), _grid(plan.out_proj)) == (attn_mlp_in, (6, 22))


def _emulated_lm_head(emulated, x, ln_weight, ln_bias, embed_out, eps, logits):
    """The LM head's C ABI on the emulated library (CPU tensors, passed as guarded copies), 132
    blocks as on the emulated device."""
    guarded = [emulated.guarded(t) for t in (x, ln_weight, ln_bias, embed_out, logits)]
    emulated.call("neoxfuse_fused_lm_head", fd._LM_HEAD_ARGTYPES, *(t.data_ptr() for t in guarded[:4]),
                  _lib.DTYPE_CODES[embed_out.dtype], guarded[4].data_ptr(), x.shape[0], embed_out.shape[0], eps, 132, 1,
                  None)
    logits.copy_(guarded[-1])


@pytest.mark.parametrize("device, out_proj, name, attn_mlp_in", [
    *(("RTX_5090", (5, 34), name, grid) for name, grid in [("pythia-410m", (8, 21)), ("pythia-1b", (8, 18)),
                                                           ("pythia-2.8b", (5, 34)), ("pythia-6.9b", (5, 34)),
                                                           ("gpt-neox-20b", (2, 85))]),
    *(("H100_GPCS", (2, 66), name, grid) for name, grid in [("pythia-410m", (4, 31)), ("pythia-1b", (8, 15)),
                                                            ("pythia-2.8b", (3, 42)), ("pythia-6.9b", (3, 42)),
                                                            ("gpt-neox-20b", (2, 66))]),
])  # fmt: skip
def test_emulated_plan_runs_the_pythia_sizes_in_one_wave_on_other_devices(emulated, device, out_proj, name, attn_mlp_in):
    # RTX_5090: sm_120, 170 SMs and 99 KiB of shared memory per block (an H100 has 227 KiB).
    # H100_GPCS: an H100 SXM whose GPCs hold 18, 18, 18, 16, 16, 16, 16 and 14 SMs runs only 31
    # clusters of 4 at once: Pythia-2.8B's 32 heads take clusters of 3 instead, and 10 more
    # clusters of 3 stream fc_in rows (126 blocks; heads x 3 alone would leave 36 SMs idle).
    # out_proj has no head to follow: 66 clusters of 2 fill all 132 SMs.
    with emulated.device(getattr(emulated, device)):
        plan = _emulated_plan(emulated, FULL_SIZE_LAYERS[name])
    assert (_grid(plan.attn_mlp_in), _grid(plan.out_proj)) == (attn_mlp_in, out_proj)
    for grid in (plan.attn_mlp_in, plan.out_proj):
        assert grid.max_active_clusters >= grid.clusters
        assert grid.smem <= getattr(emulated, device).shared_optin


@pytest.mark.parametrize("fc_in_clusters", ["none", "one", "all that fit"])
@pytest.mark.parametrize("name", ["d80-h8", "d256-h3"])
def test_emulated_layer_with_more_or_fewer_fc_in_clusters(emulated, name, fc_in_clusters):
    # The fc_in rows are split over the head blocks and the clusters past the heads by one formula
    # whatever their number: from none (a plan made before the device had room) to the most the
    # head blocks' shares allow.
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=14, device="cpu")
    x, k_cache, v_cache = _layer_inputs(shape, 70, seed=15, device="cpu")
    plan = _emulated_plan(emulated, shape, cluster_size=3)
    most = plan.attn_mlp_in.clusters
    plan.attn_mlp_in.clusters = {"none": shape.heads, "one": shape.heads + 1, "all that fit": most}[fc_in_clusters]
    assert most > shape.heads + 1
    emulated.take_streamed_bytes()
    _check_against_oracle(x, layer, shape, 70, k_cache, v_cache, functools.partial(_run_layer_emulated, emulated), plan=plan)
    assert emulated.take_streamed_bytes() == _layer_weight_bytes(shape)  # each weight byte once


@pytest.mark.parametrize("device, position, dtype", [("RTX_5090", 700, torch.float16), ("H100_GPCS", 1023, torch.float16),
                                                    ("H100_GPCS", 2047, torch.bfloat16)], ids=["RTX_5090", "H100_GPCS", "H100_GPCS-bf16"])
def test_emulated_pythia_2_8b_layer_on_other_devices(emulated, device, position, dtype):
    # With those devices' plans: on the RTX 5090 34 clusters of 5 (slices of 48 QKV rows and 16
    # dims per block, 2 clusters of fc_in rows only), on the uneven-GPC H100 42 clusters of 3 (10 of
    # fc_in rows only) and out_proj's own 66 clusters of 2; there also with bf16 weights and cache.
    shape = FULL_SIZE_LAYERS["pythia-2.8b"]
    layer = _random_layer(shape, seed=position, device="cpu", dtype=dtype)
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position + 1, device="cpu", dtype=dtype)
    with emulated.device(getattr(emulated, device)):
        _check_against_oracle(x, layer, shape, position, k_cache, v_cache,
                              functools.partial(_run_layer_emulated, emulated))


def test_emulated_c_abi_refuses_a_dtype_the_kernels_are_not_built_for(emulated):
    shape = fd._c_shape(ODD_LAYERS["d80-h8"], 1, torch.float16)
    shape.dtype = _lib.DTYPE_CODES[torch.float32]
    with pytest.raises(KernelError, match="unsupported"):
        emulated.call("neoxfuse_fused_decoder_plan", [ctypes.POINTER(fd._Shape), ctypes.c_int, ctypes.POINTER(fd._Plan)],
                      ctypes.byref(shape), 0, ctypes.byref(fd._Plan()))
    x, logits = torch.zeros(640), torch.zeros(7)
    weights = [torch.zeros(640), torch.zeros(640), torch.zeros(7, 640)]  # fp32
    with pytest.raises(KernelError, match="unsupported"):
        emulated.call("neoxfuse_fused_lm_head", fd._LM_HEAD_ARGTYPES, x.data_ptr(), *(w.data_ptr() for w in weights),
                      _lib.DTYPE_CODES[torch.float32], logits.data_ptr(), 640, 7, 1e-5, 132, 1, None)
    with pytest.raises(InvalidInputError, match="float16 or bfloat16 weights, not float32"):
        fd._c_shape(ODD_LAYERS["d80-h8"], 1, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hidden, vocab", [(640, 7), (2560, 1001)])
def test_emulated_lm_head_matches_fp32_oracle(emulated, hidden, vocab, dtype):
    x = torch.randn(hidden) * 3 + 1
    weight, bias = (1 + 0.1 * torch.randn(hidden)).to(dtype), (0.1 * torch.randn(hidden)).to(dtype)
    embed_out = (torch.randn(vocab, hidden) / math.sqrt(hidden)).to(dtype)
    logits = torch.full((vocab,), float("nan"))
    emulated.take_streamed_bytes()
    _emulated_lm_head(emulated, x, weight, bias, embed_out, 1e-5, logits)
    assert emulated.take_streamed_bytes() == 2 * vocab * hidden  # embed_out read once
    want = ref.layer_norm(x, weight.float(), bias.float(), 1e-5) @ embed_out.float().T
    assert rel_err(logits, want) < LOGITS_TOL


@pytest.mark.gpu
@pytest.mark.quick
def test_layer_is_bitwise_deterministic_with_and_without_pdl():
    shape = FULL_SIZE_LAYERS["pythia-2.8b"]
    layer = _random_layer(shape, seed=2)
    x, k_cache, v_cache = _layer_inputs(shape, 1500, seed=3)
    first = _run_layer(x, layer, shape, k_cache, v_cache, 1500)
    first_k = k_cache.clone()
    for pdl in (True, False, True):
        again = _run_layer(x, layer, shape, k_cache, v_cache, 1500, pdl=pdl)
        for name in first:
            assert torch.equal(again[name], first[name]), name
        assert torch.equal(k_cache.nan_to_num(7.0), first_k.nan_to_num(7.0))


@pytest.mark.gpu
def test_layers_chained_with_pdl_in_a_graph_equal_layers_run_one_at_a_time():
    # As the backend chains them: one workspace, ping-pong residuals, one CUDA graph. With PDL a
    # layer's kernels start while the previous drain, so a read before griddepcontrol.wait (or a
    # write into attn, mlp or a residual the previous kernel still reads) would change the result.
    shape = FULL_SIZE_LAYERS["pythia-2.8b"]
    layer, position, layers = _random_layer(shape, seed=6), 700, 6
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=7)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(layers)]  # slot p: rewritten alike by every run
    position_tensor = torch.tensor([position], dtype=torch.int32, device="cuda")
    residual = [x.clone(), torch.full_like(x, float("nan"))]
    workspace = fd.Workspace.allocate(shape, "cuda")

    def layer_call(index: int, pdl: bool) -> None:
        k, v = caches[index]
        fd.decoder_layer(residual[index % 2], layer, shape, k, v, position_tensor, out=residual[(index + 1) % 2],
                         workspace=workspace, pdl=pdl)

    for index in range(layers):
        layer_call(index, pdl=False)
        torch.cuda.synchronize()
    one_at_a_time = residual[layers % 2].clone()
    assert torch.isfinite(one_at_a_time).all()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(layers):
            layer_call(index, pdl=True)
    for _ in range(3):
        residual[0].copy_(x)
        residual[1].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(residual[layers % 2], one_at_a_time)


@pytest.mark.gpu
def test_device_position_past_the_cache_gives_nan_and_writes_nothing():
    shape = ODD_LAYERS["d80-h8"]
    layer = _random_layer(shape, seed=4)
    x, k_cache, v_cache = _layer_inputs(shape, 10, seed=5)
    k_before = k_cache.clone()
    position = torch.tensor([shape.max_positions], dtype=torch.int32, device="cuda")
    got = _run_layer(x, layer, shape, k_cache, v_cache, position)
    assert torch.isnan(got["y"]).all()
    assert torch.equal(k_cache.nan_to_num(7.0), k_before.nan_to_num(7.0))


@pytest.mark.gpu
def test_plan_uses_one_wave_of_clusters():
    for shape in FULL_SIZE_LAYERS.values():
        plan = fd.plan(shape)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        print(shape.head_dim, plan)
        assert plan.attn_mlp_in.clusters >= shape.heads
        for grid in (plan.attn_mlp_in, plan.out_proj):
            assert grid.blocks <= sms
            assert grid.max_active_clusters >= grid.clusters or grid.cluster_size == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hidden, vocab", [(2560, 50304), (4096, 1001), (640, 7)])
def test_lm_head_matches_fp32_oracle(hidden, vocab, dtype):
    x = torch.randn(hidden, device="cuda") * 3 + 1
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    embed_out = (torch.randn(vocab, hidden, device="cuda") / math.sqrt(hidden)).to(dtype)
    logits = torch.full((vocab,), float("nan"), device="cuda")
    fd.lm_head(x, weight, bias, embed_out, 1e-5, out=logits)
    want = ref.layer_norm(x, weight.float(), bias.float(), 1e-5) @ embed_out.float().T
    assert rel_err(logits, want) < LOGITS_TOL


# ------------------------------------------------------------------------------------------------
# The whole model through the `fused` backend (GPU).


@pytest.fixture(scope="module", params=["pythia-2.8b", "pythia-1.4b", "pythia-410m", "pythia-1b"])
def hf_models(request):
    """(fp16 HF model, fp32 HF model holding the same fp16-rounded weights), 2 layers, on the GPU."""
    config = pythia_config(request.param, num_hidden_layers=2)
    model16 = random_model(config, seed=0, dtype=torch.float16, device="cuda")
    model32 = copy.deepcopy(model16).float()
    return model16, model32


def _backend(model16, max_seq_len=2048, **kwargs) -> FusedBackend:
    return FusedBackend(from_hf(model16), max_seq_len, **kwargs)


@pytest.mark.gpu
@pytest.mark.quick
@torch.inference_mode()
def test_teacher_forced_logits_match_hf_over_64_steps(hf_models):
    # The prompt's KV cache comes from the fp16 PyTorch prefill (HF-fp16-like error, ~1e-3) and
    # every step reads an fp16 cache: both stay well under 1e-2; HF fp16's own error is printed.
    model16, model32 = hf_models
    tokens = torch.randint(0, model16.config.vocab_size, (80,), device="cuda")
    prompt, teacher = tokens[:16], tokens[16:]
    want = model32(tokens[None]).logits[0, 16:].float()  # [64, vocab]: after each teacher token
    hf16 = model16(tokens[None]).logits[0, 16:].float()
    backend = _backend(model16)
    cache = backend.new_cache()
    backend.prefill(prompt, cache)
    got = torch.stack([backend.decode_step(int(t), cache) for t in teacher])  # [64, vocab]
    err, hf16_err = rel_err(got, want), rel_err(hf16, want)
    print(f"teacher-forced logits: fused {err:.2e}, HF fp16 {hf16_err:.2e} (vs HF fp32 on the same weights)")
    assert cache.length == 80
    assert err < 1e-2


@pytest.mark.gpu
@torch.inference_mode()
def test_fused_engine_scores_a_text_as_hf_does(hf_models):
    # Teacher forced through the fused decode steps in windows of 128 tokens (every 64: the later
    # windows prefill their context), against HF fp32 on the same fp16 weights: the perplexity
    # within 0.1% (HF fp16's own difference is printed).
    model16, model32 = hf_models
    tokens = torch.randint(0, model16.config.vocab_size, (255,)).tolist()
    engine = Engine(model16, max_seq_len=128)
    assert engine.backend_name == "fused", engine.backend_reason
    got = engine.score(tokens, window=128, stride=64)
    want = hf_scores(model32, tokens, 128, 64)
    difference, hf16 = got.difference(want), hf_scores(model16, tokens, 128, 64).difference(want)
    print(f"perplexity vs HF fp32: fused {difference.relative_perplexity:.2e} relative (max |d NLL| {difference.max_abs_nll:.2e}, "
          f"top-1 {difference.top1_agreement:.3f}); HF fp16 {hf16.relative_perplexity:.2e} ({hf16.max_abs_nll:.2e}, {hf16.top1_agreement:.3f})")
    assert got.windows == 3 and difference.relative_perplexity < 1e-3


@pytest.mark.gpu
@torch.inference_mode()
def test_fused_engine_logprobs_and_logits_are_the_graphs_steps(hf_models):
    # Chosen in the step's CUDA graph, 32 steps a chunk, each step's logits copied out after its
    # replay: the logprobs and kept logits are bitwise those of decode steps from the same prefill.
    model16 = hf_models[0]
    engine = Engine(model16, max_seq_len=128)
    assert engine.backend_name == "fused", engine.backend_reason
    prompt = torch.randint(0, model16.config.vocab_size, (9,)).tolist()
    rule = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.3, sequence_bias={(7,): 2.0}, seed=3)
    out = engine.generate(prompt, 40, rule, logprobs=3, keep_logits=True)
    backend = FusedBackend(engine.weights, 128, use_graph=False)
    cache = backend.new_cache()
    logits = [backend.prefill(torch.tensor(prompt, device="cuda"), cache), *(backend.decode_step(t, cache) for t in out.tokens[:-1])]
    assert torch.equal(out.logits, torch.stack(logits))
    assert out.logprobs == logprobs_of(torch.stack(logits), torch.tensor(out.tokens, device="cuda"), 3)


@pytest.mark.gpu
@torch.inference_mode()
def test_fused_engine_loglikelihoods_are_hfs(hf_models):
    # lm-evaluation-harness's requests (neoxfuse.evaluation) through the fused decode steps: the
    # context prefilled in PyTorch, each continuation token's prediction a fused step, against HF
    # fp32 on the same fp16 weights. Bound: 2e-3 nats per continuation token (the CPU emulator's
    # measured per-token gap in the scoring test is 4.9e-4; fp16 activations and KV cache make it).
    model16, model32 = hf_models
    engine = Engine(model16, max_seq_len=128)
    assert engine.backend_name == "fused", engine.backend_reason
    vocab = model16.config.vocab_size
    for context_length, continuation_length in [(100, 5), (1, 20), (300, 10)]:  # the last cut to 129 tokens
        context = torch.randint(0, vocab, (context_length,)).tolist()
        continuation = torch.randint(0, vocab, (continuation_length,)).tolist()
        got = engine.loglikelihood(context, continuation)
        tokens = (context + continuation)[-129:]
        log_probs = torch.log_softmax(model32(torch.tensor([tokens[:-1]], device="cuda")).logits[0].float(), -1)
        targets = torch.tensor(tokens[-continuation_length:], device="cuda")
        want = float(log_probs[-continuation_length:].gather(-1, targets[:, None]).sum())
        print(f"context {context_length}, continuation {continuation_length}: |d logprob| {abs(got.logprob - want):.2e}")
        assert abs(got.logprob - want) < 2e-3 * continuation_length
        assert got.context_tokens == len(tokens) - continuation_length and not got.greedy
        own = engine.generate(context[-100:], continuation_length).tokens  # the fused steps' own greedy choices
        assert engine.loglikelihood(context[-100:], own).greedy
    # A context asked again is not prefilled again: bitwise what a new prefill gives.
    again = engine.loglikelihood(context, continuation)
    assert engine.loglikelihood(context, continuation) == again
    engine._prefilled = None
    assert engine.loglikelihood(context, continuation) == again


def _decisive(model16):
    """A copy whose greedy choice is never close: embed_in is scaled so each token's embedding
    dominates the residual stream, and embed_out row perm[t] is token t's unit embedding, so the
    logit of perm[t] leads the others by ~sqrt(hidden) (50 for 2560) while fp16 noise is ~1e-2."""
    model = copy.deepcopy(model16)
    g = torch.Generator(device="cpu").manual_seed(7)
    with torch.no_grad():
        embed_in = model.get_input_embeddings().weight  # [vocab, hidden]
        embed_in.mul_(250)
        unit = embed_in.float() / embed_in.float().norm(dim=1, keepdim=True)
        perm = torch.randperm(embed_in.shape[0], generator=g).to(embed_in.device)
        embed_out = model.get_output_embeddings().weight  # [vocab, hidden]
        embed_out[perm] = unit.to(embed_out.dtype)
    return model


def _hf_greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """HF's greedy tokens after prompt [T] (on the model's device), one cached decode step at a time."""
    tokens, out = [], model(prompt[None], use_cache=True)
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]], device=prompt.device), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.mark.gpu
@pytest.mark.quick
@torch.inference_mode()
def test_greedy_tokens_match_hf_fp16_for_128_tokens(hf_models):
    model = _decisive(hf_models[0])
    prompt = torch.randint(0, model.config.vocab_size, (8,), device="cuda")
    hf_tokens = _hf_greedy(model, prompt, 128)

    engine = Engine(model, max_seq_len=256)  # backend "auto": fused on an sm_90+ GPU in fp16
    assert engine.backend_name == "fused", engine.backend_reason
    generation = engine.generate(prompt.tolist(), max_new_tokens=128)
    assert generation.tokens == hf_tokens
    assert neoxfuse.hf._engine(model, "auto").backend_name == "fused"
    assert neoxfuse.hf.generate(model, prompt[None], max_new_tokens=128, eos_token_id=())[0, 8:].tolist() == hf_tokens


@pytest.mark.gpu
@torch.inference_mode()
def test_a_prefix_cache_on_the_fused_backend_gives_hf_greedy_tokens(hf_models):
    # Graph replays after the engine cut the kept cache back, and a prefill that continues it.
    model = _decisive(hf_models[0])
    engine = Engine(model, max_seq_len=256, prefix_cache=True)
    assert engine.backend_name == "fused", engine.backend_reason
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (8,)).tolist()
    first = engine.generate(prompt, 40)
    turn = prompt + first.tokens + torch.randint(0, vocab, (5,)).tolist()
    diverging = prompt[:5] + [(prompt[5] + 1) % vocab]
    for text, reused in [(turn, 8 + 39), (diverging, 5), (turn, 5)]:
        got = engine.generate(text, 40)
        assert got.reused_tokens == reused
        assert got.tokens == _hf_greedy(model, torch.tensor(text, device="cuda"), 40)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster_size", [1, 3, 8])
@pytest.mark.parametrize("name, position", BF16_CASES)
def test_bf16_layer_matches_fp32_oracle(name, position, cluster_size):
    shape = ODD_LAYERS[name]
    layer = _random_layer(shape, seed=cluster_size, dtype=torch.bfloat16)
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position, dtype=torch.bfloat16)
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache, cluster_size=cluster_size)


@pytest.mark.gpu
@pytest.mark.parametrize("name, position", [("pythia-2.8b", 0), ("pythia-2.8b", 2047), ("pythia-1b", 1023)])
def test_bf16_pythia_layer_matches_fp32_oracle(name, position):
    shape = FULL_SIZE_LAYERS[name]
    layer = _random_layer(shape, seed=1, dtype=torch.bfloat16)
    x, k_cache, v_cache = _layer_inputs(shape, position, seed=position, dtype=torch.bfloat16)
    _check_against_oracle(x, layer, shape, position, k_cache, v_cache)


@pytest.mark.gpu
@torch.inference_mode()
def test_bf16_model_decodes_fused_to_hf_logits_and_hf_bf16_greedy_tokens():
    # A bf16 HF model runs on the fused backend as it is (hf.generate keeps the model's dtype).
    model16 = random_model(pythia_config("pythia-2.8b", num_hidden_layers=2), seed=0, dtype=torch.bfloat16, device="cuda")
    tokens = torch.randint(0, model16.config.vocab_size, (80,), device="cuda")
    want = copy.deepcopy(model16).float()(tokens[None]).logits[0, 16:].float()  # [64, vocab]
    hf16_err = rel_err(model16(tokens[None]).logits[0, 16:].float(), want)
    backend = _backend(model16)
    cache = backend.new_cache()
    backend.prefill(tokens[:16], cache)
    err = rel_err(torch.stack([backend.decode_step(int(t), cache) for t in tokens[16:]]), want)
    print(f"teacher-forced logits: fused bf16 {err:.2e}, HF bf16 {hf16_err:.2e} (vs HF fp32 on the same weights)")
    assert err < BF16_LOGITS_TOL

    model = _decisive(model16)
    prompt = tokens[:8]
    hf_tokens = _hf_greedy(model, prompt, 64)
    assert neoxfuse.hf._engine(model, "auto").backend_name == "fused"
    assert neoxfuse.hf.generate(model, prompt[None], max_new_tokens=64, eos_token_id=())[0, 8:].tolist() == hf_tokens


@pytest.mark.gpu
@pytest.mark.quick
@torch.inference_mode()
def test_graph_replay_equals_eager_and_runs_are_bitwise_identical(hf_models):
    model16 = hf_models[0]
    tokens = torch.randint(0, model16.config.vocab_size, (24,), device="cuda")
    prefiller = _backend(model16, max_seq_len=64)
    prefilled = prefiller.new_cache()
    prefiller.prefill(tokens[:8], prefilled)  # once, shared: only the decode steps are under test

    def run(**kwargs):
        backend = _backend(model16, max_seq_len=64, **kwargs)
        cache = backend.new_cache()
        cache.k.copy_(prefilled.k)
        cache.v.copy_(prefilled.v)
        cache.length = 8
        logits = torch.stack([backend.decode_step(int(t), cache) for t in tokens[8:]])
        assert int(backend._position) == cache.length == 24  # the graph advanced the device position
        return logits

    graph = run()
    assert torch.equal(graph, run()), "two runs differ"
    assert torch.equal(graph, run(use_graph=False)), "graph replay differs from eager steps"
    assert torch.equal(graph, run(pdl=False)), "PDL changes results"


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("use_graph", [True, False])
@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.9, seed=5), *_PENALIZED, *_SUPPRESSING,
                                      *_BANNING, _MIN_P, _TYPICAL, *_BIASED, *_COUNTING],
                         ids=["greedy", "sampled", "greedy-penalized", "sampled-penalized", "greedy-suppressing",
                              "sampled-suppressing", "greedy-banning", "sampled-banning", "sampled-min-p", "sampled-typical",
                              "greedy-biased", "sampled-biased", "greedy-counting", "sampled-counting"])
def test_tokens_chosen_on_the_device_equal_tokens_chosen_from_decode_steps(hf_models, use_graph, sampling):
    # decode_tokens keeps each step's token on the device (written by the step: the argmax, or the
    # sampling kernel); decode_step returns logits for the host. Same kernels in the same order, the
    # same draws (the sampling kernel inside the graph, or after decode_step) from the same seed: the same tokens.
    model16 = hf_models[0]
    backend = _backend(model16, max_seq_len=64, use_graph=use_graph)
    prompt = torch.randint(0, model16.config.vocab_size, (8,), device="cuda")
    first, want, _ = _decode_step_tokens(backend, prompt, sampling, 21, "cuda")

    cache = backend.new_cache()  # the same storage, from position 0 again
    backend.prefill(prompt, cache)
    rng, history = sampling.rng("cuda"), _history(backend, prompt, first, sampling)
    counts = sampling.counts([first], backend.shape.vocab, "cuda")
    clock = StepClock(torch.device("cuda"))
    got = backend.decode_tokens(first, cache, 12, sampling, rng, clock, history, counts=counts).tolist()
    assert len(clock.intervals_ms()) == 12 and all(ms > 0 for ms in clock.intervals_ms())
    got += backend.decode_tokens(got[-1], cache, 8, sampling, rng, StepClock(torch.device("cuda")), history, counts=counts).tolist()
    assert got == want[:20]
    assert cache.length == int(backend._position) == 28
    assert next_token(backend.decode_step(got[-1], cache), sampling, rng, history, counts=counts) == want[20]  # decode_step goes on


@pytest.mark.gpu
@torch.inference_mode()
def test_decode_past_the_cache_and_bad_tokens_raise_before_running(hf_models):
    backend = _backend(hf_models[0], max_seq_len=8)
    cache = backend.new_cache()
    backend.prefill(torch.arange(8, device="cuda"), cache)
    with pytest.raises(SequenceTooLongError):
        backend.decode_step(1, cache)
    cache.length = 3
    with pytest.raises(InvalidInputError, match="token ids"):
        backend.decode_step(hf_models[0].config.vocab_size, cache)
    with pytest.raises(SequenceTooLongError):
        backend.decode_tokens(1, cache, 6, SamplingParams(), None, StepClock(torch.device("cuda")))
    assert cache.length == 3
