"""Quantized GPT-NeoX weights: GPTQ int4 in the format AutoGPTQ / GPTQModel checkpoints use.

neoxfuse.quant.gptq holds the format (packing, dequantization, a round-to-nearest quantizer);
neoxfuse.quant.checkpoint loads and writes GPTQ GPT-NeoX checkpoint directories.
"""

from neoxfuse.quant.checkpoint import (
    LAYER_LINEARS,
    GPTQCheckpoint,
    is_quantized_checkpoint,
    layer_linear_name,
    load_gptq_checkpoint,
    quantize_gpt_neox,
    save_gptq_checkpoint,
)
from neoxfuse.quant.gptq import (
    GPTQLinear,
    QuantConfig,
    act_order_g_idx,
    ordered_g_idx,
    pack_int4_cols,
    pack_int4_rows,
    quantize_rtn,
    read_quant_config,
    unpack_int4_cols,
    unpack_int4_rows,
)

__all__ = [
    "LAYER_LINEARS",
    "GPTQCheckpoint",
    "is_quantized_checkpoint",
    "GPTQLinear",
    "QuantConfig",
    "act_order_g_idx",
    "layer_linear_name",
    "load_gptq_checkpoint",
    "ordered_g_idx",
    "pack_int4_cols",
    "pack_int4_rows",
    "quantize_gpt_neox",
    "quantize_rtn",
    "read_quant_config",
    "save_gptq_checkpoint",
    "unpack_int4_cols",
    "unpack_int4_rows",
]
