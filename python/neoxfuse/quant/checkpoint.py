"""GPTQ GPT-NeoX checkpoint directories: load one, write one, make one from a model by RTN.

A directory holds config.json (model_type "gpt_neox", usually with "quantization_config"),
optionally quantize_config.json (which wins, as in GPTQModel), and one or more *.safetensors
files. Each quantized linear layer NAME (e.g. gpt_neox.layers.0.attention.query_key_value)
is stored as NAME.qweight / NAME.qzeros / NAME.scales / NAME.g_idx / NAME.bias (format:
neoxfuse.quant.gptq); every other tensor (embeddings, LayerNorms, unquantized layers) as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neoxfuse.errors import InvalidInputError, UnsupportedModelError
from neoxfuse.quant.gptq import QUANT_CONFIG_FILES, GPTQLinear, QuantConfig, ordered_g_idx, quantize_rtn, read_quant_config
from neoxfuse.weights import read_checkpoint_config

# The linear layers of GPT-NeoX layer i, under gpt_neox.layers.{i}.
LAYER_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def layer_linear_name(layer: int, linear: str) -> str:
    """gpt_neox.layers.{layer}.{linear}, the module name HF and GPTQ checkpoints use."""
    return f"gpt_neox.layers.{layer}.{linear}"


@dataclass
class GPTQCheckpoint:
    """A GPTQ GPT-NeoX model: its config.json, quantization settings and tensors."""

    config: dict  # config.json
    quant: QuantConfig
    linears: dict[str, GPTQLinear]  # module name -> quantized layer
    tensors: dict[str, torch.Tensor]  # every other tensor, by its checkpoint name

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def linear(self, layer: int, linear: str) -> GPTQLinear:
        """The quantized `linear` (one of LAYER_LINEARS) of `layer`; InvalidInputError if it is not quantized."""
        name = layer_linear_name(layer, linear)
        if name not in self.linears:
            raise InvalidInputError(f"{name} is not GPTQ-quantized in this checkpoint")
        return self.linears[name]


def check_checkpoint(checkpoint: object, caller: str) -> None:
    """InvalidInputError unless `checkpoint` is a GPTQCheckpoint (what load_gptq_checkpoint and quantize_gpt_neox give)."""
    if not isinstance(checkpoint, GPTQCheckpoint):
        raise InvalidInputError(f"{caller} takes a GPTQCheckpoint (load_gptq_checkpoint(directory) or quantize_gpt_neox(model, "
                                f"quant) gives one), got {type(checkpoint).__name__}")


def _read_tensors(directory: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InvalidInputError(f"{directory} holds no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path), device=str(device)))
    return tensors


def is_quantized_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoint directory says it is quantized: a quantize config file, or a
    "quantization_config" in config.json (which read_quant_config then reads or refuses)."""
    directory = Path(directory)
    if any((directory / name).is_file() for name in QUANT_CONFIG_FILES):
        return True
    config = directory / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def load_gptq_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> GPTQCheckpoint:
    """Loads a GPTQ GPT-NeoX checkpoint directory (safetensors, sharded or not) onto `device`.

    Every NAME.qweight becomes a GPTQLinear (checked on construction; a missing g_idx means the
    ordered k // group_size). Raises UnsupportedModelError for a model that is not gpt_neox or a
    quantization this package does not read, CheckpointNotFoundError (an InvalidInputError) for a
    missing directory or config.json, InvalidInputError for missing or malformed tensors (naming
    the layer), or a layer linear that is neither quantized nor present.
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    quant = read_quant_config(directory)
    tensors = _read_tensors(directory, device)

    linears = {}
    for name in [key[: -len(".qweight")] for key in tensors if key.endswith(".qweight")]:
        for part in ("qzeros", "scales"):
            if f"{name}.{part}" not in tensors:
                raise InvalidInputError(f"{name}: {name}.{part} is missing")
        parts = {part: tensors.pop(f"{name}.{part}", None) for part in _GPTQ_PARTS}
        if parts["g_idx"] is None:
            parts["g_idx"] = ordered_g_idx(parts["qweight"].shape[0] * 8, quant.group_size, parts["qweight"].device)
        elif parts["g_idx"].dtype == torch.int64:
            parts["g_idx"] = parts["g_idx"].to(torch.int32)
        try:
            linears[name] = GPTQLinear(**parts, group_size=quant.group_size, checkpoint_format=quant.checkpoint_format)
        except InvalidInputError as err:
            raise InvalidInputError(f"{name}: {err}") from err

    for layer in range(int(config["num_hidden_layers"])):
        for linear in LAYER_LINEARS:
            name = layer_linear_name(layer, linear)
            if name not in linears and f"{name}.weight" not in tensors:
                raise InvalidInputError(f"{directory}: {name} is missing (neither {name}.qweight nor {name}.weight)")
    return GPTQCheckpoint(config=config, quant=quant, linears=linears, tensors=tensors)


def save_gptq_checkpoint(checkpoint: GPTQCheckpoint, directory: str | Path) -> Path:
    """Writes `checkpoint` as AutoGPTQ / GPTQModel do: config.json (with quantization_config),
    quantize_config.json and model.safetensors. Returns the directory."""
    check_checkpoint(checkpoint, "save_gptq_checkpoint")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"{directory} is a file; save_gptq_checkpoint writes a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in checkpoint.tensors.items()}
    for name, linear in checkpoint.linears.items():
        tensors.update({key: t.contiguous().cpu() for key, t in linear.state_dict(name).items()})
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = dict(checkpoint.config, quantization_config=checkpoint.quant.to_dict())
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / "quantize_config.json").write_text(json.dumps(checkpoint.quant.to_dict(), indent=2))
    return directory


def quantize_gpt_neox(model: torch.nn.Module, quant: QuantConfig) -> GPTQCheckpoint:
    """A GPTQ checkpoint of an HF GPTNeoXForCausalLM by round-to-nearest (quantize_rtn): every
    layer's four linear layers are quantized, every other tensor is kept in fp16.

    For tests and for users without a calibrated checkpoint; GPTQ proper (with calibration
    data) is more accurate and writes the same format.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InvalidInputError(f"quantize_gpt_neox takes an HF GPTNeoXForCausalLM, got {type(model).__name__}")
    if not isinstance(quant, QuantConfig):
        raise InvalidInputError(f"quantize_gpt_neox takes a QuantConfig (QuantConfig(group_size=128, ...)), got {type(quant).__name__}")
    config = json.loads(model.config.to_json_string(use_diff=False))
    if config.get("model_type") != "gpt_neox":
        raise UnsupportedModelError(f"quantize_gpt_neox needs a gpt_neox model, got {config.get('model_type')!r}")
    config["torch_dtype"] = "float16"
    # transformers 5 names the output embedding's module lm_head; GPT-NeoX checkpoints call it embed_out
    state = {"embed_out.weight" if name == "lm_head.weight" else name: t.detach() for name, t in model.state_dict().items()}
    linears = {}
    for layer in range(int(config["num_hidden_layers"])):
        for linear in LAYER_LINEARS:
            name = layer_linear_name(layer, linear)
            linears[name] = quantize_rtn(state.pop(f"{name}.weight"), state.pop(f"{name}.bias", None), config=quant)
    tensors = {name: t.to(torch.float16) if t.is_floating_point() else t for name, t in state.items()}
    return GPTQCheckpoint(config=config, quant=quant, linears=linears, tensors=tensors)
