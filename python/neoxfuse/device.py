"""What GPU this is and how fast its memory copies: the floor every benchmark is stated against."""

from __future__ import annotations

import ctypes
import statistics
from dataclasses import asdict, dataclass

import torch

from neoxfuse import _lib
from neoxfuse.checks import require_cuda
from neoxfuse.errors import InvalidInputError, KernelError
from neoxfuse.ops.copy import device_copy


class _DeviceInfo(ctypes.Structure):  # kernels/common/library.h: neoxfuse_device_info
    _fields_ = [
        ("name", ctypes.c_char * 256),
        ("sm_major", ctypes.c_int),
        ("sm_minor", ctypes.c_int),
        ("multiprocessors", ctypes.c_int),
        ("total_memory_bytes", ctypes.c_size_t),
        ("l2_cache_bytes", ctypes.c_size_t),
        ("driver_version", ctypes.c_int),
        ("runtime_version", ctypes.c_int),
    ]


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    sm: str  # compute capability as "90" / "120"
    multiprocessors: int
    total_memory_bytes: int
    l2_cache_bytes: int
    driver_version: str  # CUDA driver API version, "13.0"
    runtime_version: str  # the library's statically linked CUDA runtime


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on `device` (a CUDA device); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def devices() -> list[DeviceInfo]:
    """The CUDA devices the library sees (through the driver, without torch); [] with none."""
    count = ctypes.c_int(0)
    try:
        _lib.call(_lib.function("neoxfuse_device_count", [ctypes.POINTER(ctypes.c_int)]), ctypes.byref(count))
    except KernelError:
        return []
    get = _lib.function("neoxfuse_get_device_info", [ctypes.c_int, ctypes.POINTER(_DeviceInfo)])
    found = []
    for index in range(count.value):
        info = _DeviceInfo()
        _lib.call(get, index, ctypes.byref(info))
        found.append(
            DeviceInfo(
                index=index,
                name=info.name.decode(),
                sm=f"{info.sm_major}{info.sm_minor}",
                multiprocessors=info.multiprocessors,
                total_memory_bytes=info.total_memory_bytes,
                l2_cache_bytes=info.l2_cache_bytes,
                driver_version=_version(info.driver_version),
                runtime_version=_version(info.runtime_version),
            )
        )
    return found


@dataclass(frozen=True)
class CopyBandwidth:
    """One measurement of the copy probe. GBps counts bytes read plus bytes written."""

    bytes_per_copy: int  # size of the buffer copied
    bytes_moved: int  # read + written, per copy: 2 * bytes_per_copy
    iterations: int
    median_seconds: float  # per copy
    best_seconds: float
    GBps: float  # bytes_moved / median_seconds / 1e9
    best_GBps: float

    def as_dict(self) -> dict:
        return asdict(self)


def copy_bandwidth(nbytes: int = 1 << 30, iterations: int = 20, warmup: int = 3, device: int | None = None) -> CopyBandwidth:
    """Measures device-memory bandwidth with the copy probe: GB/s = 2 * nbytes / time.

    Copies an `nbytes` buffer `iterations` times (after `warmup` copies), each timed with
    CUDA events, and checks the copy is exact. The buffer should be far larger than L2
    (1 GiB by default; H100 has 50 MB of L2) so the figure is DRAM's, not the cache's.
    """
    require_cuda()
    if nbytes < 16 or iterations < 1 or warmup < 0:
        raise InvalidInputError("copy_bandwidth needs nbytes >= 16, iterations >= 1, warmup >= 0")
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    with torch.cuda.device(dev):
        for _ in range(warmup):
            device_copy(src, dst)
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            device_copy(src, dst)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    if not torch.equal(src, dst):
        raise KernelError("neoxfuse_device_copy", 0, "the copy is not exact")
    median, best = statistics.median(times), min(times)
    return CopyBandwidth(
        bytes_per_copy=nbytes,
        bytes_moved=2 * nbytes,
        iterations=iterations,
        median_seconds=median,
        best_seconds=best,
        GBps=2 * nbytes / median / 1e9,
        best_GBps=2 * nbytes / best / 1e9,
    )
