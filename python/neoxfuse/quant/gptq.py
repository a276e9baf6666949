"""GPTQ int4 linear layers exactly as AutoGPTQ, GPTQModel, optimum and transformers store them.

A GPTQ linear layer `y = x @ W + bias` (x [.., K], y [.., N], W [K, N]) is kept as

    qweight  int32 [K/8, N]       q[k, n] = (qweight[k // 8, n] >> 4 * (k % 8)) & 0xF
                                  (8 consecutive input rows per word, lowest bits first)
    qzeros   int32 [groups, N/8]  stored[g, n] = (qzeros[g, n // 8] >> 4 * (n % 8)) & 0xF
                                  (8 consecutive output columns per word, lowest bits first)
    scales   fp16  [groups, N]
    g_idx    int32 [K]            the group of input row k: k // group_size, or a permuted
                                  assignment under act-order (desc_act)
    bias     fp16  [N]            optional

and dequantized as

    W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]),   z = stored + zero_offset

where zero_offset is 1 for checkpoint_format "gptq" (v1: AutoGPTQ stores the true zero
minus 1, so a v1 zero lies in 1..16) and 0 for "gptq_v2" (GPTQModel stores the true zero,
0..15). Symmetric quantization uses z = 8 everywhere (stored 7 in v1, 8 in v2).
`groups` is K / group_size; group_size -1 means one group per output column (groups = 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neoxfuse.checks import is_integer
from neoxfuse.errors import InvalidInputError, UnsupportedModelError

BITS = 4
MAX_Q = (1 << BITS) - 1  # 15: largest int4 code
PACK = 32 // BITS  # 8 int4 values per int32 word
SYMMETRIC_ZERO = 1 << (BITS - 1)  # 8: the true zero of symmetric quantization

# checkpoint_format -> zero_offset (true zero = stored nibble + zero_offset)
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}

# Where AutoGPTQ / GPTQModel put the quantization settings, in the order GPTQModel reads them;
# config.json holds them under "quantization_config".
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


@dataclass(frozen=True)
class QuantConfig:
    """The quantization settings of a GPTQ checkpoint, as quantize_config.json spells them.

    group_size: input rows per scale/zero group; -1 = one group over all K (per channel).
    sym: symmetric (z = 8 everywhere) or asymmetric (a zero per group and column).
    desc_act: act-order; g_idx is then a permuted group assignment.
    checkpoint_format: "gptq" (v1, stored zero = true zero - 1) or "gptq_v2" (true zero).
    """

    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    bits: int = BITS

    def __post_init__(self):
        if self.bits != BITS:
            raise UnsupportedModelError(f"only {BITS}-bit GPTQ is supported, got bits={self.bits}")
        if self.checkpoint_format not in ZERO_OFFSETS:
            raise UnsupportedModelError(
                f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported; "
                f"supported: {', '.join(ZERO_OFFSETS)} (marlin/bitblas/qqq repack the weights differently)"
            )
        size = self.group_size
        if not is_integer(size) or (size != -1 and (size <= 0 or size % PACK != 0)):
            raise InvalidInputError(f"group_size must be -1 or a positive multiple of {PACK}, got {size!r}")
        object.__setattr__(self, "group_size", int(size))  # NumPy's -> Python's, as JSON writes it
        for name in ("sym", "desc_act"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero nibble to get the true zero: 1 for v1, 0 for v2."""
        return ZERO_OFFSETS[self.checkpoint_format]

    @classmethod
    def from_dict(cls, config: dict) -> QuantConfig:
        """Reads quantize_config.json's dict, or config.json's "quantization_config".

        The format is read from "checkpoint_format" (AutoGPTQ, GPTQModel's JSON, transformers),
        else "format" (transformers' and GPTQModel's in-code name); absent means v1 "gptq".
        """
        method = config.get("quant_method", "gptq")
        if method != "gptq":
            raise UnsupportedModelError(f"quant_method {method!r} is not GPTQ")
        if config.get("is_marlin_format", False):
            raise UnsupportedModelError("Marlin-format GPTQ checkpoints repack the weights; only gptq / gptq_v2 are supported")
        if config.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise UnsupportedModelError(f"GPTQ pack_dtype {config['pack_dtype']!r} is not supported; only int32")
        checkpoint_format = config.get("checkpoint_format") or config.get("format") or "gptq"

        def setting(name: str, default):
            """The value as written (checked by __post_init__, not converted: bool("false") is True), or
            the default when absent or null."""
            value = config.get(name)
            return default if value is None else value

        return cls(bits=setting("bits", BITS), group_size=setting("group_size", 128), sym=setting("sym", True),
                   desc_act=setting("desc_act", False), checkpoint_format=str(checkpoint_format).lower())

    def to_dict(self) -> dict:
        """quantize_config.json as AutoGPTQ / GPTQModel write it (also config.json's quantization_config)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
        }


def read_quant_config(directory: str | Path) -> QuantConfig:
    """The QuantConfig of a checkpoint directory: quantize_config.json (or quant_config.json),
    else config.json's "quantization_config". UnsupportedModelError if neither says GPTQ."""
    directory = Path(directory)
    for name in QUANT_CONFIG_FILES:
        path = directory / name
        if path.is_file():
            return QuantConfig.from_dict(json.loads(path.read_text()))
    config_path = directory / "config.json"
    if config_path.is_file():
        quantization = json.loads(config_path.read_text()).get("quantization_config")
        if quantization is not None:
            return QuantConfig.from_dict(quantization)
    raise UnsupportedModelError(
        f"{directory} is not a GPTQ checkpoint: no {' / '.join(QUANT_CONFIG_FILES)} and no quantization_config in config.json"
    )


def _check_codes(name: str, codes: torch.Tensor) -> None:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise InvalidInputError(f"{name} must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > MAX_Q):
        raise InvalidInputError(f"{name} must hold int4 codes in 0..{MAX_Q}, got {int(codes.min())}..{int(codes.max())}")


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(PACK, dtype=torch.int64, device=device) * BITS  # [8]: 0, 4, ..., 28


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] codes 0..15 -> qweight int32 [K/8, N]: word[r, n] = sum_i q[8r + i, n] << 4i."""
    _check_codes("q", q)
    if q.dim() != 2 or q.shape[0] % PACK != 0:
        raise InvalidInputError(f"q must be [K, N] with K divisible by {PACK}, got {list(q.shape)}")
    rows = q.to(torch.int64).view(q.shape[0] // PACK, PACK, q.shape[1])  # [K/8, 8, N]
    words = (rows << _shifts(q.device)[None, :, None]).sum(dim=1)  # [K/8, N], 32-bit patterns in int64
    return words.to(torch.int32)  # same bits; patterns >= 2**31 wrap negative, as int32 checkpoints hold them


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K/8, N] -> q uint8 [K, N] (inverse of pack_int4_rows)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise InvalidInputError(f"qweight must be int32 [K/8, N], got {qweight.dtype} {list(qweight.shape)}")
    codes = (qweight.unsqueeze(1).to(torch.int64) >> _shifts(qweight.device)[None, :, None]) & MAX_Q  # [K/8, 8, N]
    return codes.reshape(-1, qweight.shape[1]).to(torch.uint8)


def pack_int4_cols(z: torch.Tensor) -> torch.Tensor:
    """z [G, N] codes 0..15 -> qzeros int32 [G, N/8]: word[g, c] = sum_i z[g, 8c + i] << 4i."""
    _check_codes("zeros", z)
    if z.dim() != 2 or z.shape[1] % PACK != 0:
        raise InvalidInputError(f"zeros must be [groups, N] with N divisible by {PACK}, got {list(z.shape)}")
    cols = z.to(torch.int64).view(z.shape[0], z.shape[1] // PACK, PACK)  # [G, N/8, 8]
    words = (cols << _shifts(z.device)).sum(dim=2)  # [G, N/8], 32-bit patterns in int64
    return words.to(torch.int32)


def unpack_int4_cols(qzeros: torch.Tensor) -> torch.Tensor:
    """qzeros int32 [G, N/8] -> stored zero codes uint8 [G, N] (inverse of pack_int4_cols)."""
    if qzeros.dtype != torch.int32 or qzeros.dim() != 2:
        raise InvalidInputError(f"qzeros must be int32 [groups, N/8], got {qzeros.dtype} {list(qzeros.shape)}")
    codes = (qzeros.unsqueeze(2).to(torch.int64) >> _shifts(qzeros.device)) & MAX_Q  # [G, N/8, 8]
    return codes.reshape(qzeros.shape[0], -1).to(torch.uint8)


def resolve_group_size(group_size: int, K: int) -> int:
    """Input rows per group: group_size, or K for per-channel (-1). InvalidInputError unless it divides K."""
    if K <= 0 or K % PACK != 0:
        raise InvalidInputError(f"K (input features) must be a positive multiple of {PACK}, got {K}")
    rows = K if group_size == -1 else group_size
    if rows <= 0 or K % rows != 0:
        raise InvalidInputError(f"K={K} is not divisible by group_size={group_size}")
    return rows


def ordered_g_idx(K: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """g_idx without act-order: int32 [K], g_idx[k] = k // group_size (all 0 for per-channel)."""
    rows = resolve_group_size(group_size, K)
    return (torch.arange(K, dtype=torch.int32, device=device) // rows).to(torch.int32)


def act_order_g_idx(order: torch.Tensor, group_size: int) -> torch.Tensor:
    """g_idx under act-order: the input rows are quantized in `order` (a permutation of 0..K-1,
    e.g. by decreasing activation energy), so g_idx[order[i]] = i // group_size."""
    K = order.numel()
    rows = resolve_group_size(group_size, K)
    if not torch.equal(torch.sort(order.to(torch.int64)).values, torch.arange(K, device=order.device)):
        raise InvalidInputError("order must be a permutation of 0..K-1")
    g_idx = torch.empty(K, dtype=torch.int32, device=order.device)
    g_idx[order.to(torch.int64)] = (torch.arange(K, device=order.device) // rows).to(torch.int32)
    return g_idx


@dataclass
class GPTQLinear:
    """One GPTQ int4 linear layer in the ecosystem's tensors (module docstring for the format).

    Construction checks every shape, dtype and range and raises InvalidInputError naming what
    is wrong. `ordered` says whether g_idx is the plain k // group_size assignment (kernels
    take a faster path then).
    """

    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [groups, N/8]
    scales: torch.Tensor  # fp16 [groups, N]
    g_idx: torch.Tensor  # int32 [K]
    bias: torch.Tensor | None  # fp16 [N]
    group_size: int  # as configured: rows per group, or -1 (per channel)
    checkpoint_format: str = "gptq"
    ordered: bool = field(init=False)

    def __post_init__(self):
        if self.checkpoint_format not in ZERO_OFFSETS:
            raise InvalidInputError(f"checkpoint_format must be one of {', '.join(ZERO_OFFSETS)}, got {self.checkpoint_format!r}")
        expected = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
        for name, dtype in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise InvalidInputError(f"{name} must be {str(dtype).replace('torch.', '')}, got {str(t.dtype).replace('torch.', '')}")
        if self.qweight.dim() != 2 or self.g_idx.dim() != 1:
            raise InvalidInputError(f"qweight must be 2-D [K/8, N] and g_idx 1-D [K], got {list(self.qweight.shape)} and {list(self.g_idx.shape)}")
        K, N = self.g_idx.numel(), self.qweight.shape[1]
        if K % PACK != 0:
            raise InvalidInputError(f"K={K} (length of g_idx) must be divisible by {PACK}: qweight packs {PACK} input rows per int32")
        if self.qweight.shape[0] * PACK != K:
            raise InvalidInputError(f"qweight must be [K/8, N] = [{K // PACK}, N] for K={K}, got {list(self.qweight.shape)}")
        if N % PACK != 0:
            raise InvalidInputError(f"N={N} (output features) must be divisible by {PACK}: qzeros packs {PACK} columns per int32")
        groups = K // resolve_group_size(self.group_size, K)
        if list(self.scales.shape) != [groups, N]:
            raise InvalidInputError(f"scales must be [groups, N] = [{groups}, {N}] (K={K}, group_size={self.group_size}), got {list(self.scales.shape)}")
        if list(self.qzeros.shape) != [groups, N // PACK]:
            raise InvalidInputError(f"qzeros must be [groups, N/8] = [{groups}, {N // PACK}], got {list(self.qzeros.shape)}")
        if self.bias is not None:
            if not isinstance(self.bias, torch.Tensor) or self.bias.dtype != torch.float16 or list(self.bias.shape) != [N]:
                got = f"{self.bias.dtype} {list(self.bias.shape)}" if isinstance(self.bias, torch.Tensor) else type(self.bias).__name__
                raise InvalidInputError(f"bias must be fp16 [N] = [{N}], got {got}")
        devices = {t.device for t in (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias) if t is not None}
        if len(devices) > 1:
            raise InvalidInputError(f"GPTQ tensors must be on one device, got {sorted(str(d) for d in devices)}")
        low, high = int(self.g_idx.min()), int(self.g_idx.max())
        if low < 0 or high >= groups:
            raise InvalidInputError(f"g_idx must lie in 0..{groups - 1} (groups), got {low}..{high}")
        self.ordered = torch.equal(self.g_idx, ordered_g_idx(K, self.group_size, self.g_idx.device))

    @property
    def in_features(self) -> int:  # K
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:  # N
        return self.qweight.shape[1]

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    @property
    def zero_offset(self) -> int:
        return ZERO_OFFSETS[self.checkpoint_format]

    def codes(self) -> torch.Tensor:
        """q: uint8 [K, N], the int4 code of every weight."""
        return unpack_int4_rows(self.qweight)

    def zeros(self) -> torch.Tensor:
        """z: int32 [groups, N], the true zero points (stored nibble + zero_offset)."""
        return unpack_int4_cols(self.qzeros).to(torch.int32) + self.zero_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W: [K, N] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]), computed in fp32."""
        g = self.g_idx.to(torch.int64)
        w = self.scales.float()[g] * (self.codes().float() - self.zeros().float()[g])
        return w.to(dtype)

    def to(self, device: torch.device | str) -> GPTQLinear:
        bias = None if self.bias is None else self.bias.to(device)
        return GPTQLinear(self.qweight.to(device), self.qzeros.to(device), self.scales.to(device),
                          self.g_idx.to(device), bias, self.group_size, self.checkpoint_format)

    def with_format(self, checkpoint_format: str) -> GPTQLinear:
        """The same weights stored in another checkpoint_format (only qzeros change).

        InvalidInputError if a zero cannot be stored there: v1 holds zeros 1..16, v2 0..15.
        """
        if checkpoint_format not in ZERO_OFFSETS:
            raise InvalidInputError(f"checkpoint_format must be one of {', '.join(ZERO_OFFSETS)}, got {checkpoint_format!r}")
        stored = self.zeros() - ZERO_OFFSETS[checkpoint_format]
        if int(stored.min()) < 0 or int(stored.max()) > MAX_Q:
            low, high = ZERO_OFFSETS[checkpoint_format], MAX_Q + ZERO_OFFSETS[checkpoint_format]
            raise InvalidInputError(f"zeros {int(self.zeros().min())}..{int(self.zeros().max())} do not fit "
                                    f"checkpoint_format {checkpoint_format!r} (zeros {low}..{high})")
        return GPTQLinear(self.qweight, pack_int4_cols(stored), self.scales, self.g_idx, self.bias,
                          self.group_size, checkpoint_format)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under the names a GPTQ checkpoint uses: prefix.qweight, .qzeros, .scales, .g_idx, .bias."""
        tensors = {f"{prefix}.qweight": self.qweight, f"{prefix}.qzeros": self.qzeros,
                   f"{prefix}.scales": self.scales, f"{prefix}.g_idx": self.g_idx}
        if self.bias is not None:
            tensors[f"{prefix}.bias"] = self.bias
        return tensors


def _round_up_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 values >= x (x fp32, positive): round to nearest, then step up one ulp
    where that fell below (the next positive fp16 has the next bit pattern)."""
    h = x.to(torch.float16)
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(h.float() < x, up, h)


def quantize_rtn(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: QuantConfig = QuantConfig(),
    order: torch.Tensor | None = None,
) -> GPTQLinear:
    """Round-to-nearest int4 quantization of an nn.Linear weight into the GPTQ format.

    weight: [N, K] (nn.Linear's [out, in]); bias: [N] or None. For each group g and column n,
    with w the group's weights (0 included in the range for asymmetric quantization):
      symmetric:  s = 2 max|w| / 15, z = 8
      asymmetric: s = (max w - min w) / 15, z = round(-min w / s)
    s is rounded up to fp16 (so the range is covered) and q = clamp(round(w / s) + z, 0, 15),
    which bounds |W - s (q - z)| by s / 2. A v1 checkpoint cannot store z = 0; such groups get
    z = 1 and s = max w / 14, which keeps the bound.
    Act-order (config.desc_act): rows are grouped in `order` (default: decreasing ||W[k, :]||,
    a stand-in for GPTQ's activation statistics), g_idx[order[i]] = i // group_size.
    """
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise InvalidInputError(f"weight must be a floating [N, K] tensor, got {weight.dtype} {list(weight.shape)}")
    N, K = weight.shape
    rows = resolve_group_size(config.group_size, K)
    if N % PACK != 0:
        raise InvalidInputError(f"N={N} (output features) must be divisible by {PACK}")
    W = weight.detach().float().t()  # [K, N]
    if config.desc_act:
        if order is None:
            order = torch.argsort(W.norm(dim=1), descending=True, stable=True)
        g_idx = act_order_g_idx(order.to(W.device), config.group_size)
    elif order is not None:
        raise InvalidInputError("order is only used with act-order (config.desc_act=True)")
    else:
        g_idx = ordered_g_idx(K, config.group_size, W.device)
    groups = K // rows
    grouped = W[torch.argsort(g_idx, stable=True)].view(groups, rows, N)  # [groups, rows, N]
    w_min = grouped.amin(dim=1).clamp(max=0.0)  # [groups, N]
    w_max = grouped.amax(dim=1).clamp(min=0.0)
    empty = w_max == w_min  # all-zero group: any scale works; AutoGPTQ uses the range [-1, 1]
    w_min, w_max = torch.where(empty, -1.0, w_min), torch.where(empty, 1.0, w_max)
    if config.sym:
        scales = _round_up_to_fp16(2 * torch.maximum(-w_min, w_max) / MAX_Q)
        zeros = torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.int32)
    else:
        scales = _round_up_to_fp16((w_max - w_min) / MAX_Q)
        zeros = torch.round(-w_min / scales.float()).to(torch.int32)
        if config.zero_offset == 1:  # v1 stores z - 1: move z = 0 to z = 1 and cover [0, max] with 14 steps
            unstorable = zeros == 0
            scales = torch.where(unstorable, _round_up_to_fp16(w_max / (MAX_Q - 1)), scales)
            zeros = torch.where(unstorable, 1, zeros)
    g = g_idx.to(torch.int64)
    q = torch.clamp(torch.round(W / scales.float()[g]) + zeros[g], 0, MAX_Q).to(torch.int32)  # [K, N]
    return GPTQLinear(
        qweight=pack_int4_rows(q),
        qzeros=pack_int4_cols(zeros - config.zero_offset),
        scales=scales.to(torch.float16),
        g_idx=g_idx,
        bias=None if bias is None else bias.detach().to(torch.float16),
        group_size=config.group_size,
        checkpoint_format=config.checkpoint_format,
    )
