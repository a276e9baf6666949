"""Model shapes: every named model matches DESIGN.md §1, and the byte counts benchmarks divide by."""

from types import SimpleNamespace

import pytest
from transformers import GPT2Config, GPTNeoXConfig

from neoxfuse.configs import MODEL_NAMES, NeoXShape, pythia_config, shape_of
from neoxfuse.errors import UnknownModelError, UnsupportedModelError
from neoxfuse.weights import random_model

# DESIGN.md §1: hidden, layers, heads, head_dim, rotary dims, ffn, vocab.
DESIGN_TABLE = {
    "pythia-70m": (512, 6, 8, 64, 16, 2048, 50304),
    "pythia-160m": (768, 12, 12, 64, 16, 3072, 50304),
    "pythia-410m": (1024, 24, 16, 64, 16, 4096, 50304),
    "pythia-1b": (2048, 16, 8, 256, 64, 8192, 50304),
    "pythia-1.4b": (2048, 24, 16, 128, 32, 8192, 50304),
    "pythia-2.8b": (2560, 32, 32, 80, 20, 10240, 50304),
    "pythia-6.9b": (4096, 32, 32, 128, 32, 16384, 50432),
    "pythia-12b": (5120, 36, 40, 128, 32, 20480, 50688),
}


def test_every_pythia_model_is_named():
    assert set(MODEL_NAMES) == set(DESIGN_TABLE) | {"tiny"}


@pytest.mark.parametrize("name", sorted(DESIGN_TABLE))
def test_named_shape_matches_design_table(name):
    shape = shape_of(pythia_config(name))
    got = (shape.hidden, shape.layers, shape.heads, shape.head_dim, shape.rotary_dims, shape.ffn, shape.vocab)
    assert got == DESIGN_TABLE[name]
    # The rest is common to every Pythia model (DESIGN.md §1).
    assert shape.parallel_residual is True
    assert shape.eps == 1e-5
    assert shape.rotary_base == 10000.0
    assert shape.max_positions == 2048
    assert shape.qkv_dim == 3 * shape.hidden


def test_tiny_shape():
    shape = shape_of(pythia_config("tiny"))
    assert (shape.hidden, shape.layers, shape.heads, shape.head_dim, shape.rotary_dims) == (64, 2, 4, 16, 4)
    assert (shape.ffn, shape.vocab, shape.max_positions) == (256, 512, 256)


def test_pythia_config_is_pythia_arithmetic():
    config = pythia_config("pythia-2.8b")
    assert config.model_type == "gpt_neox"
    assert config.hidden_act == "gelu"  # exact erf GELU, not gelu_new / gelu_fast
    assert config.tie_word_embeddings is False
    assert config.use_parallel_residual is True


def test_pythia_config_overrides():
    config = pythia_config("pythia-2.8b", num_hidden_layers=2, vocab_size=1000, use_parallel_residual=False)
    shape = shape_of(config)
    assert (shape.layers, shape.vocab, shape.parallel_residual) == (2, 1000, False)
    assert (shape.hidden, shape.head_dim, shape.rotary_dims) == (2560, 80, 20)


def test_pythia_2_8b_fp16_decode_reads_5_29_gb():
    shape = shape_of(pythia_config("pythia-2.8b"))
    assert round(shape.weight_bytes(2) / 1e9, 2) == 5.29  # DESIGN.md §1
    assert shape.weight_bytes(4) == 2 * shape.weight_bytes(2)
    assert shape.kv_bytes_per_token(2) == 320 * 1024  # DESIGN.md §1: 320 KiB per context token


def test_weight_bytes_counts_every_parameter_but_embed_in():
    # Counted independently: the parameters of an actual HF model, less embed_in but one row.
    model = random_model(pythia_config("tiny", vocab_size=300, intermediate_size=200))
    shape = shape_of(model.config)
    embed_in = model.get_input_embeddings().weight
    parameters = sum(p.numel() for p in model.parameters()) - embed_in.numel() + embed_in.shape[1]
    assert shape.weight_bytes(2) == 2 * parameters
    assert shape.kv_bytes_per_token(4) == 4 * 2 * shape.layers * shape.hidden


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(UnknownModelError, match="pythia-2.8b") as error:
        pythia_config("pythia-3b")
    assert "'pythia-3b'" in str(error.value)


def test_other_model_types_are_unsupported():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        shape_of(GPT2Config())


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"hidden_act": "gelu_fast"}, "hidden_act"),
        ({"attention_bias": False}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
         "rope_type"),
        ({"hidden_size": 40, "num_attention_heads": 4, "rotary_pct": 0.3}, "even"),  # head_dim 10 -> 3 rotary dims
    ],
)
def test_neox_variants_neoxfuse_does_not_compute_are_refused(overrides, complaint):
    with pytest.raises(UnsupportedModelError, match=complaint):
        shape_of(pythia_config("tiny", **overrides))


def test_rotary_read_from_rope_parameters():
    # transformers 5 keeps the rotary settings in rope_parameters, also when a config.json says rotary_pct.
    rope = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    given = pythia_config("tiny", rope_parameters=rope)
    from_json = GPTNeoXConfig.from_dict({**pythia_config("tiny").to_dict(), "rope_parameters": None,
                                         "rotary_pct": 0.5, "rotary_emb_base": 500})
    for config in (given, from_json):
        assert (shape_of(config).rotary_dims, shape_of(config).rotary_base) == (8, 500.0)


def test_rotary_read_from_transformers_4_attributes():
    # A transformers 4 GPTNeoXConfig has rotary_pct / rotary_emb_base attributes and no rope_parameters.
    settings = pythia_config("tiny").to_dict()
    del settings["rope_parameters"]
    older = SimpleNamespace(**settings, rotary_pct=0.5, rotary_emb_base=500, rope_scaling=None)
    shape = shape_of(older)
    assert (shape.rotary_dims, shape.rotary_base, shape.hidden) == (8, 500.0, 64)


def test_shape_is_immutable_and_comparable():
    shape = shape_of(pythia_config("tiny"))
    assert shape == NeoXShape(hidden=64, layers=2, heads=4, head_dim=16, rotary_dims=4, ffn=256, vocab=512,
                              max_positions=256)
    with pytest.raises(AttributeError):
        shape.hidden = 128
