"""Fused residual add + one or two LayerNorms with shared statistics (kernels/ln_residual).

For x and up to two residuals r_1, r_2 of shape [..., hidden], and one or two LayerNorms with
parameters w_k, b_k [hidden], one kernel computes, row by row:

    h   = x + r_1 + r_2                                    (summed in fp32, rounded once to the dtype)
    y_k = (h - mean(h)) / sqrt(var(h) + eps) * w_k + b_k   (mean and biased var in fp32, of h as rounded)

reading every input once and writing h (where asked) and each y_k once. GPT-NeoX uses it as

    parallel residual (Pythia):  h, ln1, ln2 = add_dual_layernorm(mlp, [attn, h_prev], (w1, w2), (b1, b2))
    sequential residual:         a, ln2 = add_layernorm(attn, [h_prev], w2, b2)
    final LayerNorm:             y = layernorm(mlp, w_f, b_f, residuals=[attn, h_prev])   (h not written)
    plain LayerNorm:             y = layernorm(x, w, b)

Every tensor of a call has one dtype (float32, float16 or bfloat16) and one CUDA device. x, the
residuals and given outputs are contiguous in their last dim with evenly strided rows (a
[..., :hidden] view of a wider buffer is fine); weights and biases are contiguous [hidden];
hidden <= MAX_HIDDEN. Fresh outputs are contiguous. Inference only: the ops have no backward.

Ops (torch.library, namespace `neoxfuse`, with fake implementations for torch.compile and CUDA
graphs): `ln_residual` (fresh outputs; every function below but ln_residual_out goes through it)
and `ln_residual_out` (writes into given tensors). launch_count() counts the kernel launches this
module has made, so a test can prove a model really runs them.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from neoxfuse import _lib
from neoxfuse.checks import check_same_device, require_cuda, require_kernel_code
from neoxfuse.errors import InvalidInputError

MAX_HIDDEN = 16384  # kernels/ln_residual/ln_residual.h: NEOXFUSE_LN_RESIDUAL_MAX_HIDDEN


class _Args(ctypes.Structure):  # kernels/ln_residual/ln_residual.h: neoxfuse_ln_residual_args
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("rows", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("residual", ctypes.c_void_p * 2),
        ("residual_stride", ctypes.c_int64 * 2),
        ("h", ctypes.c_void_p),
        ("h_stride", ctypes.c_int64),
        ("weight", ctypes.c_void_p * 2),
        ("bias", ctypes.c_void_p * 2),
        ("y", ctypes.c_void_p * 2),
        ("y_stride", ctypes.c_int64 * 2),
    ]


class _Launch(ctypes.Structure):  # neoxfuse_ln_residual_launch
    _fields_ = [("vector_width", ctypes.c_int), ("chunks_per_thread", ctypes.c_int), ("threads", ctypes.c_int)]


class LaunchPlan(NamedTuple):
    """How the kernel runs a call: one block of `threads` per row, each thread holding
    `chunks_per_thread` chunks of `vector_width` elements (1: the scalar path)."""

    vector_width: int
    chunks_per_thread: int
    threads: int


_launches = 0


def launch_count() -> int:
    """Kernel launches made through this module so far in this process (CUDA graph replays not counted)."""
    return _launches


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_values(
    x: object,
    residuals: Sequence[object],
    weights: Sequence[object],
    biases: Sequence[object],
    eps: object,
    outs: Sequence[object] | None = None,
    h_out: object | None = None,
) -> None:
    """What can be checked without touching memory: types, counts, dtypes, shapes and eps.

    Runs on any device and on fake tensors, before the device is looked at, so mismatched
    tensors are named as such even on a machine without a GPU. outs None: fresh outputs.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _lib.DTYPE_CODES:
        raise InvalidInputError(f"x must be float32, float16 or bfloat16, got {_dtype_name(x.dtype)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise InvalidInputError(f"x must have shape [..., hidden] with hidden >= 1, got {list(x.shape)}")
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise InvalidInputError(f"hidden size {hidden} is over {MAX_HIDDEN}, the longest row the kernel holds")
    for name, group in [("residuals", residuals), ("weights", weights), ("biases", biases), ("outs", outs)]:
        if not isinstance(group, (list, tuple)) and not (name == "outs" and group is None):
            raise InvalidInputError(f"{name} must be a list of tensors, got {type(group).__name__}")
    if len(residuals) > 2:
        raise InvalidInputError(f"at most two residuals, got {len(residuals)}")
    if len(weights) not in (1, 2) or len(biases) != len(weights):
        raise InvalidInputError(f"one or two LayerNorms, each with a weight and a bias; got {len(weights)} weights, {len(biases)} biases")
    if outs is not None and len(outs) != len(weights):
        raise InvalidInputError(f"one output per LayerNorm: {len(weights)} weights but {len(outs)} outs")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InvalidInputError(f"eps must be a finite number >= 0, got {eps!r}")
    like_x = [*_named("residuals", residuals), *_named_outputs(outs or [], h_out)]
    params = [*_named("weights", weights), *_named("biases", biases)]
    for (name, t), shape in [*((item, tuple(x.shape)) for item in like_x), *((item, (hidden,)) for item in params)]:
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise InvalidInputError(f"{name} must be {_dtype_name(x.dtype)} like x, got {_dtype_name(t.dtype)}")
        if tuple(t.shape) != shape:
            raise InvalidInputError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _named(group: str, tensors: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(f"{group}[{i}]", t) for i, t in enumerate(tensors)]


def _named_outputs(outs: Sequence[torch.Tensor], h_out: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    return [*_named("outs", outs), *([("h_out", h_out)] if h_out is not None else [])]


def _check_cuda(tensors: list[tuple[str, torch.Tensor]]) -> None:
    """All tensors on one CUDA device that the library has code for: NoGPUError where there is none,
    UnsupportedDeviceError for a GPU without code, else InvalidInputError."""
    check_same_device(**dict(tensors))
    device = tensors[0][1].device
    if device.type != "cuda":
        require_cuda()
        raise InvalidInputError(f"the tensors must be on a CUDA device, got {device}")
    require_kernel_code(device)


def _rows(name: str, t: torch.Tensor, *, output: bool) -> tuple[int, int]:
    """(rows, row stride in elements) of t [..., hidden] seen as [rows, hidden]."""
    hidden = t.shape[-1]
    if t.is_contiguous():
        return t.numel() // hidden, hidden
    try:
        as_rows = t.view(-1, hidden)  # [rows, hidden]
    except RuntimeError as err:
        raise InvalidInputError(
            f"{name}'s leading dims must merge into evenly strided rows (call .contiguous()), got strides {t.stride()}"
        ) from err
    if hidden > 1 and as_rows.stride(1) != 1:
        raise InvalidInputError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    rows = as_rows.shape[0]
    stride = as_rows.stride(0) if rows > 1 else hidden
    if output and stride < hidden:
        raise InvalidInputError(f"the rows of output {name} overlap each other (row stride {stride} < hidden {hidden})")
    return rows, stride


class _Span(NamedTuple):
    """Where a [rows, hidden] layout lies, in bytes."""

    start: int
    rows: int
    stride: int
    row_bytes: int

    def overlaps(self, other: _Span) -> bool:
        """Whether the two layouts share a byte. Exact for layouts of one stride (rows of one
        may sit between rows of the other, as in a packed [rows, 2, hidden] buffer); for other
        pairs any overlap of their extents counts."""
        if self.rows == 0 or other.rows == 0:
            return False
        end = self.start + (self.rows - 1) * self.stride + self.row_bytes
        other_end = other.start + (other.rows - 1) * other.stride + other.row_bytes
        if end <= other.start or other_end <= self.start:
            return False
        if self.stride == other.stride and self.rows > 1 and other.rows > 1:
            offset = (other.start - self.start) % self.stride
            return offset < self.row_bytes or self.stride - offset < self.row_bytes
        return True


def _args(x, residuals, weights, biases, eps, outs, h_out, *, fresh_outputs: bool = False) -> _Args:
    """The C arguments of a call whose values passed _check_values; checks the memory layout
    (whether outputs overlap other tensors only where they are not freshly allocated)."""
    hidden, element = x.shape[-1], x.element_size()
    for name, param in [*_named("weights", weights), *_named("biases", biases)]:
        if not param.is_contiguous():
            raise InvalidInputError(f"{name} must be contiguous")
    inputs = [("x", x), *_named("residuals", residuals)]
    outputs = _named_outputs(outs, h_out)
    layouts = {name: _rows(name, t, output=False) for name, t in inputs}
    layouts.update({name: _rows(name, t, output=True) for name, t in outputs})

    if not fresh_outputs:
        _check_no_overlap(inputs, outputs, [*_named("weights", weights), *_named("biases", biases)], layouts, hidden * element, element)

    args = _Args(dtype=_lib.DTYPE_CODES[x.dtype], eps=eps, rows=layouts["x"][0], hidden=hidden, x=x.data_ptr(), x_stride=layouts["x"][1])
    for i, r in enumerate(residuals):
        args.residual[i], args.residual_stride[i] = r.data_ptr(), layouts[f"residuals[{i}]"][1]
    if h_out is not None:
        args.h, args.h_stride = h_out.data_ptr(), layouts["h_out"][1]
    for k, (w, b, y) in enumerate(zip(weights, biases, outs)):
        args.weight[k], args.bias[k], args.y[k], args.y_stride[k] = w.data_ptr(), b.data_ptr(), y.data_ptr(), layouts[f"outs[{k}]"][1]
    return args


def _check_no_overlap(inputs, outputs, params, layouts, row_bytes: int, element: int) -> None:
    """InvalidInputError if an output shares a byte with any other tensor of the call."""
    spans = {name: _Span(t.data_ptr(), layouts[name][0], layouts[name][1] * element, row_bytes) for name, t in [*inputs, *outputs]}
    spans.update({name: _Span(param.data_ptr(), 1, row_bytes, row_bytes) for name, param in params})
    for name, _ in outputs:
        for other, span in spans.items():
            if other != name and spans[name].overlaps(span):
                raise InvalidInputError(f"output {name} overlaps {other}; outputs must not share memory with other tensors of the call")


@functools.lru_cache(maxsize=None)
def _kernel():
    return _lib.function("neoxfuse_ln_residual", [ctypes.POINTER(_Args), ctypes.c_void_p])


def _launch(x, residuals, weights, biases, eps, outs, h_out, *, fresh_outputs: bool = False) -> None:
    """Checks device and layout, then runs the kernel on the current stream of x's device."""
    global _launches
    outputs = _named_outputs(outs, h_out)
    _check_cuda([("x", x), *_named("residuals", residuals), *_named("weights", weights), *_named("biases", biases), *outputs])
    args = _args(x, residuals, weights, biases, eps, outs, h_out, fresh_outputs=fresh_outputs)
    with torch.cuda.device(x.device):
        _lib.call(_kernel(), ctypes.byref(args), torch.cuda.current_stream().cuda_stream)
    _launches += 1


def launch_plan(x, residuals, weights, biases, eps=1e-5, *, outs, h_out=None) -> LaunchPlan:
    """The launch a call of ln_residual_out with these arguments would make (vector or scalar
    path, chunks per thread, block size). Looks at sizes, strides and addresses only, so it
    answers for tensors on any device, a GPU or not."""
    _check_values(x, residuals, weights, biases, eps, outs, h_out)
    args = _args(x, residuals, weights, biases, eps, outs, h_out)
    launch = _Launch()
    _lib.call(_lib.function("neoxfuse_ln_residual_plan", [ctypes.POINTER(_Args), ctypes.POINTER(_Launch)]),
              ctypes.byref(args), ctypes.byref(launch))
    return LaunchPlan(launch.vector_width, launch.chunks_per_thread, launch.threads)


@torch.library.custom_op("neoxfuse::ln_residual", mutates_args=())
def _ln_residual(
    x: torch.Tensor,
    residuals: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    eps: float,
    write_sum: bool,
) -> list[torch.Tensor]:
    """[h] if write_sum, then y_k for each weight: fresh contiguous tensors shaped like x."""
    _check_values(x, residuals, weights, biases, eps)
    outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in weights]
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_sum else None
    _launch(x, residuals, weights, biases, eps, outs, h, fresh_outputs=True)
    return ([h] if h is not None else []) + outs


@_ln_residual.register_fake
def _(x, residuals, weights, biases, eps, write_sum):
    _check_values(x, residuals, weights, biases, eps)
    return [x.new_empty(x.shape) for _ in range(len(weights) + int(write_sum))]


@torch.library.custom_op("neoxfuse::ln_residual_out", mutates_args=("outs", "h_out"))
def _ln_residual_out(
    x: torch.Tensor,
    residuals: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    eps: float,
    outs: list[torch.Tensor],
    h_out: torch.Tensor | None,  # no default: torch 2.11 fails on a defaulted mutable argument left out
) -> None:
    _check_values(x, residuals, weights, biases, eps, outs, h_out)
    _launch(x, residuals, weights, biases, eps, outs, h_out)


@_ln_residual_out.register_fake
def _(x, residuals, weights, biases, eps, outs, h_out):
    _check_values(x, residuals, weights, biases, eps, outs, h_out)


def ln_residual_out(
    x: torch.Tensor,
    residuals: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    eps: float,
    outs: Sequence[torch.Tensor],
    h_out: torch.Tensor | None = None,
) -> None:
    """outs[k] = LN_k(h), and h_out = h if given, for h = x + sum(residuals) (formula in the module doc).

    x, residuals [..., hidden]; weights, biases: one or two [hidden]; outs (one per weight) and
    h_out shaped like x, with any evenly strided rows (views into one packed buffer, say), not
    sharing memory with any other tensor of the call. The op neoxfuse::ln_residual_out.
    """
    _check_values(x, residuals, weights, biases, eps, outs, h_out)
    _ln_residual_out(x, list(residuals), list(weights), list(biases), eps, list(outs), h_out)


def _run(x, residuals, weights, biases, eps, write_sum: bool) -> list[torch.Tensor]:
    """The ln_residual op, its arguments checked first so that a wrong type is named clearly
    rather than rejected by the dispatcher's schema."""
    _check_values(x, residuals, weights, biases, eps)
    return _ln_residual(x, list(residuals), list(weights), list(biases), eps, write_sum)


def layernorm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *, residuals: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """y = LN(h) = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias, h = x + sum(residuals), over the last dim.

    With residuals, the final LayerNorm of a GPT-NeoX model fused with the last layer's residual
    adds (h itself is not written). x, residuals [..., hidden]; weight, bias [hidden]. Returns y
    shaped like x.
    """
    (y,) = _run(x, residuals, [weight], [bias], eps, False)
    return y


def dual_layernorm(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    eps: float = 1e-5,
    *,
    residuals: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_1, y_2), y_k = (h - mean(h)) / sqrt(var(h) + eps) * weights[k] + biases[k], h = x + sum(residuals).

    Both LayerNorms share h's statistics: LN1 and LN2 of a parallel-residual GPT-NeoX block's
    input. x [..., hidden]; weights, biases: two [hidden] each.
    """
    y1, y2 = _run(x, residuals, weights, biases, eps, False)
    return y1, y2


def add_layernorm(
    x: torch.Tensor, residuals: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + sum(residuals) (one or two), y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias.

    The residual add and LayerNorm of a sequential GPT-NeoX block: a = attn + h_prev, LN2(a).
    """
    h, y = _run(x, residuals, [weight], [bias], eps, True)
    return h, y


def add_dual_layernorm(
    x: torch.Tensor,
    residuals: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, y_1, y_2): h = x + sum(residuals), y_k = (h - mean(h)) / sqrt(var(h) + eps) * weights[k] + biases[k].

    The end of a parallel-residual GPT-NeoX block fused with the start of the next:
    h = mlp + attn + h_prev, then the next layer's LN1(h) and LN2(h) from one set of statistics.
    """
    h, y1, y2 = _run(x, residuals, weights, biases, eps, True)
    return h, y1, y2
