"""A GPTQ GPT-NeoX checkpoint as an HF GPTNeoXForCausalLM whose attention input path (LN1, then the
int4 query_key_value) runs as one gptq_ln_qkv kernel.

    checkpoint = load_gptq_checkpoint(path)
    model = gptq_gpt_neox(checkpoint, device="cuda")       # HF model, generate() as usual

In every layer, `input_layernorm` becomes the identity and `attention.query_key_value` a
`GPTQLayerNormQKV` computing query_key_value(input_layernorm(h)) from the int4 weights, which is
what HF's GPTNeoXLayer / GPTNeoXAttention then consume (the [*, heads, 3, head_dim] column order
is the checkpoint's). The layer's other linear layers (attention.dense, the MLP) are loaded
dequantized to fp16: this module puts the QKV path on its kernel, not the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neoxfuse.errors import InvalidInputError
from neoxfuse.ops.gptq_ln_qkv import MAX_TOKENS, gptq_ln_qkv_layer, reference
from neoxfuse.quant.checkpoint import GPTQCheckpoint, check_checkpoint
from neoxfuse.quant.gptq import GPTQLinear

QKV = "attention.query_key_value"
# Buffers older transformers saved in GPT-NeoX checkpoints (causal mask, rotary frequencies); HF's
# own loader skips them too.
_LEGACY_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class GPTQLayerNormQKV(nn.Module):
    """forward(h [..., hidden]) = LayerNorm(h) @ W + bias [..., 3 * hidden], W the GPTQ int4 QKV weight.

    CUDA fp16 input runs the gptq_ln_qkv kernel, 8 tokens per launch (a decode step is one);
    other input (CPU) runs the fp32 oracle and returns the input's dtype.
    """

    def __init__(self, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, layer: GPTQLinear):
        super().__init__()
        if list(ln_weight.shape) != [layer.in_features] or list(ln_bias.shape) != [layer.in_features]:
            raise InvalidInputError(f"LayerNorm weight and bias must be [{layer.in_features}], "
                                    f"got {list(ln_weight.shape)} and {list(ln_bias.shape)}")
        self.ln_weight = nn.Parameter(ln_weight.detach().to(torch.float16), requires_grad=False)
        self.ln_bias = nn.Parameter(ln_bias.detach().to(torch.float16), requires_grad=False)
        self.eps = eps
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [tokens, hidden]
        if _kernel_takes(x):
            x = x.contiguous()
            chunks = [gptq_ln_qkv_layer(x[i:i + MAX_TOKENS], self.ln_weight, self.ln_bias, self.layer, self.eps)
                      for i in range(0, x.shape[0], MAX_TOKENS)]
            out = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        else:
            out = reference(x, self.ln_weight, self.ln_bias, self.layer, self.eps).to(x.dtype)
        return out.view(*hidden_states.shape[:-1], -1)


def _kernel_takes(x: torch.Tensor) -> bool:
    """Whether GPTQLayerNormQKV runs x [tokens, hidden] on the kernel: CUDA fp16; else the oracle."""
    return x.is_cuda and x.dtype == torch.float16


def _hf_config(checkpoint: GPTQCheckpoint) -> GPTNeoXConfig:
    config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    return GPTNeoXConfig.from_dict(config)


def dequantized_gpt_neox(checkpoint: GPTQCheckpoint, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float16) -> GPTNeoXForCausalLM:
    """The checkpoint as a plain HF model, every GPTQ linear layer dequantized to `dtype`
    (W = scales * (q - z)): the reference a patched model is checked against."""
    check_checkpoint(checkpoint, "dequantized_gpt_neox")
    with torch.device(device):
        model = GPTNeoXForCausalLM(_hf_config(checkpoint)).to(dtype).eval()
    state = {name: t.to(device, dtype) if t.is_floating_point() else t.to(device) for name, t in checkpoint.tensors.items()
             if not name.endswith(_LEGACY_BUFFERS)}
    for name, linear in checkpoint.linears.items():
        state[f"{name}.weight"] = linear.dequantize(torch.float32).t().to(device, dtype)
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias.to(device, dtype)
    output = "lm_head.weight" if "lm_head.weight" in model.state_dict() else "embed_out.weight"  # transformers 5: lm_head
    if "embed_out.weight" in state:
        state[output] = state.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != output or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise InvalidInputError(f"checkpoint does not match GPTNeoXForCausalLM: missing {missing}, unexpected {unexpected}")
    return model


def describe_dequantized(path: str | Path, checkpoint: GPTQCheckpoint, dtype: torch.dtype) -> str:
    """How a run names a GPTQ checkpoint it dequantized, e.g. 'DIR (GPTQ int4, group size 128, dequantized to float16)'."""
    quant = checkpoint.quant
    return f"{path} (GPTQ int{quant.bits}, group size {quant.group_size}, dequantized to {str(dtype).replace('torch.', '')})"


def gptq_gpt_neox(checkpoint: GPTQCheckpoint, device: str | torch.device = "cuda") -> GPTNeoXForCausalLM:
    """An fp16 HF model of the checkpoint whose layers run LN1 + int4 QKV as one gptq_ln_qkv kernel
    (module docstring). Every layer's query_key_value must be GPTQ-quantized."""
    check_checkpoint(checkpoint, "gptq_gpt_neox")
    for i in range(checkpoint.num_layers):
        checkpoint.linear(i, QKV)  # InvalidInputError unless quantized
    model = dequantized_gpt_neox(checkpoint, device, torch.float16)
    for i, block in enumerate(model.gpt_neox.layers):
        norm = block.input_layernorm
        qkv = checkpoint.linear(i, QKV).to(device)
        block.attention.query_key_value = GPTQLayerNormQKV(norm.weight, norm.bias, norm.eps, qkv)
        block.input_layernorm = nn.Identity()
    return model
