"""`neoxfuse::device_copy`: dst = src through the bandwidth probe (kernels/common/copy_probe.cu)."""

from __future__ import annotations

import ctypes

import torch

from neoxfuse import _lib
from neoxfuse.checks import check_same_device, check_tensor
from neoxfuse.errors import InvalidInputError


@torch.library.custom_op("neoxfuse::device_copy", mutates_args=("dst",))
def device_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src[:], byte for byte, at device-memory speed.

    src, dst: CUDA tensors of the same dtype and number of elements, contiguous, 16-byte
    aligned, not overlapping.
    """
    check_tensor("src", src)
    check_tensor("dst", dst)
    check_same_device(src=src, dst=dst)
    if src.dtype != dst.dtype or src.numel() != dst.numel():
        raise InvalidInputError(
            f"src and dst must match in dtype and size, got {src.dtype} x {src.numel()} and {dst.dtype} x {dst.numel()}"
        )
    fn = _lib.function("neoxfuse_device_copy", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    with torch.cuda.device(src.device):
        stream = torch.cuda.current_stream().cuda_stream
        _lib.call(fn, dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), stream)


@device_copy.register_fake
def _(src: torch.Tensor, dst: torch.Tensor) -> None:
    return None
