"""The oracle: GPT-NeoX decoding in plain PyTorch, formula by formula. Every kernel is checked against it.

It computes in the weights' dtype on the weights' device (tests use fp32 on CPU) and calls no
Hugging Face code; tests/test_reference.py checks it against HF's GPTNeoXForCausalLM.

One decoder layer, for T new tokens x [T, h] at positions p = start_pos .. start_pos+T-1:

    LN(x)    = (x - mean(x)) / sqrt(var(x) + eps) * w + b          (over h; biased variance)
    q, k, v  = split(LN1(x) @ W_qkv.T + b_qkv)                      (output per head: [heads, 3, head_dim])
    q, k     = RoPE(q, p), RoPE(k, p)                               (first rotary_dims of each head only)
    K[p], V[p] = k, v                                               (the KV cache)
    a_t      = sum_{j <= p_t} softmax_j(q_t . K[j] / sqrt(head_dim)) V[j]     (per head, causal)
    attn     = concat_heads(a) @ W_dense.T + b_dense
    MLP(y)   = GELU(y @ W_in.T + b_in) @ W_out.T + b_out,   GELU(z) = z/2 * (1 + erf(z / sqrt(2)))
    parallel residual (Pythia):  x' = x + attn + MLP(LN2(x))
    sequential residual:         a = x + attn;  x' = a + MLP(LN2(a))

The model: x = embed_in[tokens], the layers, then logits = LN_final(x) @ embed_out.T.

RoPE (NeoX "rotate_half", not interleaved), r = rotary_dims, for i < r/2:
    theta_i = base^(-2i / r),  angle = p * theta_i
    y_i       = x_i cos(angle) - x_{i+r/2} sin(angle)
    y_{i+r/2} = x_{i+r/2} cos(angle) + x_i sin(angle)
and dims r .. head_dim-1 pass through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from neoxfuse.configs import NeoXShape
from neoxfuse.errors import InvalidInputError, SequenceTooLongError
from neoxfuse.weights import LayerWeights, ModelWeights


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last dim, with the biased variance.

    Computed in at least fp32 and returned in x's dtype, as torch's LayerNorm does for fp16/bf16:
    in fp16, (x - mean)^2 overflows once |x - mean| > 256, which residual streams reach.
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(wide)
    mean = xw.mean(dim=-1, keepdim=True)
    var = (xw - mean).square().mean(dim=-1, keepdim=True)
    return ((xw - mean) * torch.rsqrt(var + eps) * weight.to(wide) + bias.to(wide)).to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, rotary_dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., rotary_dims] (fp32, on positions' device) of the RoPE angles at `positions` [...].

    angle[..., i] = angle[..., i + r/2] = position * base^(-2i / r) for i < r/2, r = rotary_dims.
    """
    even_dims = torch.arange(0, rotary_dims, 2, dtype=torch.float32, device=positions.device)  # [r/2]: 2i
    inv_freq = 1.0 / (base ** (even_dims / rotary_dims))  # [r/2]
    half_angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., r/2]
    angles = torch.cat([half_angles, half_angles], dim=-1)  # [..., r]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """NeoX rotate_half RoPE on the first `rotary_dims` of each head (formula in the module docstring).

    x [..., heads, head_dim]; cos, sin [..., rotary_dims] from rotary_cos_sin at the positions of
    x's leading dims (the same for every head). Returns a new tensor shaped like x.
    """
    half = rotary_dims // 2
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]  # [..., heads, r], [..., heads, head_dim - r]
    cos = cos.to(x.dtype).unsqueeze(-2)  # [..., 1, r]
    sin = sin.to(x.dtype).unsqueeze(-2)
    rotate_half = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)  # [..., heads, r]
    return torch.cat([rotated * cos + rotate_half * sin, passed], dim=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: x/2 * (1 + erf(x / sqrt(2))) (not the tanh approximation)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of each head's queries over its cached keys and values.

    q [heads, T, d]: queries at positions start .. start+T-1; k_cache, v_cache [heads, S, d] with keys
    0 .. start+T-1 written (slots past that are never read). Query t sees keys j <= start + t:
        out[:, t] = sum_j softmax_j(q[:, t] . k[:, j] / sqrt(d)) v[:, j]
    Returns [heads, T, d]. PyTorch's fused attention with the bottom-right causal mask (HF's sdpa
    attention): a long prompt's [heads, T, S] scores are never written to memory on a GPU.
    """
    tokens, seen = q.shape[1], start + q.shape[1]
    keys, values = k_cache[:, :seen], v_cache[:, :seen]  # [heads, seen, d]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(tokens, seen))  # [heads, T, d]


def mlp(x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
    """GELU(x @ fc_in.T + b_in) @ fc_out.T + b_out; x [T, h] -> [T, h]."""
    return gelu(x @ layer.fc_in_weight.T + layer.fc_in_bias) @ layer.fc_out_weight.T + layer.fc_out_bias


def decoder_layer(
    x: torch.Tensor,
    layer: LayerWeights,
    shape: NeoXShape,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start_pos: int,
) -> torch.Tensor:
    """One GPT-NeoX layer on T new tokens x [T, h] at positions start_pos .. start_pos+T-1.

    Writes their rotated keys and their values into k_cache, v_cache [heads, max_seq, head_dim] at
    those positions, attends causally over the cache, and returns x' [T, h] (module docstring).
    """
    tokens = x.shape[0]
    if start_pos + tokens > k_cache.shape[1]:
        raise SequenceTooLongError(
            f"positions {start_pos}..{start_pos + tokens - 1} do not fit a KV cache of {k_cache.shape[1]} positions"
        )
    positions = torch.arange(start_pos, start_pos + tokens, device=x.device)  # [T]

    qkv = layer_norm(x, layer.ln1_weight, layer.ln1_bias, shape.eps) @ layer.qkv_weight.T + layer.qkv_bias  # [T, 3h]
    q, k, v = qkv.view(tokens, shape.heads, 3, shape.head_dim).unbind(dim=2)  # each [T, heads, head_dim]
    cos, sin = rotary_cos_sin(positions, shape.rotary_dims, shape.rotary_base)  # [T, rotary_dims]
    q = apply_rotary(q, cos, sin, shape.rotary_dims)
    k = apply_rotary(k, cos, sin, shape.rotary_dims)

    k_cache[:, start_pos : start_pos + tokens] = k.transpose(0, 1)  # [heads, T, head_dim]
    v_cache[:, start_pos : start_pos + tokens] = v.transpose(0, 1)
    heads_out = attention(q.transpose(0, 1), k_cache, v_cache, start_pos)  # [heads, T, head_dim]
    attn = heads_out.transpose(0, 1).reshape(tokens, shape.hidden) @ layer.dense_weight.T + layer.dense_bias  # [T, h]

    if shape.parallel_residual:
        return x + attn + mlp(layer_norm(x, layer.ln2_weight, layer.ln2_bias, shape.eps), layer)
    after_attn = x + attn
    return after_attn + mlp(layer_norm(after_attn, layer.ln2_weight, layer.ln2_bias, shape.eps), layer)


@dataclass
class KVCache:
    """Keys (rotated) and values of every layer for positions 0 .. length-1; slots past length are unused."""

    k: torch.Tensor  # [layers, heads, max_seq_len, head_dim]
    v: torch.Tensor  # [layers, heads, max_seq_len, head_dim]
    length: int = 0

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]


class ReferenceModel:
    """GPT-NeoX prefill and single-token decode over a KVCache, in the weights' dtype and device."""

    def __init__(self, weights: ModelWeights, max_seq_len: int | None = None):
        shape = weights.shape
        max_seq_len = shape.max_positions if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= shape.max_positions:
            raise InvalidInputError(f"max_seq_len must be in 1..{shape.max_positions} (the model's positions), "
                                    f"got {max_seq_len}")
        self.weights = weights
        self.shape = shape
        self.max_seq_len = max_seq_len

    def new_cache(self) -> KVCache:
        """An empty cache of max_seq_len positions (zero-filled)."""
        s = self.shape
        size = (s.layers, s.heads, self.max_seq_len, s.head_dim)
        like = self.weights.embed_in
        return KVCache(k=like.new_zeros(size), v=like.new_zeros(size))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor | Sequence[int], cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """Logits [T, vocab] of T tokens appended at cache.length; cache.length grows by T. last_only:
        the last token's logits only ([1, vocab]; all that generation reads), the LM head skipped for the rest.

        SequenceTooLongError if they do not fit the cache; InvalidInputError for ids outside
        0..vocab-1, non-integer or empty tokens, or a cache of another model. The cache is
        unchanged when an error is raised.
        """
        token_ids = self._checked_tokens(tokens)  # [T]
        self.check_cache(cache, len(token_ids))
        w = self.weights
        x = w.embed_in[token_ids]  # [T, h]
        for index, layer in enumerate(w.layers):
            x = decoder_layer(x, layer, self.shape, cache.k[index], cache.v[index], cache.length)
        cache.length += len(token_ids)
        if last_only:
            x = x[-1:]  # [1, h]
        return layer_norm(x, w.final_ln_weight, w.final_ln_bias, self.shape.eps) @ w.embed_out.T  # [T or 1, vocab]

    def decode_step(self, token: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [vocab] of one token appended at cache.length (prefill of a single token)."""
        token_ids = torch.as_tensor(token)
        if token_ids.numel() != 1:
            raise InvalidInputError(f"decode_step takes one token, got {token_ids.numel()}")
        return self.prefill(token_ids.reshape(1), cache)[0]

    def _checked_tokens(self, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        token_ids = torch.as_tensor(tokens)
        if token_ids.dtype == torch.bool or token_ids.is_floating_point() or token_ids.is_complex():
            raise InvalidInputError(f"token ids must be integers, got {token_ids.dtype}")
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise InvalidInputError(f"tokens must be a non-empty 1-D sequence of ids, got {list(token_ids.shape)}")
        bad = token_ids[(token_ids < 0) | (token_ids >= self.shape.vocab)]
        if bad.numel():
            raise InvalidInputError(f"token ids must be in 0..{self.shape.vocab - 1}, got {bad[:8].tolist()}")
        return token_ids.to(device=self.weights.embed_in.device, dtype=torch.long)

    def check_cache(self, cache: KVCache, new_tokens: int) -> None:
        """InvalidInputError unless `cache` is this model's; SequenceTooLongError unless `new_tokens` more fit."""
        s, like = self.shape, self.weights.embed_in
        for name, tensor in [("k", cache.k), ("v", cache.v)]:
            sizes = tuple(tensor.shape[i] for i in (0, 1, 3)) if tensor.dim() == 4 else None
            if sizes != (s.layers, s.heads, s.head_dim):
                raise InvalidInputError(
                    f"cache.{name} must be [layers={s.layers}, heads={s.heads}, max_seq_len, head_dim={s.head_dim}], "
                    f"got {list(tensor.shape)} (use new_cache())"
                )
            if tensor.dtype != like.dtype or tensor.device != like.device:
                raise InvalidInputError(f"cache.{name} must be {like.dtype} on {like.device} like the weights, "
                                        f"got {tensor.dtype} on {tensor.device}")
        if cache.k.shape != cache.v.shape:
            raise InvalidInputError(f"cache.k {list(cache.k.shape)} and cache.v {list(cache.v.shape)} differ")
        if cache.length + new_tokens > cache.max_seq_len:
            raise SequenceTooLongError(
                f"{new_tokens} tokens at position {cache.length} run past the KV cache of {cache.max_seq_len} positions"
            )
