"""The GPTQ int4 format (neoxfuse.quant): packing bit for bit, dequantization, v1/v2 zero points,
act-order, the round-to-nearest quantizer's error bound, checkpoint loading, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTQConfig

from neoxfuse.errors import InvalidInputError, UnsupportedModelError
from neoxfuse.quant import (
    LAYER_LINEARS,
    GPTQLinear,
    QuantConfig,
    act_order_g_idx,
    layer_linear_name,
    load_gptq_checkpoint,
    ordered_g_idx,
    pack_int4_cols,
    pack_int4_rows,
    quantize_gpt_neox,
    quantize_rtn,
    read_quant_config,
    save_gptq_checkpoint,
    unpack_int4_cols,
    unpack_int4_rows,
)
from neoxfuse.quant.hf_gptq import dequantized_gpt_neox, gptq_gpt_neox

GROUP_SIZES = [32, 64, 128, -1]
FORMATS = ["gptq", "gptq_v2"]


def _random_codes(*shape, generator=None):
    return torch.randint(0, 16, shape, dtype=torch.int32, generator=generator)


def _nibble(word: int, i: int) -> int:
    return (word >> (4 * i)) & 0xF  # Python ints: a negative int32 word keeps its two's-complement bits


# ---- packing -------------------------------------------------------------------------------------


def test_pack_rows_puts_8_consecutive_input_rows_in_one_word_lowest_bits_first():
    q = _random_codes(64, 24)
    qweight = pack_int4_rows(q)
    assert qweight.dtype == torch.int32 and list(qweight.shape) == [8, 24]
    for k in range(64):
        for n in range(24):
            assert _nibble(int(qweight[k // 8, n]), k % 8) == int(q[k, n])


def test_pack_cols_puts_8_consecutive_columns_in_one_word_lowest_bits_first():
    z = _random_codes(5, 40)
    qzeros = pack_int4_cols(z)
    assert qzeros.dtype == torch.int32 and list(qzeros.shape) == [5, 5]
    for g in range(5):
        for n in range(40):
            assert _nibble(int(qzeros[g, n // 8]), n % 8) == int(z[g, n])


@pytest.mark.parametrize("K,N", [(8, 8), (128, 48), (2560, 96)])
def test_pack_unpack_round_trips(K, N):
    q = _random_codes(K, N)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(q)).to(torch.int32), q)
    z = _random_codes(K // 8, N)
    assert torch.equal(unpack_int4_cols(pack_int4_cols(z)).to(torch.int32), z)
    words = torch.randint(-(2**31), 2**31, (K // 8, N), dtype=torch.int64).to(torch.int32)  # every bit pattern
    assert torch.equal(pack_int4_rows(unpack_int4_rows(words)), words)
    assert torch.equal(pack_int4_cols(unpack_int4_cols(words)), words)


def test_known_words():
    q = torch.arange(8, dtype=torch.int32).view(8, 1) + 8  # codes 8..15: the top nibble sets the sign bit
    assert int(pack_int4_rows(q)[0, 0]) == 0xFEDCBA98 - 2**32
    assert int(pack_int4_cols(torch.full((1, 8), 7))[0, 0]) == 0x77777777


def test_pack_rejects_bad_codes_and_shapes():
    with pytest.raises(InvalidInputError, match="0..15"):
        pack_int4_rows(torch.full((8, 8), 16))
    with pytest.raises(InvalidInputError, match="0..15"):
        pack_int4_cols(torch.full((1, 8), -1))
    with pytest.raises(InvalidInputError, match="divisible by 8"):
        pack_int4_rows(_random_codes(12, 8))
    with pytest.raises(InvalidInputError, match="divisible by 8"):
        pack_int4_cols(_random_codes(2, 12))
    with pytest.raises(InvalidInputError, match="integer"):
        pack_int4_rows(torch.zeros(8, 8))
    with pytest.raises(InvalidInputError, match="int32"):
        unpack_int4_rows(torch.zeros(1, 8, dtype=torch.int64))


# ---- dequantization --------------------------------------------------------------------------------


def _random_linear(K, N, group_size, checkpoint_format="gptq_v2", act_order=False, seed=0):
    """A GPTQLinear with random codes, scales, true zeros in 1..15 (storable in v1 and v2) and
    optionally a random act-order g_idx."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else K // group_size
    g_idx = (
        act_order_g_idx(torch.randperm(K, generator=gen), group_size) if act_order else ordered_g_idx(K, group_size)
    )
    offset = 1 if checkpoint_format == "gptq" else 0
    return GPTQLinear(
        qweight=pack_int4_rows(_random_codes(K, N, generator=gen)),
        qzeros=pack_int4_cols(torch.randint(1, 16, (groups, N), generator=gen) - offset),
        scales=(torch.rand(groups, N, generator=gen) * 0.1 + 0.01).half(),
        g_idx=g_idx,
        bias=torch.randn(N, generator=gen).half(),
        group_size=group_size,
        checkpoint_format=checkpoint_format,
    )


@pytest.mark.parametrize("checkpoint_format", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_the_formula_element_by_element(checkpoint_format, act_order):
    layer = _random_linear(64, 16, 32, checkpoint_format, act_order, seed=1)
    W = layer.dequantize()
    offset = 1 if checkpoint_format == "gptq" else 0
    for k in range(64):
        g = int(layer.g_idx[k])
        for n in range(16):
            q = _nibble(int(layer.qweight[k // 8, n]), k % 8)
            z = _nibble(int(layer.qzeros[g, n // 8]), n % 8) + offset
            assert W[k, n].item() == pytest.approx(float(layer.scales[g, n]) * (q - z), rel=1e-6, abs=0)


def test_v1_stores_zero_minus_one_and_v2_the_true_zero():
    v2 = _random_linear(128, 32, 64, "gptq_v2", seed=2)
    v1 = v2.with_format("gptq")
    assert torch.equal(unpack_int4_cols(v1.qzeros).int() + 1, unpack_int4_cols(v2.qzeros).int())
    assert torch.equal(v1.zeros(), v2.zeros())
    assert torch.equal(v1.dequantize(), v2.dequantize())
    assert torch.equal(v1.with_format("gptq_v2").qzeros, v2.qzeros)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_symmetric_zeros_are_0x77777777_in_v1_and_0x88888888_in_v2(group_size):
    w = torch.randn(48, 256)
    v1 = quantize_rtn(w, config=QuantConfig(group_size=group_size, sym=True, checkpoint_format="gptq"))
    v2 = quantize_rtn(w, config=QuantConfig(group_size=group_size, sym=True, checkpoint_format="gptq_v2"))
    assert bool((v1.qzeros == 0x77777777).all())
    assert bool((v2.qzeros == 0x88888888 - 2**32).all())
    assert torch.equal(v1.dequantize(), v2.dequantize())


def test_zeros_outside_a_format_cannot_be_converted():
    layer = _random_linear(64, 8, 32, "gptq_v2", seed=3)
    qzeros = layer.qzeros.clone()
    qzeros[0, 0] = 0  # true zeros 0 in v2: v1 stores zeros 1..16
    with pytest.raises(InvalidInputError, match="do not fit"):
        GPTQLinear(layer.qweight, qzeros, layer.scales, layer.g_idx, None, 32, "gptq_v2").with_format("gptq")
    qzeros[0, 0] = -1  # all nibbles 15: true zero 16 in v1, beyond v2's 0..15
    with pytest.raises(InvalidInputError, match="do not fit"):
        GPTQLinear(layer.qweight, qzeros, layer.scales, layer.g_idx, None, 32, "gptq").with_format("gptq_v2")


# ---- act-order --------------------------------------------------------------------------------------


def test_act_order_g_idx_groups_rows_in_the_given_order():
    order = torch.randperm(256)
    g_idx = act_order_g_idx(order, 64)
    assert g_idx.dtype == torch.int32
    assert torch.equal(g_idx[order], torch.arange(256, dtype=torch.int32) // 64)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 64))
    with pytest.raises(InvalidInputError, match="permutation"):
        act_order_g_idx(torch.zeros(64, dtype=torch.int64), 32)


def test_act_order_quantizer_uses_the_order_and_is_not_ordered():
    w = torch.randn(32, 256)
    order = torch.randperm(256)
    layer = quantize_rtn(w, config=QuantConfig(group_size=32, desc_act=True), order=order)
    assert torch.equal(layer.g_idx, act_order_g_idx(order, 32)) and not layer.ordered
    default = quantize_rtn(w, config=QuantConfig(group_size=32, desc_act=True))
    by_norm = torch.argsort(w.t().norm(dim=1), descending=True, stable=True)
    assert torch.equal(default.g_idx, act_order_g_idx(by_norm, 32))
    assert quantize_rtn(w, config=QuantConfig(group_size=32)).ordered
    with pytest.raises(InvalidInputError, match="act-order"):
        quantize_rtn(w, config=QuantConfig(group_size=32), order=order)


# ---- the round-to-nearest quantizer -----------------------------------------------------------------


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("checkpoint_format", FORMATS)
@pytest.mark.parametrize("desc_act", [False, True])
def test_quantizer_error_is_at_most_half_a_step(group_size, sym, checkpoint_format, desc_act):
    N, K = 64, 512
    w = torch.randn(N, K) * torch.rand(N, 1) * 0.2
    w[:8, :] = w[:8, :].abs()  # all-positive columns: an asymmetric zero of 0, which v1 cannot store
    w[8:16, :] = -w[8:16, :].abs()  # all-negative columns: zero 15
    w[16, :] = 0.0  # an all-zero column
    config = QuantConfig(group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=checkpoint_format)
    layer = quantize_rtn(w, torch.randn(N), config=config)
    assert layer.checkpoint_format == checkpoint_format and layer.bias.dtype == torch.float16
    step = layer.scales.float()[layer.g_idx.long()]  # [K, N]: the scale of every weight
    error = (layer.dequantize() - w.t()).abs()
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-7).all()), (error / step).max()
    assert bool((layer.dequantize()[:, 16] == 0).all())
    if sym:
        assert bool((layer.zeros() == 8).all())


def test_quantizer_is_close_to_the_weights():
    w = torch.randn(256, 1024) * 0.02
    layer = quantize_rtn(w, config=QuantConfig(group_size=128, sym=False))
    rel = (layer.dequantize() - w.t()).norm() / w.norm()
    # 128 Gaussian weights span about 5.4 sigma, so the step is 0.36 sigma and the RMS rounding
    # error step / sqrt(12) = 0.10 sigma.
    assert 0.08 < rel < 0.12


def test_quantizer_rejects_bad_sizes():
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        quantize_rtn(torch.randn(8, 12), config=QuantConfig(group_size=-1))
    with pytest.raises(InvalidInputError, match="not divisible by group_size"):
        quantize_rtn(torch.randn(8, 96), config=QuantConfig(group_size=64))
    with pytest.raises(InvalidInputError, match="N=12"):
        quantize_rtn(torch.randn(12, 64), config=QuantConfig(group_size=32))
    with pytest.raises(InvalidInputError, match="floating"):
        quantize_rtn(torch.ones(8, 64, dtype=torch.int32))


# ---- GPTQLinear checks --------------------------------------------------------------------------------


def _parts(layer: GPTQLinear) -> dict:
    return dict(qweight=layer.qweight, qzeros=layer.qzeros, scales=layer.scales, g_idx=layer.g_idx,
                bias=layer.bias, group_size=layer.group_size, checkpoint_format=layer.checkpoint_format)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(g_idx=torch.arange(60, dtype=torch.int32) // 32), "divisible by 8"),
        (dict(group_size=48), "not divisible by group_size"),
        (dict(group_size=-1), r"scales must be \[groups, N\] = \[1, 16\]"),
        (dict(g_idx=(torch.arange(64, dtype=torch.int32) // 32).flip(0) + 1), r"g_idx must lie in 0..1"),
        (dict(g_idx=torch.full((64,), -1, dtype=torch.int32)), r"g_idx must lie in 0..1"),
        (dict(g_idx=torch.arange(72, dtype=torch.int32) // 36), r"qweight must be \[K/8, N\]"),
        (dict(qweight=torch.zeros(8, 16, dtype=torch.int64)), "qweight must be int32"),
        (dict(scales=torch.ones(2, 16)), "scales must be float16"),
        (dict(g_idx=torch.zeros(64, dtype=torch.int64)), "g_idx must be int32"),
        (dict(qzeros=torch.zeros(2, 3, dtype=torch.int32)), r"qzeros must be \[groups, N/8\] = \[2, 2\]"),
        (dict(scales=torch.ones(3, 16, dtype=torch.float16)), r"scales must be \[groups, N\]"),
        (dict(bias=torch.ones(8, dtype=torch.float16)), r"bias must be fp16 \[N\]"),
        (dict(bias=torch.ones(16)), r"bias must be fp16 \[N\]"),
        (dict(qweight=torch.zeros(8, 12, dtype=torch.int32)), "N=12"),
        (dict(checkpoint_format="marlin"), "checkpoint_format"),
    ],
)
def test_gptq_linear_rejects_bad_tensors(change, message):
    parts = _parts(_random_linear(64, 16, 32, seed=4))
    parts.update(change)
    with pytest.raises(InvalidInputError, match=message):
        GPTQLinear(**parts)


# ---- quantization config -------------------------------------------------------------------------------


def test_quant_config_reads_what_the_ecosystem_writes():
    written = GPTQConfig(bits=4, group_size=64, desc_act=True, sym=False, format="gptq_v2").to_dict()  # transformers
    assert QuantConfig.from_dict(written) == QuantConfig(group_size=64, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    autogptq = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
                "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
                "quant_method": "gptq", "checkpoint_format": "gptq"}
    assert QuantConfig.from_dict(autogptq).zero_offset == 1
    assert QuantConfig.from_dict({"bits": 4, "group_size": -1}) == QuantConfig(group_size=-1)  # old: no format key
    assert QuantConfig.from_dict({"bits": 4, "format": "gptq_v2"}).zero_offset == 0
    assert QuantConfig.from_dict(QuantConfig(group_size=32, checkpoint_format="gptq_v2").to_dict()).group_size == 32


@pytest.mark.parametrize(
    "config,error,message",
    [
        ({"bits": 8}, UnsupportedModelError, "only 4-bit"),
        ({"bits": 4, "checkpoint_format": "marlin"}, UnsupportedModelError, "marlin"),
        ({"bits": 4, "is_marlin_format": True}, UnsupportedModelError, "Marlin"),
        ({"bits": 4, "quant_method": "awq"}, UnsupportedModelError, "not GPTQ"),
        ({"bits": 4, "pack_dtype": "int16"}, UnsupportedModelError, "pack_dtype"),
        ({"bits": 4, "group_size": 100}, InvalidInputError, "multiple of 8"),
        ({"bits": 4, "group_size": "128"}, InvalidInputError, "group_size must be -1 or a positive multiple of 8, got '128'"),
        ({"bits": 4, "group_size": True}, InvalidInputError, "group_size must be"),
        ({"bits": 4, "sym": "false"}, InvalidInputError, "sym must be true or false, got 'false'"),  # not a truthy string
        ({"bits": 4, "desc_act": 1}, InvalidInputError, "desc_act must be true or false, got 1"),
    ],
)
def test_quant_config_rejects_what_it_cannot_read(config, error, message):
    with pytest.raises(error, match=message):
        QuantConfig.from_dict(config)


# ---- checkpoints --------------------------------------------------------------------------------------


def _tiny_model(seed=0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           vocab_size=128, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


@pytest.mark.parametrize("quant", [QuantConfig(group_size=32, sym=False, desc_act=True, checkpoint_format="gptq_v2"),
                                   QuantConfig(group_size=-1, sym=True, checkpoint_format="gptq")])
def test_checkpoint_round_trip(tmp_path, quant):
    checkpoint = quantize_gpt_neox(_tiny_model(), quant)
    assert set(checkpoint.linears) == {layer_linear_name(i, name) for i in range(2) for name in LAYER_LINEARS}
    save_gptq_checkpoint(checkpoint, tmp_path)
    written = load_file(str(tmp_path / "model.safetensors"))
    qkv = "gpt_neox.layers.1.attention.query_key_value"
    assert written[f"{qkv}.qweight"].dtype == torch.int32 and list(written[f"{qkv}.qweight"].shape) == [8, 192]
    assert list(written[f"{qkv}.scales"].shape) == [64 // 32 if quant.group_size == 32 else 1, 192]
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == quant.checkpoint_format

    loaded = load_gptq_checkpoint(tmp_path)
    assert loaded.quant == quant and loaded.num_layers == 2
    for name, layer in checkpoint.linears.items():
        for key, t in layer.state_dict(name).items():
            assert torch.equal(loaded.linears[name].state_dict(name)[key], t), key
    assert loaded.linear(1, "attention.query_key_value").ordered == (not quant.desc_act)
    assert set(loaded.tensors) == set(checkpoint.tensors)
    assert all(torch.equal(loaded.tensors[k], t) for k, t in checkpoint.tensors.items())


def test_checkpoint_quant_config_from_config_json_sharded_and_without_g_idx(tmp_path):
    checkpoint = quantize_gpt_neox(_tiny_model(1), QuantConfig(group_size=64, sym=False, checkpoint_format="gptq_v2"))
    save_gptq_checkpoint(checkpoint, tmp_path)
    (tmp_path / "quantize_config.json").unlink()  # settings only in config.json's quantization_config
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(k for k in tensors if not k.endswith(".g_idx"))  # old checkpoints omit an ordered g_idx
    save_file({k: tensors[k] for k in names[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert read_quant_config(tmp_path).checkpoint_format == "gptq_v2"
    loaded = load_gptq_checkpoint(tmp_path)
    for name, layer in checkpoint.linears.items():
        assert torch.equal(loaded.linears[name].dequantize(), layer.dequantize())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="not a directory"):
        load_gptq_checkpoint(tmp_path / "missing")
    with pytest.raises(InvalidInputError, match="no config.json"):
        load_gptq_checkpoint(tmp_path)
    checkpoint = quantize_gpt_neox(_tiny_model(2), QuantConfig(group_size=32))
    save_gptq_checkpoint(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(UnsupportedModelError, match="not gpt_neox"):
        load_gptq_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    (tmp_path / "quantize_config.json").unlink()
    with pytest.raises(UnsupportedModelError, match="not a GPTQ checkpoint"):
        load_gptq_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    tensors = load_file(str(tmp_path / "model.safetensors"))
    qkv = "gpt_neox.layers.0.attention.query_key_value"
    save_file({k: v for k, v in tensors.items() if k != f"{qkv}.scales"}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidInputError, match=f"{qkv}.scales is missing"):
        load_gptq_checkpoint(tmp_path)
    save_file({k: v for k, v in tensors.items() if not k.startswith(qkv)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidInputError, match=f"{qkv} is missing"):
        load_gptq_checkpoint(tmp_path)
    bad = dict(tensors)
    bad[f"{qkv}.g_idx"] = torch.full_like(tensors[f"{qkv}.g_idx"], 5)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidInputError, match=f"{qkv}: g_idx must lie in 0..1"):
        load_gptq_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="no \\*.safetensors"):
        load_gptq_checkpoint(tmp_path)


def test_checkpoint_functions_refuse_what_they_do_not_take(tmp_path):
    checkpoint = quantize_gpt_neox(_tiny_model(3), QuantConfig(group_size=32))
    with pytest.raises(InvalidInputError, match="quantize_gpt_neox takes an HF GPTNeoXForCausalLM, got str"):
        quantize_gpt_neox("pythia-70m", QuantConfig())
    with pytest.raises(InvalidInputError, match="quantize_gpt_neox takes a QuantConfig .* got dict"):
        quantize_gpt_neox(_tiny_model(3), {"group_size": 32})
    for function in (dequantized_gpt_neox, gptq_gpt_neox):
        with pytest.raises(InvalidInputError, match=f"{function.__name__} takes a GPTQCheckpoint .* got PosixPath"):
            function(tmp_path)
    with pytest.raises(InvalidInputError, match="save_gptq_checkpoint takes a GPTQCheckpoint"):
        save_gptq_checkpoint(_tiny_model(3), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError, match="is a file; save_gptq_checkpoint writes a directory"):
        save_gptq_checkpoint(checkpoint, tmp_path / "file")
