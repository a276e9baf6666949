"""kernels/ln_residual through neoxfuse.ops.ln_residual: fused residual add + one or two LayerNorms.

CPU: every bad input is a clear error (shape and dtype before device), the launch plan (vector
or scalar path, block size) for sizes, strides and offsets, the C launcher's own checks, the fake
implementations under torch.compile, and the oracle's LayerNorm itself.
GPU: the kernel against an fp64 oracle over dtype x hidden x tokens x variant x layout, outputs
poisoned with NaN first; functional ops, CUDA graphs, torch.compile, the largest rows.
The `test_emulated_*` tests run the same kernel code on the CPU through the emulated library
(tests/emulator, the `emulated` fixture of conftest.py) against the same oracle and tolerances,
plus every combination of residuals, LayerNorms and h the C ABI allows, and both thread orders.
"""

import ctypes
import itertools
import math

import pytest
import torch

from neoxfuse import _lib
from neoxfuse.errors import InvalidInputError, KernelError, NoGPUError, UnsupportedDeviceError
from neoxfuse.ops import ln_residual
from neoxfuse.ops.ln_residual import (
    MAX_HIDDEN,
    add_dual_layernorm,
    add_layernorm,
    dual_layernorm,
    launch_plan,
    layernorm,
    ln_residual_out,
)
from neoxfuse.reference import layer_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PYTHIA_HIDDEN = [512, 768, 1024, 2048, 2560, 4096, 5120]
ODD_HIDDEN = [111, 500, 2561]
TOKENS = [1, 7, 128, 4096]
LAYOUTS = ["contiguous", "strided", "offset"]
EPS = 1e-5
# Run again under compute-sanitizer by the GPU pipeline (conftest.py): both paths (scalar at 111,
# 16-byte at 2560) of every variant with strided / offset rows, and the largest rows.
SANITIZE = (
    "test_kernel_matches_the_oracle[torch.float16-111-7-*-strided]",
    "test_kernel_matches_the_oracle[torch.bfloat16-2560-7-*-offset]",
    "test_largest_rows[*-torch.float16]",
)

# (residuals, LayerNorms, h written): every case the kernel serves.
VARIANTS = {
    "layernorm": (0, 1, False),  # plain LayerNorm
    "dual_layernorm": (0, 2, False),  # LN1, LN2 of a parallel block's input
    "add_layernorm": (1, 1, True),  # sequential block: a = attn + h, LN2(a)
    "add_dual_layernorm": (2, 2, True),  # parallel block: h' = mlp + attn + h, LN1'(h'), LN2'(h')
    "final": (2, 1, False),  # last layer's adds + final LayerNorm, h not written
}

# Relative error ||y - ref|| / ||ref|| allowed per dtype, against an fp64 LayerNorm of the h the
# kernel wrote (h itself must match bit for bit: see _reference).
REL_TOL = {
    # fp32 statistics over <= 5120 values and rsqrtf (<= 2 ulp): ~1e-7 per element, 1e-5 leaves room.
    torch.float32: 1e-5,
    # the output rounded to fp16: at most 2^-11 = 4.9e-4 relative per element, ~2.8e-4 RMS.
    torch.float16: 1e-3,
    # the output rounded to bf16: at most 2^-8 = 3.9e-3 relative per element, ~2.3e-3 RMS.
    torch.bfloat16: 8e-3,
}
# Per element: |y - ref| <= atol + rtol * |ref|, rtol just over half an ulp of the output dtype
# plus the fp32 arithmetic; atol for values near zero, where fp32's error is absolute.
ELEMENT_TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-4),
}


def _vector_width(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def _rows_in(rows, hidden, pad, offset, dtype, device):
    """A [rows, hidden] view into a NaN-filled [rows, hidden + pad] buffer starting `offset` elements in."""
    storage = torch.full((offset + rows * (hidden + pad),), float("nan"), dtype=dtype, device=device)
    return storage[offset:].view(rows, hidden + pad)[:, :hidden]


def _inputs(rows, hidden, n_residuals, n_norms, dtype, device, layout="contiguous"):
    """Fresh random x, residuals, weights, biases. x is offset from zero, so the statistics are
    tested for cancellation. layout: contiguous rows; rows padded by 8 (x) and 16 (residuals)
    elements, which keeps 16-byte alignment; or views one element in (the scalar path). Pads
    hold NaN, so a read past a row's end shows."""
    pad_x, pad_r = (8, 16) if layout == "strided" else (0, 0)
    offset = 1 if layout == "offset" else 0
    x = _rows_in(rows, hidden, pad_x, offset, dtype, device).copy_(torch.randn(rows, hidden, device=device) + 3)
    residuals = [
        _rows_in(rows, hidden, pad_r, offset, dtype, device).copy_(torch.randn(rows, hidden, device=device))
        for _ in range(n_residuals)
    ]
    weights = [(1 + 0.1 * torch.randn(hidden, device=device)).to(dtype) for _ in range(n_norms)]
    biases = [(0.1 * torch.randn(hidden, device=device)).to(dtype) for _ in range(n_norms)]
    return x, residuals, weights, biases


def _outputs(x, n_norms, write_sum, layout):
    """NaN-poisoned outputs like x: contiguous, or padded rows (pad 24) whose pad must stay NaN."""
    rows, hidden = x.shape
    pad = 24 if layout == "strided" else 0
    offset = 1 if layout == "offset" else 0
    outs = [_rows_in(rows, hidden, pad, offset, x.dtype, x.device) for _ in range(n_norms)]
    return outs, (_rows_in(rows, hidden, pad, offset, x.dtype, x.device) if write_sum else None)


def _reference(x, residuals, weights, biases, eps):
    """(h, [y_k]): h in x's dtype from an fp32 sum in the kernel's order (x + r0 + r1), so the
    kernel's h must equal it exactly; y_k = LayerNorm in fp64 of that h."""
    h32 = x.float()
    for r in residuals:
        h32 = h32 + r.float()
    h = h32.to(x.dtype)
    ys = [layer_norm(h.double(), w.double(), b.double(), eps) for w, b in zip(weights, biases)]
    return h, ys


def _assert_close(y, ref, dtype):
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3g} > {REL_TOL[dtype]} for {dtype}"
    rtol, atol = ELEMENT_TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# CPU: the oracle, bad input, launch plans, the C checks, fake implementations.


@pytest.mark.parametrize("hidden", [1, 2, 111, 2560])
def test_reference_layer_norm_is_torch_layer_norm(hidden):
    x = torch.randn(5, hidden, dtype=torch.float64) * 3 + 7
    w, b = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    expected = torch.nn.functional.layer_norm(x, (hidden,), w, b, EPS)
    torch.testing.assert_close(layer_norm(x, w, b, EPS), expected, rtol=1e-12, atol=1e-12)


def _cpu_call(**changes):
    """An add_dual_layernorm call on CPU tensors [3, 64] fp16, with `changes` applied."""
    x = torch.randn(3, 64, dtype=torch.float16)
    call = {
        "x": x,
        "residuals": [torch.randn_like(x), torch.randn_like(x)],
        "weights": [torch.randn(64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)],
        "biases": [torch.randn(64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)],
        "eps": EPS,
    }
    call.update(changes)
    return call


BAD_CALLS = {
    "x not a tensor": (dict(x=[1.0, 2.0]), "x must be a torch.Tensor"),
    "x integer": (dict(x=torch.ones(3, 64, dtype=torch.int32)), "x must be float32, float16 or bfloat16"),
    "x float64": (dict(x=torch.ones(3, 64, dtype=torch.float64)), "x must be float32, float16 or bfloat16"),
    "x scalar": (dict(x=torch.tensor(1.0, dtype=torch.float16)), r"shape \[..., hidden\]"),
    "hidden 0": (dict(x=torch.ones(3, 0, dtype=torch.float16)), r"shape \[..., hidden\]"),
    "hidden too large": (dict(x=torch.ones(1, MAX_HIDDEN + 1, dtype=torch.float16)), f"over {MAX_HIDDEN}"),
    "three residuals": (dict(residuals=[torch.ones(3, 64, dtype=torch.float16)] * 3), "at most two residuals"),
    "residuals a tensor": (dict(residuals=torch.ones(3, 64, dtype=torch.float16)), "residuals must be a list"),
    "residuals None": (dict(residuals=None), "residuals must be a list"),
    "residual dtype": (dict(residuals=[torch.ones(3, 64)]), r"residuals\[0\] must be float16 like x, got float32"),
    "residual shape": (dict(residuals=[torch.ones(3, 65, dtype=torch.float16)]), r"residuals\[0\] must have shape \[3, 64\]"),
    "residual broadcast": (dict(residuals=[torch.ones(1, 64, dtype=torch.float16)]), r"residuals\[0\] must have shape \[3, 64\]"),
    "no weights": (dict(weights=[], biases=[]), "one or two LayerNorms"),
    "three weights": (dict(weights=[torch.ones(64, dtype=torch.float16)] * 3, biases=[torch.ones(64, dtype=torch.float16)] * 3), "one or two"),
    "bias missing": (dict(biases=[torch.ones(64, dtype=torch.float16)]), "2 weights, 1 biases"),
    "weight shape": (dict(weights=[torch.ones(63, dtype=torch.float16)] * 2), r"weights\[0\] must have shape \[64\]"),
    "weight dtype": (dict(weights=[torch.ones(64, dtype=torch.bfloat16)] * 2), r"weights\[0\] must be float16 like x"),
    "bias not a tensor": (dict(biases=[0.0, 0.0]), r"biases\[0\] must be a torch.Tensor"),
    "eps negative": (dict(eps=-1e-5), "eps must be a finite number >= 0"),
    "eps nan": (dict(eps=math.nan), "eps must be a finite number >= 0"),
    "eps bool": (dict(eps=True), "eps must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_is_a_clear_error_before_the_device_is_looked_at(case):
    changes, message = BAD_CALLS[case]
    call = _cpu_call(**changes)
    with pytest.raises(InvalidInputError, match=message):
        add_dual_layernorm(call["x"], call["residuals"], call["weights"], call["biases"], call["eps"])


def test_bad_input_to_the_out_op_is_a_clear_error():
    call = _cpu_call()
    x = call["x"]
    with pytest.raises(InvalidInputError, match="one output per LayerNorm: 2 weights but 1 outs"):
        ln_residual_out(**call, outs=[torch.empty_like(x)])
    with pytest.raises(InvalidInputError, match=r"outs\[1\] must have shape \[3, 64\]"):
        ln_residual_out(**call, outs=[torch.empty_like(x), torch.empty(64, dtype=torch.float16)])
    with pytest.raises(InvalidInputError, match="h_out must be float16 like x"):
        ln_residual_out(**call, outs=[torch.empty_like(x), torch.empty_like(x)], h_out=torch.empty(3, 64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("op", ["layernorm", "dual_layernorm", "add_layernorm", "add_dual_layernorm", "out"])
def test_cpu_tensors_on_a_machine_without_gpu_say_so(op):
    call = _cpu_call()
    x, rs, ws, bs = call["x"], call["residuals"], call["weights"], call["biases"]
    calls = {
        "layernorm": lambda: layernorm(x, ws[0], bs[0], residuals=rs),
        "dual_layernorm": lambda: dual_layernorm(x, ws, bs),
        "add_layernorm": lambda: add_layernorm(x, rs[:1], ws[0], bs[0]),
        "add_dual_layernorm": lambda: add_dual_layernorm(x, rs, ws, bs),
        "out": lambda: ln_residual_out(x, rs, ws, bs, EPS, [torch.empty_like(x), torch.empty_like(x)]),
    }
    with pytest.raises(NoGPUError, match="need a CUDA GPU"):
        calls[op]()


def test_plan_takes_16_byte_chunks_where_aligned():
    for dtype in DTYPES:
        for hidden in PYTHIA_HIDDEN:
            x, residuals, weights, biases = _inputs(3, hidden, 2, 2, dtype, "cpu")
            outs, h = _outputs(x, 2, True, "contiguous")
            plan = launch_plan(x, residuals, weights, biases, outs=outs, h_out=h)
            width = _vector_width(dtype)
            assert plan.vector_width == width
            assert plan.threads % 32 == 0 and plan.threads <= 512
            assert plan.threads * plan.chunks_per_thread * width >= hidden
            assert (plan.threads - 32) * plan.chunks_per_thread * width < hidden  # no idle warp
            assert plan.chunks_per_thread * width <= 32


def test_plan_for_pythia_2p8b_decode_is_one_chunk_per_thread():
    x, residuals, weights, biases = _inputs(1, 2560, 2, 2, torch.float16, "cpu")
    outs, h = _outputs(x, 2, True, "contiguous")
    assert launch_plan(x, residuals, weights, biases, outs=outs, h_out=h) == (8, 1, 320)


def test_plan_keeps_16_byte_chunks_for_aligned_strided_rows():
    x, residuals, weights, biases = _inputs(5, 2560, 2, 2, torch.float16, "cpu", layout="strided")
    outs, h = _outputs(x, 2, True, "strided")
    assert launch_plan(x, residuals, weights, biases, outs=outs, h_out=h).vector_width == 8


def test_plan_keeps_16_byte_chunks_for_one_row_whatever_its_stride():
    # Decode: one row has no stride to speak of, so an odd one (a row of a wider buffer) keeps the
    # 16-byte path, in the op and in the C plan, which sees the stride as given.
    x, residuals, weights, biases = _inputs(1, 2560, 2, 2, torch.float16, "cpu")
    x = _rows_in(1, 2560, 3, 0, torch.float16, "cpu").copy_(x)
    outs, h = _outputs(x, 2, True, "contiguous")
    assert x.stride(0) == 2563
    assert launch_plan(x, residuals, weights, biases, outs=outs, h_out=h).vector_width == 8
    plan = _lib.function("neoxfuse_ln_residual_plan", [ctypes.POINTER(ln_residual._Args), ctypes.POINTER(ln_residual._Launch)])
    for rows, width in [(1, 8), (2, 1)]:
        launch = ln_residual._Launch()
        assert plan(ctypes.byref(_c_args(rows=rows, x_stride=67)), ctypes.byref(launch)) == 0
        assert launch.vector_width == width


@pytest.mark.parametrize(
    "case",
    ["odd hidden", "odd hidden 2561", "offset view", "odd row stride", "offset output", "offset weight"],
)
def test_plan_falls_back_to_the_scalar_path(case):
    hidden = {"odd hidden": 111, "odd hidden 2561": 2561}.get(case, 2560)
    x, residuals, weights, biases = _inputs(4, hidden, 1, 1, torch.float16, "cpu", layout="offset" if case == "offset view" else "contiguous")
    outs, _ = _outputs(x, 1, False, "offset" if case == "offset output" else "contiguous")
    if case == "odd row stride":
        x = _rows_in(4, hidden, 3, 0, torch.float16, "cpu")
    if case == "offset weight":
        weights = [torch.randn(hidden + 1, dtype=torch.float16)[1:]]
    plan = launch_plan(x, residuals, weights, biases, outs=outs)
    assert plan.vector_width == 1
    assert plan.threads <= 512 and plan.threads * plan.chunks_per_thread >= hidden


def test_plan_covers_the_largest_rows():
    for dtype in DTYPES:
        for hidden in [MAX_HIDDEN, MAX_HIDDEN - 1]:
            x, _, weights, biases = _inputs(2, hidden, 0, 1, dtype, "cpu")
            plan = launch_plan(x, [], weights, biases, outs=[torch.empty_like(x)])
            assert plan.threads == 512 and plan.threads * plan.chunks_per_thread * plan.vector_width >= hidden


BAD_LAYOUTS = {
    "last dim strided": (lambda x: x.t().contiguous().t(), "x must be contiguous in its last dim"),
    "rows not evenly strided": (lambda x: torch.randn(2, 3, 8, 64, dtype=x.dtype)[:, :, :2], "evenly strided rows"),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_bad_input_layout_is_a_clear_error(case):
    make, message = BAD_LAYOUTS[case]
    call = _cpu_call()
    x = make(call["x"])
    residuals = [torch.randn(x.shape, dtype=x.dtype)]
    with pytest.raises(InvalidInputError, match=message):
        launch_plan(x, residuals, call["weights"], call["biases"], outs=[torch.empty(x.shape, dtype=x.dtype)] * 2)


def test_bad_output_layout_is_a_clear_error():
    call = _cpu_call()
    x, rs, ws, bs = call["x"], call["residuals"], call["weights"], call["biases"]
    fresh = lambda: torch.empty_like(x)  # noqa: E731
    with pytest.raises(InvalidInputError, match=r"rows of output outs\[0\] overlap each other"):
        launch_plan(x, rs, ws, bs, outs=[torch.empty(64, dtype=x.dtype).expand(3, 64), fresh()])
    with pytest.raises(InvalidInputError, match=r"output outs\[0\] overlaps x"):
        launch_plan(x, rs, ws, bs, outs=[x, fresh()])
    with pytest.raises(InvalidInputError, match=r"output h_out overlaps residuals\[1\]"):
        launch_plan(x, rs, ws, bs, outs=[fresh(), fresh()], h_out=rs[1])
    both = torch.empty(3, 96, dtype=x.dtype)
    with pytest.raises(InvalidInputError, match=r"output outs\[0\] overlaps outs\[1\]"):
        launch_plan(x, rs, ws, bs, outs=[both[:, :64], both[:, 32:]])
    shared = torch.empty(4, 64, dtype=x.dtype)
    with pytest.raises(InvalidInputError, match=r"output outs\[1\] overlaps weights\[0\]"):
        launch_plan(x, rs, [shared[2], ws[1]], bs, outs=[fresh(), shared[1:]])
    with pytest.raises(InvalidInputError, match=r"weights\[1\] must be contiguous"):
        launch_plan(x, rs, [ws[0], torch.randn(128, dtype=x.dtype)[::2]], bs, outs=[fresh(), fresh()])


def test_outputs_interleaved_in_one_packed_buffer_are_accepted():
    # [rows, 3, hidden]: h, y1, y2 of a row side by side; rows of each are 3 * hidden apart.
    call = _cpu_call()
    x, rs, ws, bs = call["x"], call["residuals"], call["weights"], call["biases"]
    packed = torch.empty(3, 3, 64, dtype=x.dtype)
    plan = launch_plan(x, rs, ws, bs, outs=[packed[:, 1], packed[:, 2]], h_out=packed[:, 0])
    assert plan.vector_width == 8


def _c_args(**changes):
    """C arguments of a valid 2-row fp16 call at made-up aligned addresses, `changes` applied."""
    args = ln_residual._Args(dtype=1, eps=EPS, rows=2, hidden=64, x=0x1000, x_stride=64, h=0x2000, h_stride=64)
    args.weight[0], args.bias[0], args.y[0], args.y_stride[0] = 0x3000, 0x4000, 0x5000, 64
    for name, value in changes.items():
        if "[" in name:
            field, index = name[:-1].split("[")
            getattr(args, field)[int(index)] = value
        else:
            setattr(args, name, value)
    return args


C_STATUS = {
    "valid": ({}, 0),
    "bad dtype": ({"dtype": 7}, 1),
    "negative rows": ({"rows": -1}, 1),
    "hidden 0": ({"hidden": 0}, 1),
    "no x": ({"x": None}, 1),
    "no y[0]": ({"y[0]": None}, 1),
    "y[1] without weight": ({"y[1]": 0x6000, "y_stride[1]": 64}, 1),
    "output rows overlap": ({"y_stride[0]": 63}, 1),
    "h rows overlap": ({"h_stride": 8}, 1),
    "negative input stride": ({"x_stride": -64}, 1),
    "eps negative": ({"eps": -1.0}, 1),
    "eps inf": ({"eps": math.inf}, 1),
    "hidden too large": ({"hidden": MAX_HIDDEN + 1, "x_stride": 1 << 20, "h_stride": 1 << 20, "y_stride[0]": 1 << 20}, 3),
    "rows past 2^31": ({"rows": 1 << 31}, 3),
}


@pytest.mark.parametrize("case", C_STATUS)
def test_the_c_launcher_checks_its_own_arguments(case):
    changes, status = C_STATUS[case]
    plan = _lib.function("neoxfuse_ln_residual_plan", [ctypes.POINTER(ln_residual._Args), ctypes.POINTER(ln_residual._Launch)])
    launch = ln_residual._Launch()
    assert plan(ctypes.byref(_c_args(**changes)), ctypes.byref(launch)) == status


def test_the_c_launcher_refuses_a_null_argument_block():
    run = _lib.function("neoxfuse_ln_residual", [ctypes.c_void_p, ctypes.c_void_p])
    with pytest.raises(KernelError, match="invalid argument"):
        _lib.call(run, None, None)


def test_fake_implementations_give_output_shapes_without_running():
    x = torch.empty(2, 5, 2561, dtype=torch.bfloat16, device="meta")
    w = torch.empty(2561, dtype=torch.bfloat16, device="meta")
    before = ln_residual.launch_count()
    assert layernorm(x, w, w).shape == x.shape
    assert [t.shape for t in dual_layernorm(x, [w, w], [w, w])] == [x.shape] * 2
    assert [t.shape for t in add_layernorm(x, [x], w, w)] == [x.shape] * 2
    assert [t.shape for t in add_dual_layernorm(x, [x, x], [w, w], [w, w])] == [x.shape] * 3
    assert ln_residual.launch_count() == before


def test_torch_compile_traces_the_ops_in_one_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def block(x, attn, mlp, w1, b1, w2, b2):
        h, ln1, ln2 = add_dual_layernorm(mlp, [attn, x], [w1, w2], [b1, b2])
        return layernorm(ln1, w1, b1, residuals=[ln2, h])

    x = torch.empty(7, 64, dtype=torch.float16, device="meta")
    w = torch.empty(64, dtype=torch.float16, device="meta")
    out = torch.compile(block, backend=backend, fullgraph=True)(x, x, x, w, w, w, w)
    assert out.shape == x.shape
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.neoxfuse.ln_residual.default) == 2


# ---------------------------------------------------------------------------------------------
# GPU: the kernel against the oracle (the helpers also serve the emulated tests below).


_RUN_ARGTYPES = [ctypes.POINTER(ln_residual._Args), ctypes.c_void_p]
_PLAN_ARGTYPES = [ctypes.POINTER(ln_residual._Args), ctypes.POINTER(ln_residual._Launch)]


def _run_out(x, residuals, weights, biases, write_sum, layout, emulated=None):
    """NaN-poisoned outputs (_outputs) written by the kernel: on the GPU, or on the CPU through the
    `emulated` library (conftest.py) when given one."""
    outs, h = _outputs(x, len(weights), write_sum, layout)
    if emulated is not None:  # every tensor a guarded copy (conftest.py): an access past its end faults
        x, residuals, weights, biases, outs = [
            emulated.guarded(t) if isinstance(t, torch.Tensor) else [emulated.guarded(u) for u in t]
            for t in (x, residuals, weights, biases, outs)
        ]
        h = None if h is None else emulated.guarded(h)
        ln_residual._check_values(x, residuals, weights, biases, EPS, outs, h)
        args = ln_residual._args(x, residuals, weights, biases, EPS, outs, h)
        emulated.call("neoxfuse_ln_residual", _RUN_ARGTYPES, ctypes.byref(args), None)
        return outs, h
    ln_residual_out(x, residuals, weights, biases, EPS, outs, h)
    torch.cuda.synchronize()
    return outs, h


def _plan(x, residuals, weights, biases, outs, emulated=None):
    """launch_plan, or the emulated library's plan of the same call."""
    if emulated is None:
        return launch_plan(x, residuals, weights, biases, outs=outs)
    launch = ln_residual._Launch()
    args = ln_residual._args(x, residuals, weights, biases, EPS, outs, None)
    emulated.call("neoxfuse_ln_residual_plan", _PLAN_ARGTYPES, ctypes.byref(args), ctypes.byref(launch))
    return ln_residual.LaunchPlan(launch.vector_width, launch.chunks_per_thread, launch.threads)


def _check_outputs(x, residuals, weights, biases, outs, h, layout):
    """h (None: not written) bit for bit, each y within the dtype's tolerance of the oracle, every
    element written, and the pads of strided outputs untouched."""
    tokens, hidden = x.shape
    h_ref, ys_ref = _reference(x, residuals, weights, biases, EPS)
    if h is not None:
        assert torch.equal(h, h_ref), "h must be the fp32 sum rounded once"
    for y, y_ref in zip(outs, ys_ref):
        assert not y.isnan().any(), "an output element was not written"
        _assert_close(y, y_ref, x.dtype)
    if layout == "strided":  # the pad between rows is never written
        for out in [*outs, *([h] if h is not None else [])]:
            padded = out.as_strided((tokens, hidden + 24), (hidden + 24, 1))
            assert padded[:, hidden:].isnan().all()


def _check_kernel(dtype, hidden, tokens, variant, layout, emulated=None):
    """A case of test_kernel_matches_the_oracle: on the GPU, or on the CPU through `emulated`."""
    n_residuals, n_norms, write_sum = VARIANTS[variant]
    device = "cuda" if emulated is None else "cpu"
    x, residuals, weights, biases = _inputs(tokens, hidden, n_residuals, n_norms, dtype, device, layout)
    plan = _plan(x, residuals, weights, biases, _outputs(x, n_norms, write_sum, layout)[0], emulated)
    vectorized = layout != "offset" and hidden % _vector_width(dtype) == 0
    assert plan.vector_width == (_vector_width(dtype) if vectorized else 1)

    outs, h = _run_out(x, residuals, weights, biases, write_sum, layout, emulated)
    _check_outputs(x, residuals, weights, biases, outs, h, layout)


@pytest.mark.gpu
def test_a_gpu_without_code_in_the_library_is_refused_before_the_launch(monkeypatch):
    monkeypatch.setattr(_lib, "missing_code", lambda index: f"no code for cuda:{index}, as pretended")
    x, weight, bias = (torch.randn(2560, device="cuda", dtype=torch.float16) for _ in range(3))
    with pytest.raises(UnsupportedDeviceError, match="as pretended"):
        layernorm(x, weight, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", PYTHIA_HIDDEN + ODD_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_the_oracle(dtype, hidden, tokens, variant, layout):
    _check_kernel(dtype, hidden, tokens, variant, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2560), (3, 5, 111), (128, 2561), (2, 64, 5120)])
def test_functional_ops_match_the_oracle(dtype, shape):
    hidden = shape[-1]
    x = (torch.randn(shape, device="cuda") + 3).to(dtype)
    rs = [torch.randn(shape, device="cuda").to(dtype) for _ in range(2)]
    ws = [(1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype) for _ in range(2)]
    bs = [(0.1 * torch.randn(hidden, device="cuda")).to(dtype) for _ in range(2)]

    (y,) = [layernorm(x, ws[0], bs[0])]
    _assert_close(y, _reference(x, [], ws[:1], bs[:1], EPS)[1][0], dtype)
    y = layernorm(x, ws[0], bs[0], residuals=rs)
    _assert_close(y, _reference(x, rs, ws[:1], bs[:1], EPS)[1][0], dtype)
    for y, ref in zip(dual_layernorm(x, ws, bs), _reference(x, [], ws, bs, EPS)[1]):
        _assert_close(y, ref, dtype)
    h, y = add_layernorm(x, rs[:1], ws[0], bs[0])
    h_ref, (y_ref,) = _reference(x, rs[:1], ws[:1], bs[:1], EPS)
    assert torch.equal(h, h_ref)
    _assert_close(y, y_ref, dtype)
    h, y1, y2 = add_dual_layernorm(x, rs, ws, bs)
    h_ref, ys_ref = _reference(x, rs, ws, bs, EPS)
    assert torch.equal(h, h_ref) and h.shape == x.shape and h.is_contiguous()
    _assert_close(y1, ys_ref[0], dtype)
    _assert_close(y2, ys_ref[1], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [MAX_HIDDEN, MAX_HIDDEN - 1, 8191])
def test_largest_rows(dtype, hidden):
    x, residuals, weights, biases = _inputs(3, hidden, 2, 2, dtype, "cuda")
    outs, h = _run_out(x, residuals, weights, biases, True, "contiguous")
    h_ref, ys_ref = _reference(x, residuals, weights, biases, EPS)
    assert torch.equal(h, h_ref)
    for y, ref in zip(outs, ys_ref):
        _assert_close(y, ref, dtype)


@pytest.mark.gpu
def test_prefill_shape_16k_tokens():
    x, residuals, weights, biases = _inputs(16384, 2560, 2, 2, torch.float16, "cuda")
    outs, h = _run_out(x, residuals, weights, biases, True, "contiguous")
    h_ref, ys_ref = _reference(x, residuals, weights, biases, EPS)
    assert torch.equal(h, h_ref)
    for y, ref in zip(outs, ys_ref):
        _assert_close(y, ref, torch.float16)


@pytest.mark.gpu
def test_constant_rows_normalise_to_the_bias():
    # var = 0: y = (h - mean) * rsqrt(eps) * w + b = b exactly.
    x = torch.full((4, 2560), 7.0, dtype=torch.float16, device="cuda")
    w, b = torch.randn(2560, device="cuda").half(), torch.randn(2560, device="cuda").half()
    y = layernorm(x, w, b)
    assert torch.equal(y, b.expand_as(y))


@pytest.mark.gpu
def test_zero_tokens_launch_nothing():
    x = torch.empty(0, 2560, dtype=torch.float16, device="cuda")
    w = torch.ones(2560, dtype=torch.float16, device="cuda")
    h, y1, y2 = add_dual_layernorm(x, [x], [w, w], [w, w])
    assert h.shape == y1.shape == y2.shape == (0, 2560)


@pytest.mark.gpu
def test_one_device_for_all_tensors():
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(InvalidInputError, match="one device"):
        layernorm(x, torch.ones(64), torch.zeros(64, device="cuda"))


@pytest.mark.gpu
def test_counts_launches():
    x = torch.randn(2, 64, device="cuda")
    w = torch.ones(64, device="cuda")
    before = ln_residual.launch_count()
    layernorm(x, w, w)
    add_dual_layernorm(x, [x], [w, w], [w, w])
    assert ln_residual.launch_count() == before + 2


@pytest.mark.gpu
def test_replays_in_a_cuda_graph():
    x, residuals, weights, biases = _inputs(1, 2560, 2, 2, torch.float16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        add_dual_layernorm(x, residuals, weights, biases)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, y1, y2 = add_dual_layernorm(x, residuals, weights, biases)
    for _ in range(3):
        x.copy_(torch.randn_like(x.float()).half())
        residuals[0].copy_(torch.randn_like(x.float()).half())
        graph.replay()
        torch.cuda.synchronize()
        h_ref, ys_ref = _reference(x, residuals, weights, biases, EPS)
        assert torch.equal(h, h_ref)
        _assert_close(y1, ys_ref[0], torch.float16)
        _assert_close(y2, ys_ref[1], torch.float16)


@pytest.mark.gpu
def test_runs_under_torch_compile_with_inductor():
    def block(x, attn, mlp, w1, b1, w2, b2):
        h, ln1, ln2 = add_dual_layernorm(mlp, [attn, x], [w1, w2], [b1, b2])
        return h * 2, ln1 + ln2

    x, (attn, mlp), (w1, w2), (b1, b2) = _inputs(7, 2560, 2, 2, torch.float16, "cuda")
    compiled = torch.compile(block, fullgraph=True)
    before = ln_residual.launch_count()
    got = compiled(x, attn, mlp, w1, b1, w2, b2)
    assert ln_residual.launch_count() == before + 1
    expected = block(x, attn, mlp, w1, b1, w2, b2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Emulated: the kernel code on the CPU (tests/emulator) against the same oracle and tolerances.

# The GPU test's variants and layouts, sized for 2 CPU cores: 1 and 7 rows of Pythia-70M (512),
# -2.8B (2560) and the odd sizes; 1 row of Pythia-12B (5120: fp32 holds 4 chunks per thread and
# loads the weights after the statistics); a few cases at 128 rows.
EMULATED_CASES = [
    *itertools.product(DTYPES, [512, 2560] + ODD_HIDDEN, [1, 7], VARIANTS, LAYOUTS),
    *itertools.product(DTYPES, [5120], [1], VARIANTS, LAYOUTS),
    (torch.float16, 2560, 128, "add_dual_layernorm", "strided"),
    (torch.bfloat16, 2561, 128, "final", "contiguous"),
    (torch.float32, 5120, 128, "add_layernorm", "offset"),
]


@pytest.mark.parametrize("dtype, hidden, tokens, variant, layout", EMULATED_CASES, ids=str)
def test_emulated_kernel_matches_the_oracle(emulated, dtype, hidden, tokens, variant, layout):
    _check_kernel(dtype, hidden, tokens, variant, layout, emulated)


@pytest.mark.parametrize("write_sum", [False, True], ids=["no_h", "h"])
@pytest.mark.parametrize("n_norms", [1, 2])
@pytest.mark.parametrize("slots", [(), (0,), (1,), (0, 1)], ids=["no_residual", "r0", "r1", "r0+r1"])
@pytest.mark.parametrize(
    "dtype, hidden, layout",
    [(torch.float16, 2560, "strided"), (torch.float32, 5120, "contiguous"), (torch.bfloat16, 111, "offset")],
    ids=str,
)
def test_emulated_every_optional_input_and_output(emulated, dtype, hidden, layout, slots, n_norms, write_sum):
    # Each residual slot, y[1] and h is optional in the C ABI; Python fills the residual slots in order.
    x, residuals, weights, biases = _inputs(3, hidden, len(slots), n_norms, dtype, "cpu", layout)
    outs, h = _outputs(x, n_norms, write_sum, layout)
    args = ln_residual._args(x, residuals, weights, biases, EPS, outs, h)
    if slots == (1,):
        args.residual[1], args.residual_stride[1] = args.residual[0], args.residual_stride[0]
        args.residual[0] = None
    emulated.call("neoxfuse_ln_residual", _RUN_ARGTYPES, ctypes.byref(args), None)
    _check_outputs(x, residuals, weights, biases, outs, h, layout)


@pytest.mark.parametrize(
    "dtype, hidden, tokens, variant, layout",
    [
        (torch.float16, 2560, 7, "add_dual_layernorm", "contiguous"),  # 16-byte chunks, 320 threads
        (torch.float32, 5120, 7, "add_dual_layernorm", "strided"),  # 4 chunks per thread
        (torch.bfloat16, 2561, 7, "final", "offset"),  # scalar path, 8 chunks per thread
        (torch.float16, 500, 1, "add_layernorm", "strided"),  # scalar path, 512 threads
        (torch.float32, 111, 7, "dual_layernorm", "contiguous"),  # scalar path, 15 of the last warp's lanes busy
    ],
    ids=str,
)
def test_emulated_results_are_the_same_whatever_order_threads_run_in(emulated, dtype, hidden, tokens, variant, layout):
    # A read of the reductions' shared scratch that no barrier orders after its write sees other data.
    n_residuals, n_norms, write_sum = VARIANTS[variant]
    x, residuals, weights, biases = _inputs(tokens, hidden, n_residuals, n_norms, dtype, "cpu", layout)
    forward_outs, forward_h = _run_out(x, residuals, weights, biases, write_sum, layout, emulated)
    with emulated.reverse_schedule():
        outs, h = _run_out(x, residuals, weights, biases, write_sum, layout, emulated)
    _check_outputs(x, residuals, weights, biases, outs, h, layout)
    for got, want in zip([*outs, h], [*forward_outs, forward_h]):
        assert got is None or torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [MAX_HIDDEN, MAX_HIDDEN - 1, 8191])
def test_emulated_largest_rows(emulated, dtype, hidden):
    x, residuals, weights, biases = _inputs(3, hidden, 2, 2, dtype, "cpu")
    outs, h = _run_out(x, residuals, weights, biases, True, "contiguous", emulated)
    _check_outputs(x, residuals, weights, biases, outs, h, "contiguous")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [2560, 2568])  # 2568: the last warp holds chunks past the row's end
def test_emulated_inputs_are_streamed_once(emulated, dtype, variant, hidden):
    # On the 16-byte path x and the residuals are streaming loads, each element read once, none past the row.
    n_residuals, n_norms, write_sum = VARIANTS[variant]
    x, residuals, weights, biases = _inputs(7, hidden, n_residuals, n_norms, dtype, "cpu", "strided")
    emulated.take_streamed_bytes()
    _run_out(x, residuals, weights, biases, write_sum, "strided", emulated)
    assert emulated.take_streamed_bytes() == (1 + n_residuals) * 7 * hidden * x.element_size()


def test_emulated_constant_rows_normalise_to_the_bias(emulated):
    # var = 0: y = (h - mean) * rsqrt(eps) * w + b = b exactly.
    x = torch.full((4, 2560), 7.0, dtype=torch.float16)
    w, b = torch.randn(2560).half(), torch.randn(2560).half()
    (y,), _ = _run_out(x, [], [w], [b], False, "contiguous", emulated)
    assert torch.equal(y, b.expand_as(y))


def test_emulated_zero_rows_launch_nothing(emulated):
    # As test_zero_tokens_launch_nothing: empty tensors, whose data pointers are null.
    x, residuals, weights, biases = _inputs(0, 2560, 1, 2, torch.float16, "cpu")
    _run_out(x, residuals, weights, biases, True, "contiguous", emulated)


# ---------------------------------------------------------------------------------------------
# The benchmark suite `neoxfuse bench ln-residual`.


def test_bench_shapes_parse_and_count_their_bytes():
    from neoxfuse.bench.ln_residual import Shape

    shape = Shape.parse("16384x2560:fp16:add_dual_layernorm")
    assert (shape.tokens, shape.hidden, shape.torch_dtype, str(shape)) == (16384, 2560, torch.float16, "16384x2560:fp16:add_dual_layernorm")
    # reads x, r1, r2; writes h, y1, y2; reads two weights and two biases
    assert shape.bytes_moved == 2 * (16384 * 2560 * 6 + 4 * 2560)
    assert Shape.parse("1x111:fp32:final").bytes_moved == 4 * (111 * 4 + 2 * 111)
    for bad in ["2560:fp16:layernorm", "1x2560:fp64:layernorm", "1x2560:fp16:rmsnorm", f"1x{MAX_HIDDEN + 1}:fp16:layernorm"]:
        with pytest.raises(Exception, match="TOKENSxHIDDEN|tokens >= 1"):
            Shape.parse(bad)


def test_bench_compiles_torch_for_every_shape(monkeypatch):
    # More shapes than Dynamo's recompile limit (8): each must still get its own compiled graph,
    # not fall back to eager under the torch_compile name.
    from neoxfuse.bench.ln_residual import Shape, _calls

    compiled_hidden = []

    def backend(gm, example_inputs):
        compiled_hidden.append(example_inputs[0].shape[-1])
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend=backend, **kwargs))
    hiddens = list(range(1, 12))
    for hidden in hiddens:
        calls, _ = _calls(Shape.parse(f"2x{hidden}:fp32:add_layernorm"), ["torch_compile"])
        x = torch.randn(2, hidden)
        calls["torch_compile"](x, [x], [torch.ones(hidden)], [torch.zeros(hidden)])
    assert compiled_hidden == hiddens


def test_bench_table_gives_speedups_skips_and_target_verdicts():
    from neoxfuse.bench import ln_residual as suite
    from neoxfuse.bench.common import add_speedups

    def row(shape, provider, median_us, pct_copy=50.0):
        parsed = suite.Shape.parse(shape)
        return {"tokens": parsed.tokens, "hidden": parsed.hidden, "dtype": parsed.dtype, "variant": parsed.variant,
                "provider": provider, "median_us": median_us, "p90_us": median_us, "p99_us": median_us, "GBps": 1.0,
                "pct_copy": pct_copy, "rel_err": 1e-4, "beyond_l2": True}

    rows = [row(suite.DECODE_TARGET, "neoxfuse", 2.0), row(suite.DECODE_TARGET, "torch_eager", 6.0),
            row(suite.DECODE_TARGET, "torch_compile", 2.2), row(suite.PREFILL_TARGET, "neoxfuse", 100.0, pct_copy=90.0)]
    add_speedups(rows, suite._shape_of)
    extra = {"l2_bytes": 50 * 2**20, "skipped": {suite.DECODE_TARGET: {"flashinfer": "takes bf16 only"}},
             "targets": suite._targets(rows), "decode_tpot": []}
    lines = suite._table(rows, extra, {"name": "Test GPU", "copy_GBps": 3000.0}).splitlines()
    assert any(line.split()[:2] == [suite.DECODE_TARGET, "torch_eager"] and line.split()[-1] == "3.00" for line in lines)
    assert f"skipped flashinfer for {suite.DECODE_TARGET}: takes bf16 only" in lines
    # decode 3x torch_eager, 1.1x torch_compile; prefill at 90% of the copy rate, no torch_compile row
    assert [line.rsplit(": ", 1)[1] for line in lines if line.startswith("  ")] == ["met", "NOT met", "met", "not measured"]


def _stand_in_row(shape, provider: str, median_us: float) -> dict:
    return {"tokens": shape.tokens, "hidden": shape.hidden, "dtype": shape.dtype, "variant": shape.variant,
            "provider": provider, "median_us": median_us, "pct_copy": 90.0}


def test_bench_stopped_in_its_end_to_end_part_keeps_the_kernel_rows(tmp_path, monkeypatch, stand_in_kernel_suite):
    import json

    from neoxfuse.bench import ln_residual as suite
    from neoxfuse.cli import main

    def measure_shape(shape, providers, replays, copy_GBps, l2_bytes, skipped):
        skipped[str(shape)] = {}
        return [_stand_in_row(shape, "neoxfuse", 2.0)]

    stand_in_kernel_suite(suite, measure_shape)

    def stopped(e2e, tokens):
        raise KeyboardInterrupt  # as a pipeline's --budget or a user stops it

    monkeypatch.setattr(suite, "_decode_tpot", stopped)
    kernel_rows = [_stand_in_row(suite.Shape.parse(text), "neoxfuse", 2.0) for text in suite.DEFAULT_SHAPES]
    assert main(["bench", "ln-residual", "--out-dir", str(tmp_path / "stopped")]) == 130
    [path] = (tmp_path / "stopped").glob("ln_residual-*.json")
    record = json.loads(path.read_text())
    assert record["complete"] is False and record["rows"] == kernel_rows and record["decode_tpot"] == []
    assert len(record["targets"]) == 4

    monkeypatch.setattr(suite, "_decode_tpot", lambda e2e, tokens: [{"backend": "hf_eager"}])
    assert main(["bench", "ln-residual", "--out-dir", str(tmp_path / "done")]) == 0
    [path] = (tmp_path / "done").glob("ln_residual-*.json")
    record = json.loads(path.read_text())
    assert record["complete"] is True and record["decode_tpot"] == [{"backend": "hf_eager"}]


def test_bench_stopped_between_shapes_keeps_the_shapes_it_finished(tmp_path, stand_in_kernel_suite):
    import json

    from neoxfuse.bench import ln_residual as suite
    from neoxfuse.cli import main

    decode, prefill = suite.Shape.parse(suite.DECODE_TARGET), suite.Shape.parse(suite.PREFILL_TARGET)

    def measure_shape(shape, providers, replays, copy_GBps, l2_bytes, skipped):
        if shape == prefill:
            raise KeyboardInterrupt  # as a pipeline's --budget or a user stops it
        skipped[str(shape)] = {"flashinfer": "takes bf16 only"}
        return [_stand_in_row(shape, "neoxfuse", 2.0), _stand_in_row(shape, "torch_eager", 6.0)]

    stand_in_kernel_suite(suite, measure_shape)
    args = ["bench", "ln-residual", "--shape", str(decode), "--shape", str(prefill), "--e2e", "none"]
    assert main([*args, "--out-dir", str(tmp_path)]) == 130
    [path] = tmp_path.glob("ln_residual-*.json")
    record = json.loads(path.read_text())
    assert record["complete"] is False
    assert [(row["provider"], row.get("speedup_vs_torch_eager")) for row in record["rows"]] == [("neoxfuse", 3.0),
                                                                                                ("torch_eager", None)]
    assert record["skipped"] == {str(decode): {"flashinfer": "takes bf16 only"}}
    assert [t["met"] for t in record["targets"]] == [True, None, None, None]  # the decode shape's eager target only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_on_a_machine_without_gpu_says_so_and_fails(capsys):
    from neoxfuse.cli import main

    assert main(["bench", "ln-residual", "--e2e", "none"]) == 1
    assert "need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_runs_and_writes_its_results(tmp_path):
    import json

    from neoxfuse.cli import main

    shape = "3x512:fp16:add_dual_layernorm"
    assert main(["bench", "ln-residual", "--shape", shape, "--replays", "5", "--e2e", "none", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("ln_residual-*.json")
    record = json.loads(path.read_text())
    assert record["suite"] == "ln_residual" and record["device"]["copy_GBps"] > 0
    providers = {row["provider"]: row for row in record["rows"]}
    assert {"neoxfuse", "torch_eager", "torch_compile"} <= set(providers)
    for row in providers.values():
        assert 0 < row["median_us"] <= row["p90_us"] <= row["p99_us"]
        assert row["rel_err"] < REL_TOL[torch.float16] * 2
    assert providers["neoxfuse"]["speedup_vs_torch_eager"] > 0
    assert "flashinfer" in record["skipped"][shape]
