"""Finding, loading and calling the shared library libneoxfuse.so (its C ABI: kernels/*/*.h).

The library is looked up at $NEOXFUSE_LIB, else inside the installed package
(neoxfuse/lib/libneoxfuse.so, where the wheel puts it). Each family declares the prototypes
of its functions with `function(...)`; `call(...)` turns a non-zero status into KernelError.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from neoxfuse.errors import KernelError, LibraryNotFoundError

ABI_VERSION = 2  # kernels/common/library.h: NEOXFUSE_ABI_VERSION

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kernels/common/dtype.h: enum neoxfuse_dtype

# kernels/common/status.h
STATUS_NAMES = {
    1: "invalid argument",
    2: "misaligned pointer or size",
    3: "unsupported shape or dtype",
    4: "CUDA error",
    5: "no usable CUDA device",
}

_PACKAGED = Path(__file__).parent / "lib" / "libneoxfuse.so"


def library_path() -> Path:
    """Where the library is expected: $NEOXFUSE_LIB, else the copy inside the package."""
    env = os.environ.get("NEOXFUSE_LIB")
    return Path(env) if env else _PACKAGED


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The loaded library; LibraryNotFoundError (with what to do) if it is missing or stale."""
    path = library_path()
    if not path.is_file():
        raise LibraryNotFoundError(
            f"libneoxfuse.so not found at {path}. Build it with `./bazelw build //kernels:libneoxfuse.so` "
            "and set NEOXFUSE_LIB to bazel-bin/kernels/libneoxfuse.so, or install the wheel "
            "(`./bazelw build //python:wheel`, then `pip install \"$(ci/wheel_path)\"`)."
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise LibraryNotFoundError(f"{path} did not load: {err}") from err
    lib.neoxfuse_abi_version.restype = ctypes.c_int
    found = lib.neoxfuse_abi_version()
    if found != ABI_VERSION:
        raise LibraryNotFoundError(f"{path} has C ABI version {found}; this package needs {ABI_VERSION}. Rebuild it.")
    lib.neoxfuse_build_info.restype = ctypes.c_char_p
    lib.neoxfuse_last_error.restype = ctypes.c_char_p
    return lib


def function(name: str, argtypes: list, restype=ctypes.c_int):
    """The library function `name` with its prototype declared (once)."""
    fn = getattr(library(), name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def call(fn, *args) -> None:
    """Calls a status-returning library function; raises KernelError on a non-zero status."""
    check_status(library(), fn.__name__, fn(*args))


def check_status(lib: ctypes.CDLL, function: str, status: int) -> None:
    """KernelError (the status's name and `lib`'s last error message) unless `status` is 0."""
    if status != 0:
        message = STATUS_NAMES.get(status, f"status {status}")
        detail = lib.neoxfuse_last_error().decode()
        raise KernelError(function, status, f"{message}: {detail}" if detail else message)


def build_info() -> str:
    """What the library was built with, e.g. 'abi=2 cuda=13.0 archs=sm_90a,sm_120,compute_120'."""
    return library().neoxfuse_build_info().decode()


def archs() -> list[str]:
    """The GPU code the library holds, from build_info: e.g. ['sm_90a', 'sm_120', 'compute_120']."""
    fields = dict(item.split("=", 1) for item in build_info().split() if "=" in item)
    return [arch for arch in fields.get("archs", "").split(",") if arch]


def code_for(sm: str, archs: list[str]) -> str | None:
    """Which of `archs` a GPU of compute capability `sm` ("90" for 9.0, "121" for 12.1) runs, or None.

    Machine code sm_XY (and the family-specific sm_XYf) runs on capability X.Z for Z >= Y, the
    arch-specific sm_XYa on X.Y only. The driver compiles PTX compute_XY for any capability >= X.Y,
    compute_XYf for X.Z with Z >= Y, compute_XYa for X.Y only.
    """
    major, minor = int(sm[:-1]), int(sm[-1])

    def runs(number: str, machine_code: bool) -> bool:
        digits = number.rstrip("af")
        built_major, built_minor, suffix = int(digits[:-1]), int(digits[-1]), number[len(digits):]
        if suffix == "a":
            return (built_major, built_minor) == (major, minor)
        if suffix == "f" or machine_code:
            return built_major == major and built_minor <= minor
        return (built_major, built_minor) <= (major, minor)

    for arch in archs:
        if arch.startswith("sm_") and runs(arch[len("sm_"):], machine_code=True):
            return f"{arch} machine code"
    for arch in archs:
        if arch.startswith("compute_") and runs(arch[len("compute_"):], machine_code=False):
            return f"{arch} PTX, JIT-compiled by the driver at first use"
    return None


@functools.cache
def missing_code(device_index: int) -> str | None:
    """Why the library's kernels cannot run on cuda:device_index (it holds no code that GPU runs), or None."""
    major, minor = torch.cuda.get_device_capability(device_index)
    held = archs()
    if code_for(f"{major}{minor}", held) is not None:
        return None
    return (
        f"libneoxfuse.so holds GPU code for {', '.join(held) or 'no arch'}, none of which runs on cuda:{device_index} "
        f"({torch.cuda.get_device_name(device_index)}, sm_{major}{minor}); rebuild it with that arch in "
        "CUDA_GENCODE (bazel/cuda.bzl)"
    )
