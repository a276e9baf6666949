"""GPT-NeoX model shapes: the Pythia suite by name, and the sizes every kernel and buffer is built from.

`pythia_config(name)` gives the Hugging Face `GPTNeoXConfig` of a named model (DESIGN.md §1);
`shape_of(config)` reduces any GPT-NeoX config to a `NeoXShape`, the few numbers neoxfuse needs,
and refuses configs whose arithmetic neoxfuse does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GPTNeoXConfig

from neoxfuse.errors import UnknownModelError, UnsupportedModelError


@dataclass(frozen=True)
class NeoXShape:
    """The sizes of a GPT-NeoX decoder.

    head_dim = hidden / heads; rotary acts on the first `rotary_dims` of each head's head_dim.
    `parallel_residual`: y = x + Attn(LN1(x)) + MLP(LN2(x)) (Pythia) if True, else
    a = x + Attn(LN1(x)); y = a + MLP(LN2(a)).
    """

    hidden: int
    layers: int
    heads: int
    head_dim: int
    rotary_dims: int
    ffn: int
    vocab: int
    max_positions: int
    parallel_residual: bool = True
    eps: float = 1e-5
    rotary_base: float = 10000.0

    @property
    def qkv_dim(self) -> int:
        """Rows of the fused query_key_value weight: 3 * hidden."""
        return 3 * self.hidden

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of weights one decode step reads.

        Per layer: query_key_value [3h, h] + [3h], dense [h, h] + [h], dense_h_to_4h [ffn, h] + [ffn],
        dense_4h_to_h [h, ffn] + [h], two LayerNorms 2 * (2h). Then the final LayerNorm (2h),
        embed_out [vocab, h] (no bias), and one row of embed_in (h): the token being decoded.
        """
        h = self.hidden
        qkv = self.qkv_dim * h + self.qkv_dim
        dense = h * h + h
        mlp = (self.ffn * h + self.ffn) + (h * self.ffn + h)
        per_layer = qkv + dense + mlp + 4 * h
        head = 2 * h + self.vocab * h
        return (self.layers * per_layer + head + h) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of KV cache one context token adds: k and v, each [hidden] per layer."""
        return 2 * self.layers * self.hidden * dtype_bytes


# name: (hidden, layers, heads, ffn, vocab). Every Pythia model: rotary on 25% of head_dim, base 10000,
# 2048 positions, parallel residual, exact GELU, LayerNorm eps 1e-5, untied embed_in / embed_out.
_PYTHIA_SIZES = {
    "pythia-70m": (512, 6, 8, 2048, 50304),
    "pythia-160m": (768, 12, 12, 3072, 50304),
    "pythia-410m": (1024, 24, 16, 4096, 50304),
    "pythia-1b": (2048, 16, 8, 8192, 50304),
    "pythia-1.4b": (2048, 24, 16, 8192, 50304),
    "pythia-2.8b": (2560, 32, 32, 10240, 50304),
    "pythia-6.9b": (4096, 32, 32, 16384, 50432),
    "pythia-12b": (5120, 36, 40, 20480, 50688),
}

# A Pythia-like shape small enough for random-weight tests on a CPU: head_dim 16, rotary 4.
_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}

MODEL_NAMES: tuple[str, ...] = (*_PYTHIA_SIZES, "tiny")


def pythia_config(name: str, **overrides) -> GPTNeoXConfig:
    """The GPTNeoXConfig of a named model (MODEL_NAMES), with `overrides` applied as GPTNeoXConfig
    keyword arguments (e.g. num_hidden_layers=2, vocab_size=1024, use_parallel_residual=False)."""
    if name == "tiny":
        sizes = dict(_TINY)
    elif name in _PYTHIA_SIZES:
        hidden, layers, heads, ffn, vocab = _PYTHIA_SIZES[name]
        sizes = {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": ffn,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
        }
    else:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    settings = {
        **sizes,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    settings.update(overrides)
    return GPTNeoXConfig(**settings)


def _rotary_settings(config) -> tuple[float, float]:
    """(fraction of head_dim rotated, rotary base) from transformers 5's `rope_parameters`
    (what the installed transformers computes with) or the older `rotary_pct` / `rotary_emb_base`."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"rope_type {rope['rope_type']!r} is not supported (plain RoPE only)")
        return float(rope["partial_rotary_factor"]), float(rope["rope_theta"])
    if getattr(config, "rope_scaling", None):
        raise UnsupportedModelError(f"rope_scaling {config.rope_scaling!r} is not supported (plain RoPE only)")
    return float(config.rotary_pct), float(config.rotary_emb_base)


def shape_of(config) -> NeoXShape:
    """The NeoXShape of a GPT-NeoX config. UnsupportedModelError for any other model type, or for
    GPT-NeoX variants neoxfuse does not compute (another activation, no biases, scaled RoPE)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt_neox":
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; neoxfuse runs gpt_neox models only")
    if config.hidden_act != "gelu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (exact erf GELU only)")
    if not getattr(config, "attention_bias", True):
        raise UnsupportedModelError("attention_bias=False is not supported (biased attention projections only)")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads != 0:
        raise UnsupportedModelError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = hidden // heads
    rotary_fraction, rotary_base = _rotary_settings(config)
    rotary_dims = int(head_dim * rotary_fraction)  # truncated, as transformers does
    if rotary_dims % 2 != 0:
        raise UnsupportedModelError(f"rotary dims {rotary_dims} must be even (rotate_half pairs dim i with i + dims/2)")
    return NeoXShape(
        hidden=hidden,
        layers=config.num_hidden_layers,
        heads=heads,
        head_dim=head_dim,
        rotary_dims=rotary_dims,
        ffn=config.intermediate_size,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        parallel_residual=bool(config.use_parallel_residual),
        eps=float(config.layer_norm_eps),
        rotary_base=rotary_base,
    )
