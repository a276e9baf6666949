"""The fused GPT-NeoX decode kernels (kernels/fused_decoder): a whole decoder layer for one token
in two cluster launches, and the final LayerNorm + logits.

For the residual stream x [hidden] (fp32) of the token at position p, `decoder_layer` computes

    q, k, v = split(LN1(x) @ W_qkv.T + b_qkv)         per head [heads, 3, head_dim] (HF's layout)
    q, k    = RoPE(q, p), RoPE(k, p)                   NeoX rotate_half on the first rotary_dims
    K[:, p], V[:, p] = k, v                            into the KV cache [heads, max_seq, head_dim]
    a       = softmax(q . K[:, 0..p] / sqrt(head_dim)) V[:, 0..p]          per head
    y       = x + (a @ W_dense.T + b_dense) + (GELU(LN2(x) @ W_in.T + b_in) @ W_out.T + b_out)

(LN with bias, one set of statistics for LN1 and LN2; exact erf GELU), `lm_head` computes
logits = LN_final(x) @ embed_out.T, and `sample_token` draws a sampled token from the logits
(temperature, top-k, top-p and neoxfuse.sampling's exponential race in one launch) with its random
state in device memory.
Weights are fp16 or bf16 (WEIGHT_DTYPES; one dtype for every weight, bias and the KV cache of a
call) in Hugging Face's layout, used as they are; k and v are rounded to nearest in that dtype
when cached; all arithmetic is fp32; x, y, the logits and the scratch buffers are fp32. Results are
bitwise reproducible (fixed reduction orders, no float atomics).

The position may be a device tensor (int32 [1]), so a CUDA graph can replay a step while the
position advances; a device position outside the cache makes y NaN and writes no cache slot.
A Python int position is checked here (SequenceTooLongError past the cache).

Ops (torch.library, namespace `neoxfuse`, with fake implementations): `fused_decoder_layer`,
`fused_lm_head` and `fused_sample_token`, all writing into given tensors. Supported: GPT-NeoX with
parallel residual, head_dim 64 (Pythia-70M, -160M, -410M), 80 (Pythia-2.8B), 96 (GPT-NeoX-20B), 128 (Pythia-1.4B,
-6.9B, -12B) or 256 (Pythia-1B): the whole Pythia suite and GPT-NeoX-20B; hidden <= 8192, on sm_90+ GPUs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from neoxfuse import _lib
from neoxfuse.checks import check_draw, check_same_device, check_sampling, check_tensor, require_cuda, require_kernel_code
from neoxfuse.configs import NeoXShape
from neoxfuse.errors import InvalidInputError, KernelError, SequenceTooLongError, UnsupportedDeviceError, UnsupportedModelError
from neoxfuse.weights import LayerWeights, ModelWeights

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)  # kernels/fused_decoder/fused_decoder.cu: with_layer_kernel_types
WEIGHT_DTYPES = (torch.float16, torch.bfloat16)  # ... and with_dtype
MAX_HIDDEN = 8192  # fused_decoder.h: NEOXFUSE_FUSED_DECODER_MAX_HIDDEN
MAX_SAMPLE_VOCAB = 65536  # fused_decoder.h: NEOXFUSE_FUSED_SAMPLE_MAX_VOCAB
MAX_CLUSTER_SIZE = 8  # kernels/common/cluster.cuh: kMaxClusterSize
MIN_CAPABILITY = (9, 0)  # thread-block clusters and griddepcontrol


class _Shape(ctypes.Structure):  # fused_decoder.h: neoxfuse_fused_shape
    _fields_ = [
        ("hidden", ctypes.c_int),
        ("heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("rotary_dims", ctypes.c_int),
        ("ffn", ctypes.c_int),
        ("max_seq", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("rotary_base", ctypes.c_float),
        ("dtype", ctypes.c_int),
    ]


class _Grid(ctypes.Structure):  # neoxfuse_fused_grid
    _fields_ = [
        ("cluster_size", ctypes.c_int),
        ("clusters", ctypes.c_int),
        ("max_active_clusters", ctypes.c_int),
        ("smem", ctypes.c_int),
    ]


class _Plan(ctypes.Structure):  # neoxfuse_fused_plan
    _fields_ = [("attn_mlp_in", _Grid), ("out_proj", _Grid)]


_LAYER_TENSORS = (
    "x", "ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias", "qkv_weight", "qkv_bias", "dense_weight", "dense_bias",
    "fc_in_weight", "fc_in_bias", "fc_out_weight", "fc_out_bias", "k_cache", "v_cache", "position", "attn", "mlp", "y",
)


class _Layer(ctypes.Structure):  # neoxfuse_fused_layer: one device pointer per tensor, in this order
    _fields_ = [(name, ctypes.c_void_p) for name in _LAYER_TENSORS]


# neoxfuse_fused_lm_head(x, ln_weight, ln_bias, embed_out, dtype, logits, hidden, vocab, eps, blocks, use_pdl, stream)
_LM_HEAD_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                             ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


@dataclass(frozen=True)
class FusedGrid:
    """How one layer kernel is launched: `clusters` clusters of `cluster_size` blocks, `smem` bytes
    of dynamic shared memory per block. `max_active_clusters`: how many such clusters the GPU runs
    at once."""

    cluster_size: int
    clusters: int
    max_active_clusters: int
    smem: int

    @property
    def blocks(self) -> int:
        return self.clusters * self.cluster_size


@dataclass(frozen=True)
class FusedPlan:
    """How the layer kernels run on one device. attn_mlp_in: at least one cluster per head (cluster
    h < heads owns head h; the others compute fc_in rows only). out_proj: its clusters split the
    rows of y."""

    attn_mlp_in: FusedGrid
    out_proj: FusedGrid


@dataclass
class Workspace:
    """The fp32 scratch a layer passes between its two kernels: attn [hidden], mlp [ffn]."""

    attn: torch.Tensor  # [hidden] the heads' attention outputs, before the dense projection
    mlp: torch.Tensor  # [ffn] GELU(fc_in)

    @classmethod
    def allocate(cls, shape: NeoXShape, device: torch.device | str) -> Workspace:
        return cls(
            attn=torch.empty(shape.hidden, dtype=torch.float32, device=device),
            mlp=torch.empty(shape.ffn, dtype=torch.float32, device=device),
        )


def unsupported_reason(shape: NeoXShape) -> str | None:
    """Why the fused kernels cannot run a model of this shape, or None if they can."""
    if not shape.parallel_residual:
        return "the fused kernels implement the parallel residual (Pythia); this model is sequential"
    if shape.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {shape.head_dim} is not built; the fused kernels support head_dim {SUPPORTED_HEAD_DIMS}"
    if shape.hidden != shape.heads * shape.head_dim:
        return f"hidden {shape.hidden} != heads {shape.heads} * head_dim {shape.head_dim}"
    if shape.hidden % 8 or shape.ffn % 8:
        return f"hidden ({shape.hidden}) and ffn ({shape.ffn}) must be multiples of 8 (16-byte rows)"
    if shape.hidden > MAX_HIDDEN:
        return f"hidden {shape.hidden} is over {MAX_HIDDEN}, the longest LayerNorm row a block holds"
    if shape.rotary_dims % 2 or not 0 <= shape.rotary_dims <= shape.head_dim:
        return f"rotary_dims {shape.rotary_dims} must be even and within head_dim {shape.head_dim}"
    return None


def check_shape(shape: NeoXShape) -> None:
    """UnsupportedModelError (saying why) unless the fused kernels run this shape."""
    reason = unsupported_reason(shape)
    if reason is not None:
        raise UnsupportedModelError(reason)


def check_weights(weights: ModelWeights) -> None:
    """UnsupportedModelError unless the kernels run the model's shape; InvalidInputError unless its
    weights are fp16 or bf16 on a CUDA device."""
    check_shape(weights.shape)
    embed_in = weights.embed_in
    if embed_in.device.type != "cuda" or embed_in.dtype not in WEIGHT_DTYPES:
        raise InvalidInputError(f"the fused kernels need fp16 or bf16 weights on a CUDA device, got {embed_in.dtype} on "
                                f"{embed_in.device}")


def _c_dtype(dtype: torch.dtype) -> int:
    if dtype not in WEIGHT_DTYPES:
        raise InvalidInputError(f"the fused kernels take float16 or bfloat16 weights, not {str(dtype).removeprefix('torch.')}")
    return _lib.DTYPE_CODES[dtype]


def _c_shape(shape: NeoXShape, max_seq: int, dtype: torch.dtype) -> _Shape:
    return _Shape(shape.hidden, shape.heads, shape.head_dim, shape.rotary_dims, shape.ffn, max_seq, shape.eps,
                  shape.rotary_base, _c_dtype(dtype))


def _c_plan(shape: NeoXShape, dtype: torch.dtype, device_index: int, cluster_size: int) -> _Plan:
    """The library's plan for `shape`'s layer sizes and weights of `dtype` on CUDA device
    `device_index`, cluster_size 0 for the plan's choice. Made once per device, sizes and dtype:
    it also sets the kernels' shared-memory limits on that device, so it must run there before the
    first launch."""
    sizes = dataclasses.replace(shape, layers=1, vocab=1, max_positions=1)  # what the plan depends on
    return _c_plan_of_sizes(sizes, dtype, device_index, cluster_size)


@functools.lru_cache(maxsize=None)
def _c_plan_of_sizes(sizes: NeoXShape, dtype: torch.dtype, device_index: int, cluster_size: int) -> _Plan:
    fn = _lib.function("neoxfuse_fused_decoder_plan", [ctypes.POINTER(_Shape), ctypes.c_int, ctypes.POINTER(_Plan)])
    result = _Plan()
    with torch.cuda.device(device_index):
        _lib.call(fn, ctypes.byref(_c_shape(sizes, 1, dtype)), cluster_size, ctypes.byref(result))
    return result


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device | str | None) -> int:
    require_cuda()
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise InvalidInputError(f"the fused kernels run on a CUDA device, got {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        raise UnsupportedDeviceError(
            f"the fused kernels need thread-block clusters (sm_90+: H100, H200, RTX 5090); cuda:{index} is "
            f"sm_{capability[0]}{capability[1]}"
        )
    require_kernel_code(torch.device("cuda", index))
    return index


def _check_cluster_size(cluster_size: int | None) -> int:
    if cluster_size is None:
        return 0
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, int) or not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise InvalidInputError(f"cluster_size must be None (the plan's choice) or 1..{MAX_CLUSTER_SIZE}, got {cluster_size!r}")
    return cluster_size


def plan(shape: NeoXShape, device: torch.device | str | None = None, cluster_size: int | None = None,
         dtype: torch.dtype = torch.float16) -> FusedPlan:
    """How the kernels run `shape` with weights of `dtype` on `device` (default: the current CUDA device).

    cluster_size None lets the library pick, for each kernel, the cluster size (<= 8 blocks) and
    count that keep the most SMs busy in one wave; 1..8 forces the size of both (for tests and
    benchmarks).
    """
    check_shape(shape)
    _c_dtype(dtype)
    return _plan_of(_c_plan(shape, dtype, _device_index(device), _check_cluster_size(cluster_size)))


def clusters_at_once(shape: NeoXShape, device: torch.device | str | None = None) -> dict[int, int | None]:
    """For each cluster size 1..8: how many attn_mlp_in clusters of it `device` runs at once
    (cudaOccupancyMaxActiveClusters). A cluster runs within one GPC, so these counts show the GPU's
    GPC layout: 132 SMs make 33 clusters of 4 only if every GPC's SM count divides by 4. None where
    a layer of `shape` cannot take that size."""
    counts: dict[int, int | None] = {}
    for size in range(1, MAX_CLUSTER_SIZE + 1):
        try:
            counts[size] = plan(shape, device, size).attn_mlp_in.max_active_clusters
        except KernelError:
            counts[size] = None
    return counts


def _plan_of(c_plan: _Plan) -> FusedPlan:
    """The FusedPlan a C plan holds."""
    grids = {name: getattr(c_plan, name) for name, _ in _Plan._fields_}
    return FusedPlan(**{name: FusedGrid(**{field: getattr(grid, field) for field, _ in _Grid._fields_})
                        for name, grid in grids.items()})


def _shape_of_call(x, heads, rotary_dims, eps, rotary_base, fc_in_weight, k_cache) -> NeoXShape:
    """The NeoXShape a layer call implies (hidden from x, ffn from fc_in, max_seq from the cache)."""
    hidden = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 1 else 0
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise InvalidInputError(f"heads must be a positive divisor of hidden ({hidden}), got {heads!r}")
    ffn = fc_in_weight.shape[0] if isinstance(fc_in_weight, torch.Tensor) and fc_in_weight.dim() == 2 else 0
    max_seq = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 3 else 0
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise InvalidInputError(f"eps must be a finite number > 0, got {eps!r}")
    if not (isinstance(rotary_base, (int, float)) and math.isfinite(rotary_base) and rotary_base > 0):
        raise InvalidInputError(f"rotary_base must be a finite number > 0, got {rotary_base!r}")
    return NeoXShape(hidden=hidden, layers=1, heads=heads, head_dim=hidden // heads, rotary_dims=rotary_dims, ffn=ffn,
                     vocab=1, max_positions=max_seq, eps=float(eps), rotary_base=float(rotary_base))


def _check_layer_values(tensors: dict[str, object], heads, rotary_dims, eps, rotary_base) -> tuple[NeoXShape, torch.dtype]:
    """Types, dtypes and shapes of a layer call, and whether the kernels support its sizes; returns
    the call's shape and its weights' dtype (ln1_weight's, which every weight and the caches share).

    Looks at no memory and no device, so it runs on CPU tensors and fake tensors alike: on a
    machine without a GPU, a wrong dtype or shape is named as such.
    """
    x = check_tensor("x", tensors["x"], dtypes=[torch.float32], shape=[None], cuda=False, contiguous=False, aligned=False)
    shape = _shape_of_call(x, heads, rotary_dims, eps, rotary_base, tensors["fc_in_weight"], tensors["k_cache"])
    check_shape(shape)
    w = check_tensor("ln1_weight", tensors["ln1_weight"], dtypes=WEIGHT_DTYPES, cuda=False, contiguous=False,
                     aligned=False).dtype
    h, f, d = shape.hidden, shape.ffn, shape.head_dim
    expected = {
        "ln1_weight": (w, [h]), "ln1_bias": (w, [h]), "ln2_weight": (w, [h]), "ln2_bias": (w, [h]),
        "qkv_weight": (w, [3 * h, h]), "qkv_bias": (w, [3 * h]), "dense_weight": (w, [h, h]), "dense_bias": (w, [h]),
        "fc_in_weight": (w, [None, h]), "fc_in_bias": (w, [f]), "fc_out_weight": (w, [h, f]), "fc_out_bias": (w, [h]),
        "k_cache": (w, [shape.heads, None, d]), "v_cache": (w, [shape.heads, shape.max_positions, d]),
        "position": (torch.int32, [1]),
        "attn": (torch.float32, [h]), "mlp": (torch.float32, [f]), "y": (torch.float32, [h]),
    }  # fmt: skip
    for name, (dtype, dims) in expected.items():
        check_tensor(name, tensors[name], dtypes=[dtype], shape=dims, cuda=False, contiguous=False, aligned=False)
    if shape.max_positions < 1:
        raise InvalidInputError("k_cache must hold at least one position")
    return shape, w


def _check_layer_memory(tensors: dict[str, torch.Tensor]) -> None:
    """Device, contiguity and alignment of every tensor, and that the outputs are distinct buffers."""
    check_same_device(**tensors)
    for name, t in tensors.items():
        check_tensor(name, t)
    _device_index(tensors["x"].device)
    written = ["k_cache", "v_cache", "attn", "mlp", "y"]
    for name in written:
        for other, t in tensors.items():
            if other != name and _overlap(tensors[name], t):
                raise InvalidInputError(f"{name} shares memory with {other}; each output needs its own buffer")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


@torch.library.custom_op("neoxfuse::fused_decoder_layer", mutates_args=("k_cache", "v_cache", "attn", "mlp", "y"))
def fused_decoder_layer(
    x: torch.Tensor,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    fc_in_weight: torch.Tensor,
    fc_in_bias: torch.Tensor,
    fc_out_weight: torch.Tensor,
    fc_out_bias: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: torch.Tensor,
    attn: torch.Tensor,
    mlp: torch.Tensor,
    y: torch.Tensor,
    heads: int,
    rotary_dims: int,
    eps: float,
    rotary_base: float,
    cluster_size: int,
    pdl: bool,
) -> None:
    """y = one GPT-NeoX layer of x at position `position` (module docstring), writing K, V at it.

    x, y [hidden] fp32; weights fp16 or bf16 in HF's layout; k_cache, v_cache [heads, max_seq,
    head_dim] of the weights' dtype; position int32 [1] on the device; attn [hidden], mlp [ffn] fp32 scratch. cluster_size
    0: the plan's. pdl: launch with programmatic dependent launch.
    """
    tensors = dict(zip(_LAYER_TENSORS, (x, ln1_weight, ln1_bias, ln2_weight, ln2_bias, qkv_weight, qkv_bias, dense_weight,
                                        dense_bias, fc_in_weight, fc_in_bias, fc_out_weight, fc_out_bias, k_cache, v_cache,
                                        position, attn, mlp, y)))
    shape, dtype = _check_layer_values(tensors, heads, rotary_dims, eps, rotary_base)
    _check_layer_memory(tensors)
    c_plan = _c_plan(shape, dtype, x.device.index, _check_cluster_size(cluster_size or None))
    layer = _Layer(*(t.data_ptr() for t in tensors.values()))
    fn = _lib.function(
        "neoxfuse_fused_decoder_layer",
        [ctypes.POINTER(_Shape), ctypes.POINTER(_Layer), ctypes.POINTER(_Plan), ctypes.c_int, ctypes.c_void_p],
    )
    with torch.cuda.device(x.device):
        _lib.call(fn, ctypes.byref(_c_shape(shape, shape.max_positions, dtype)), ctypes.byref(layer), ctypes.byref(c_plan),
                  int(pdl), torch.cuda.current_stream().cuda_stream)


@fused_decoder_layer.register_fake
def _(x, ln1_weight, ln1_bias, ln2_weight, ln2_bias, qkv_weight, qkv_bias, dense_weight, dense_bias, fc_in_weight,
      fc_in_bias, fc_out_weight, fc_out_bias, k_cache, v_cache, position, attn, mlp, y, heads, rotary_dims, eps,
      rotary_base, cluster_size, pdl):
    tensors = dict(zip(_LAYER_TENSORS, (x, ln1_weight, ln1_bias, ln2_weight, ln2_bias, qkv_weight, qkv_bias, dense_weight,
                                        dense_bias, fc_in_weight, fc_in_bias, fc_out_weight, fc_out_bias, k_cache, v_cache,
                                        position, attn, mlp, y)))
    _check_layer_values(tensors, heads, rotary_dims, eps, rotary_base)


def decoder_layer(
    x: torch.Tensor,
    layer: LayerWeights,
    shape: NeoXShape,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: int | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    cluster_size: int | None = None,
    pdl: bool = True,
) -> torch.Tensor:
    """y [hidden] fp32 = the layer `layer` of `shape` applied to x [hidden] (fp32) at `position`.

    Writes the token's k, v into k_cache, v_cache [heads, max_seq, head_dim] (the weights' dtype) at `position`
    and attends over positions 0..position. position: a Python int (SequenceTooLongError unless
    0 <= position < max_seq) or an int32 [1] device tensor (not read here). out: where y goes
    (fresh if None; never x). workspace: the scratch (allocated if None).
    """
    check_tensor("x", x, dtypes=[torch.float32], shape=[shape.hidden], cuda=False, contiguous=False, aligned=False)
    check_shape(shape)
    out = torch.empty_like(x) if out is None else out
    workspace = Workspace.allocate(shape, x.device) if workspace is None else workspace
    position_is_int = isinstance(position, int) and not isinstance(position, bool)
    if not position_is_int and not isinstance(position, torch.Tensor):
        raise InvalidInputError(f"position must be an int or an int32 [1] tensor, got {type(position).__name__}")
    position_tensor = torch.tensor([position], dtype=torch.int32, device=x.device) if position_is_int else position
    tensors = {
        "x": x, **{name: getattr(layer, name) for name in _LAYER_TENSORS[1:13]}, "k_cache": k_cache, "v_cache": v_cache,
        "position": position_tensor, "attn": workspace.attn, "mlp": workspace.mlp, "y": out,
    }  # fmt: skip
    call_shape, _ = _check_layer_values(tensors, shape.heads, shape.rotary_dims, shape.eps, shape.rotary_base)
    if call_shape.ffn != shape.ffn:
        raise InvalidInputError(f"fc_in_weight has {call_shape.ffn} rows; shape says ffn {shape.ffn}")
    if position_is_int and not 0 <= position < call_shape.max_positions:
        if position < 0:
            raise InvalidInputError(f"position must be >= 0, got {position}")
        raise SequenceTooLongError(f"position {position} is past the KV cache of {call_shape.max_positions} positions")
    fused_decoder_layer(*tensors.values(), shape.heads, shape.rotary_dims, shape.eps, shape.rotary_base,
                        _check_cluster_size(cluster_size), pdl)
    return out


def _check_lm_head_values(x, ln_weight, ln_bias, embed_out, logits, eps) -> None:
    x = check_tensor("x", x, dtypes=[torch.float32], shape=[None], cuda=False, contiguous=False, aligned=False)
    hidden = x.shape[0]
    if hidden % 8 or not 8 <= hidden <= MAX_HIDDEN:
        raise UnsupportedModelError(f"hidden {hidden} must be a multiple of 8 in 8..{MAX_HIDDEN}")
    embed_out = check_tensor("embed_out", embed_out, dtypes=WEIGHT_DTYPES, shape=[None, hidden], cuda=False,
                             contiguous=False, aligned=False)
    for name, t in [("ln_weight", ln_weight), ("ln_bias", ln_bias)]:
        check_tensor(name, t, dtypes=[embed_out.dtype], shape=[hidden], cuda=False, contiguous=False, aligned=False)
    check_tensor("logits", logits, dtypes=[torch.float32], shape=[embed_out.shape[0]], cuda=False, contiguous=False,
                 aligned=False)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise InvalidInputError(f"eps must be a finite number > 0, got {eps!r}")


@torch.library.custom_op("neoxfuse::fused_lm_head", mutates_args=("logits",))
def fused_lm_head(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, embed_out: torch.Tensor, logits: torch.Tensor,
    eps: float, pdl: bool,
) -> None:  # fmt: skip
    """logits [vocab] fp32 = LN(x) @ embed_out.T, LN(x) = (x - mean) / sqrt(var + eps) * ln_weight + ln_bias.

    x [hidden] fp32; ln_weight, ln_bias [hidden] and embed_out [vocab, hidden] fp16 or bf16 (one
    dtype). One block per SM, each taking an even share of the vocab rows.
    """
    _check_lm_head_values(x, ln_weight, ln_bias, embed_out, logits, eps)
    tensors = {"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "embed_out": embed_out, "logits": logits}
    check_same_device(**tensors)
    for name, t in tensors.items():
        check_tensor(name, t)
    _device_index(x.device)
    if _overlap(logits, x):
        raise InvalidInputError("logits shares memory with x")
    hidden, vocab = x.shape[0], embed_out.shape[0]
    fn = _lib.function("neoxfuse_fused_lm_head", _LM_HEAD_ARGTYPES)
    with torch.cuda.device(x.device):
        _lib.call(fn, x.data_ptr(), ln_weight.data_ptr(), ln_bias.data_ptr(), embed_out.data_ptr(), _c_dtype(embed_out.dtype),
                  logits.data_ptr(), hidden, vocab, eps, _multiprocessors(x.device.index), int(pdl),
                  torch.cuda.current_stream().cuda_stream)


@fused_lm_head.register_fake
def _(x, ln_weight, ln_bias, embed_out, logits, eps, pdl):
    _check_lm_head_values(x, ln_weight, ln_bias, embed_out, logits, eps)


def lm_head(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, embed_out: torch.Tensor, eps: float = 1e-5, *,
    out: torch.Tensor | None = None, pdl: bool = True,
) -> torch.Tensor:  # fmt: skip
    """logits [vocab] fp32 = LN(x) @ embed_out.T (see fused_lm_head); `out` receives them if given."""
    if out is None and isinstance(x, torch.Tensor) and isinstance(embed_out, torch.Tensor) and embed_out.dim() == 2:
        out = torch.empty(embed_out.shape[0], dtype=torch.float32, device=x.device)
    fused_lm_head(x, ln_weight, ln_bias, embed_out, out, eps, pdl)
    return out


def _check_sample_values(logits, rng, token, temperature, top_k, top_p) -> None:
    check_draw(logits, rng, name="logits")
    check_tensor("token", token, dtypes=[torch.int64], shape=[1], cuda=False, aligned=False)
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise InvalidInputError("temperature 0 is greedy decoding, which draws nothing: take the argmax of the logits")
    if logits.numel() > MAX_SAMPLE_VOCAB:
        raise UnsupportedModelError(f"vocab {logits.numel()} is over {MAX_SAMPLE_VOCAB}, the most the sampling kernel holds "
                                    "(neoxfuse.sampling.choose samples it with PyTorch ops)")


@torch.library.custom_op("neoxfuse::fused_sample_token", mutates_args=("rng", "token"))
def fused_sample_token(logits: torch.Tensor, rng: torch.Tensor, token: torch.Tensor, temperature: float, top_k: int,
                       top_p: float) -> None:
    """token [1] (int64) = a token drawn from softmax(logits / temperature), top-k and top-p
    filtered, by the exponential race over Philox draws keyed by rng[0] at draw rng[1]
    (neoxfuse.sampling.choose's rule); rng[1] += 1, on the device.

    logits [vocab] fp32 (vocab <= MAX_SAMPLE_VOCAB), rng [2] int64, token [1] int64: one CUDA
    device. temperature > 0; top_k >= 0 (0: off); top_p in (0, 1] (1: off). One cluster of 8
    blocks: the filters by radix select on chip (kernels/fused_decoder/sample.cuh).
    """
    _check_sample_values(logits, rng, token, temperature, top_k, top_p)
    tensors = {"logits": logits, "rng": rng, "token": token}
    check_same_device(**tensors)
    for name, t in tensors.items():
        check_tensor(name, t, aligned=False)
    _device_index(logits.device)
    if _overlap(rng, token):
        raise InvalidInputError("token shares memory with rng")
    fn = _lib.function("neoxfuse_fused_sample_token", [ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                                       ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])
    with torch.cuda.device(logits.device):
        _lib.call(fn, logits.data_ptr(), logits.numel(), temperature, top_k, top_p, rng.data_ptr(), token.data_ptr(),
                  torch.cuda.current_stream().cuda_stream)


@fused_sample_token.register_fake
def _(logits, rng, token, temperature, top_k, top_p):
    _check_sample_values(logits, rng, token, temperature, top_k, top_p)


def sample_token(logits: torch.Tensor, rng: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """A sampled token [1] (int64) from logits [vocab] (see fused_sample_token); `out` receives it
    if given. rng[1] advances by one."""
    if out is None and isinstance(logits, torch.Tensor):
        out = torch.empty(1, dtype=torch.long, device=logits.device)
    fused_sample_token(logits, rng, out, temperature, top_k, top_p)
    return out
