"""`neoxfuse::gptq_ln_qkv`: LayerNorm + GPTQ int4 dequantization + QKV projection in one kernel
(kernels/gptq_ln_qkv). For tokens t and output columns n:

    xn[t]     = LayerNorm(x[t]) with ln_weight, ln_bias, eps  (fp32 statistics, rounded to fp16)
    out[t, n] = bias[n] + sum_k xn[t, k] * W[k, n],   W[k, n] = scales[g(k), n] * (q[k, n] - z[g(k), n])

in the GPTQ format of neoxfuse.quant.gptq (g(k) = g_idx[k], or k // group_size when g_idx is
None). out is [tokens, N] in the weight's column order; for HF's fused query_key_value that is
[tokens, heads, 3, head_dim] (`qkv_view` splits q, k and v apart without a copy).
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from neoxfuse import _lib
from neoxfuse.checks import check_same_device, check_tensor, require_kernel_code
from neoxfuse.errors import InvalidInputError
from neoxfuse.quant.gptq import PACK, ZERO_OFFSETS, GPTQLinear

MAX_TOKENS = 8  # kernels/gptq_ln_qkv/gptq_ln_qkv.h: NEOXFUSE_GPTQ_LN_QKV_MAX_TOKENS
MAX_K = 8192  # NEOXFUSE_GPTQ_LN_QKV_MAX_K

_ARGTYPES = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p]


def _check_arguments(x, ln_weight, ln_bias, qweight, qzeros, scales, g_idx, bias, eps, group_size, zero_offset):
    """Checks every dtype, shape and size (no device needed, so it runs on CPU too); returns (T, K, N, groups)."""
    layout = dict(cuda=False, contiguous=False, aligned=False)
    check_tensor("x", x, dtypes=[torch.float16], shape=[None, None], **layout)
    T, K = x.shape
    if not 1 <= T <= MAX_TOKENS:
        raise InvalidInputError(f"x must hold 1..{MAX_TOKENS} tokens, got {T}")
    if K % PACK != 0 or K == 0:
        raise InvalidInputError(f"K={K} (x.shape[1]) must be a positive multiple of {PACK}: qweight packs {PACK} rows per int32")
    if K > MAX_K:
        raise InvalidInputError(f"K={K} is beyond the kernel's limit of {MAX_K}")
    check_tensor("ln_weight", ln_weight, dtypes=[torch.float16], shape=[K], **layout)
    check_tensor("ln_bias", ln_bias, dtypes=[torch.float16], shape=[K], **layout)
    check_tensor("qweight", qweight, dtypes=[torch.int32], shape=[K // PACK, None], **layout)
    N = qweight.shape[1]
    if N % PACK != 0 or N == 0:
        raise InvalidInputError(f"N={N} (qweight.shape[1]) must be a positive multiple of {PACK}: qzeros packs {PACK} columns per int32")
    check_tensor("scales", scales, dtypes=[torch.float16], shape=[None, N], **layout)
    groups = scales.shape[0]
    check_tensor("qzeros", qzeros, dtypes=[torch.int32], shape=[groups, N // PACK], **layout)
    if g_idx is None:
        rows = K if group_size == -1 else group_size
        if rows <= 0 or rows % PACK != 0 or K % rows != 0:
            raise InvalidInputError(f"K={K} is not divisible by group_size={group_size} (a multiple of {PACK}, or -1)")
        if groups != K // rows:
            raise InvalidInputError(f"scales must have K / group_size = {K // rows} groups, got {groups}")
    else:
        check_tensor("g_idx", g_idx, dtypes=[torch.int32], shape=[K], **layout)
        if groups < 1:
            raise InvalidInputError("scales must have at least one group, got 0")
    if bias is not None:
        check_tensor("bias", bias, dtypes=[torch.float16], shape=[N], **layout)
    if zero_offset not in ZERO_OFFSETS.values():
        raise InvalidInputError(f"zero_offset must be 1 (gptq v1) or 0 (gptq_v2), got {zero_offset}")
    if not math.isfinite(eps) or eps < 0:
        raise InvalidInputError(f"eps must be finite and >= 0, got {eps}")
    return T, K, N, groups


@torch.library.custom_op("neoxfuse::gptq_ln_qkv", mutates_args=())
def gptq_ln_qkv(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    group_size: int,
    zero_offset: int,
) -> torch.Tensor:
    """out [T, N] fp16 = LayerNorm(x) @ W + bias (module docstring), for x [T, K] fp16, T in 1..8.

    ln_weight, ln_bias: fp16 [K]. qweight int32 [K/8, N], qzeros int32 [groups, N/8], scales fp16
    [groups, N]: GPTQ tensors. g_idx: int32 [K] with values in 0..groups-1 (act-order), or None for
    groups in order (k // group_size; group_size -1 = one group). bias: fp16 [N] or None.
    zero_offset: 1 for checkpoint_format "gptq" (v1), 0 for "gptq_v2". CUDA tensors, contiguous,
    16-byte aligned. g_idx values are not checked here (that would synchronize the device; a
    GPTQLinear checks them once): a value out of range makes the columns it touches NaN.
    """
    T, K, N, groups = _check_arguments(x, ln_weight, ln_bias, qweight, qzeros, scales, g_idx, bias, eps, group_size, zero_offset)
    tensors = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, qweight=qweight, qzeros=qzeros, scales=scales)
    if g_idx is not None:
        tensors["g_idx"] = g_idx
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        check_tensor(name, t)
    check_same_device(**tensors)
    require_kernel_code(x.device)
    out = torch.empty(T, N, dtype=torch.float16, device=x.device)
    fn = _lib.function("neoxfuse_gptq_ln_qkv", _ARGTYPES)
    with torch.cuda.device(x.device):
        _lib.call(
            fn, out.data_ptr(), x.data_ptr(), ln_weight.data_ptr(), ln_bias.data_ptr(), qweight.data_ptr(),
            qzeros.data_ptr(), scales.data_ptr(), None if g_idx is None else g_idx.data_ptr(),
            None if bias is None else bias.data_ptr(), T, K, N, groups, K if group_size == -1 else group_size,
            zero_offset, eps, torch.cuda.current_stream().cuda_stream,
        )
    return out


@gptq_ln_qkv.register_fake
def _(x, ln_weight, ln_bias, qweight, qzeros, scales, g_idx, bias, eps, group_size, zero_offset):
    T, _, N, _ = _check_arguments(x, ln_weight, ln_bias, qweight, qzeros, scales, g_idx, bias, eps, group_size, zero_offset)
    return x.new_empty(T, N)


def gptq_ln_qkv_layer(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, layer: GPTQLinear, eps: float = 1e-5) -> torch.Tensor:
    """gptq_ln_qkv with a GPTQLinear (checked once, on construction): out [T, N] = LayerNorm(x) @ W + bias.

    A layer whose g_idx is the plain k // group_size takes the kernel's ordered-groups path.
    """
    return gptq_ln_qkv(
        x, ln_weight, ln_bias, layer.qweight, layer.qzeros, layer.scales, None if layer.ordered else layer.g_idx,
        layer.bias, eps, layer.group_size, layer.zero_offset,
    )


def qkv_view(out: torch.Tensor, heads: int) -> torch.Tensor:
    """[3, T, heads, head_dim] view of out [T, N = 3 * heads * head_dim] in HF's per-head order
    ([T, heads, 3, head_dim]): q, k, v = qkv_view(out, heads). A strided view, no copy; merging
    heads and head_dim into [3, T, hidden] needs one (.reshape(3, T, -1))."""
    T, N = out.shape
    if heads <= 0 or N % (3 * heads) != 0:
        raise InvalidInputError(f"N={N} is not 3 * heads * head_dim for heads={heads}")
    return out.view(T, heads, 3, N // (3 * heads)).permute(2, 0, 1, 3)


def reference(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, layer: GPTQLinear, eps: float = 1e-5) -> torch.Tensor:
    """The fp32 oracle: F.layer_norm(x) @ layer.dequantize() + bias, all in fp32. Returns fp32 [T, N]."""
    xn = F.layer_norm(x.float(), (x.shape[-1],), ln_weight.float(), ln_bias.float(), eps)
    out = xn @ layer.dequantize(torch.float32)
    return out if layer.bias is None else out + layer.bias.float()
