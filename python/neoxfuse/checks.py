"""Argument checks run before every kernel call, so bad input is a clear Python error."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from neoxfuse import _lib
from neoxfuse.errors import InvalidInputError, NoGPUError, UnsupportedDeviceError

VEC_BYTES = 16  # kernels/common/vec.cuh: kVecBytes


def require_cuda() -> None:
    """NoGPUError unless torch can run CUDA kernels here."""
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        raise NoGPUError(f"neoxfuse kernels need a CUDA GPU; this machine has none usable ({build}).")


def require_kernel_code(device: torch.device) -> None:
    """UnsupportedDeviceError unless the library holds code that the CUDA device `device` runs."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if (reason := _lib.missing_code(index)) is not None:
        raise UnsupportedDeviceError(reason)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    cuda: bool = True,
    contiguous: bool = True,
    aligned: bool = True,
) -> torch.Tensor:
    """Checks `t` and returns it. `shape` entries of None match any size.

    Raises InvalidInputError (or NoGPUError) naming `name` and what was expected.
    """
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InvalidInputError(f"{name} must be {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            want_str = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise InvalidInputError(f"{name} must have shape {want_str}, got {list(t.shape)}")
    if cuda:
        if t.device.type != "cuda":
            require_cuda()
            raise InvalidInputError(f"{name} must be on a CUDA device, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise InvalidInputError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    if aligned and t.data_ptr() % VEC_BYTES != 0:
        raise InvalidInputError(f"{name} must start on a {VEC_BYTES}-byte boundary (a storage offset breaks that)")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    """InvalidInputError unless every tensor is on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise InvalidInputError("tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_draw(values: object, rng: object, name: str = "weights") -> None:
    """The arguments of a token draw (neoxfuse.sampling): `name` (the weights, or the logits they
    come from) [vocab] fp32 with vocab >= 1 and rng [2] int64 on one device, both contiguous."""
    check_tensor(name, values, dtypes=[torch.float32], shape=[None], cuda=False, aligned=False)
    check_tensor("rng", rng, dtypes=[torch.int64], shape=[2], cuda=False, aligned=False)
    check_same_device(**{name: values, "rng": rng})
    if values.numel() == 0:
        raise InvalidInputError(f"{name} must hold at least one entry")


def is_integer(value: object) -> bool:
    """An int (NumPy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_ids(tokens: Sequence[object], vocab: int) -> list[int]:
    """`tokens` as Python ints, each an integer id in [0, vocab); InvalidInputError naming the first
    few that are not (a float is refused, not cut to an int)."""
    wrong = [t for t in tokens if not is_integer(t)]
    if wrong:
        raise InvalidInputError(f"token ids must be integers, got {wrong[:5]!r}")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidInputError(f"token ids must be in [0, {vocab}) for this model; got {bad[:5]}")
    return [int(t) for t in tokens]


def _is_real(value: object) -> bool:
    """An int or float (NumPy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_seed(seed: object) -> None:
    """A seed of random weights or of a sampling rule: an integer in 0 .. 2^63 - 1."""
    if not is_integer(seed) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer in 0 .. 2^63 - 1, got {seed!r}")


def check_sampling(temperature: object, top_k: object, top_p: object, repetition_penalty: object = 1.0,
                   min_p: object = 0.0, typical_p: object = 1.0, epsilon_cutoff: object = 0.0, eta_cutoff: object = 0.0,
                   presence_penalty: object = 0.0, frequency_penalty: object = 0.0) -> None:
    """A sampling rule's ranges (neoxfuse.sampling.SamplingParams): temperature >= 0 and finite
    (0: greedy), top_k an integer >= 0 (0: off), top_p in (0, 1] (1: off), repetition_penalty > 0
    and finite (1: off), min_p in [0, 1] (0: off), typical_p in (0, 1] (1: off), epsilon_cutoff and
    eta_cutoff in [0, 1) (0: off), presence_penalty and frequency_penalty finite (0: off)."""
    if not (_is_real(temperature) and temperature >= 0 and temperature != float("inf")):
        raise InvalidInputError(f"temperature must be >= 0 and finite (0 means greedy), got {temperature!r}")
    if not is_integer(top_k) or top_k < 0:
        raise InvalidInputError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")
    if not (_is_real(top_p) and 0 < top_p <= 1):
        raise InvalidInputError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if not (_is_real(repetition_penalty) and 0 < repetition_penalty < float("inf")):
        raise InvalidInputError(f"repetition_penalty must be > 0 and finite (1 is none), got {repetition_penalty!r}")
    if not (_is_real(min_p) and 0 <= min_p <= 1):
        raise InvalidInputError(f"min_p must be in [0, 1] (0 is off), got {min_p!r}")
    if not (_is_real(typical_p) and 0 < typical_p <= 1):
        raise InvalidInputError(f"typical_p must be in (0, 1] (1 is off), got {typical_p!r}")
    for name, cutoff in [("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)]:
        if not (_is_real(cutoff) and 0 <= cutoff < 1):
            raise InvalidInputError(f"{name} must be in [0, 1) (0 is off), got {cutoff!r}")
    for name, penalty in [("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)]:
        if not (_is_real(penalty) and math.isfinite(penalty)):
            raise InvalidInputError(f"{name} must be a finite number (0 is off), got {penalty!r}")
