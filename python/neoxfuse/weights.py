"""GPT-NeoX weights as plain tensors: from an HF model in memory, from a local checkpoint, or random.

Every tensor keeps Hugging Face's layout. In particular the fused `query_key_value` weight
[3*hidden, hidden] produces its output per head, [heads, 3, head_dim] (q, k, v of head 0, then
head 1, ...), and every linear weight is [out_features, in_features]: y = x @ W.T + b.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from neoxfuse.checks import check_seed
from neoxfuse.configs import MODEL_NAMES, NeoXShape, pythia_config, shape_of
from neoxfuse.errors import CheckpointNotFoundError, InvalidInputError, UnknownModelError, UnsupportedModelError


@dataclass
class LayerWeights:
    """One decoder layer. h = hidden, ffn = intermediate size."""

    ln1_weight: torch.Tensor  # [h]  input_layernorm
    ln1_bias: torch.Tensor  # [h]
    ln2_weight: torch.Tensor  # [h]  post_attention_layernorm
    ln2_bias: torch.Tensor  # [h]
    qkv_weight: torch.Tensor  # [3h, h]  rows ordered [heads, 3, head_dim]
    qkv_bias: torch.Tensor  # [3h]  ordered [heads, 3, head_dim]
    dense_weight: torch.Tensor  # [h, h]  attention output projection
    dense_bias: torch.Tensor  # [h]
    fc_in_weight: torch.Tensor  # [ffn, h]  dense_h_to_4h
    fc_in_bias: torch.Tensor  # [ffn]
    fc_out_weight: torch.Tensor  # [h, ffn]  dense_4h_to_h
    fc_out_bias: torch.Tensor  # [h]

    def to(self, device=None, dtype=None, *, name: str = "layer") -> LayerWeights:
        """The weights on `device` in `dtype` (None: unchanged); InvalidInputError if one would overflow
        `dtype` (see converted). name: how errors call this layer."""
        return replace(self, **{f.name: converted(getattr(self, f.name), device, dtype, f"{name}.{f.name}")
                                for f in fields(self)})


def converted(t: torch.Tensor, device, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """t.to(device, dtype), refusing a conversion that would turn a finite value into inf: a dtype
    of narrower range, fp32 or bf16 weights past fp16's largest finite value, 65504, going to fp16
    (every logit would be inf or NaN). InvalidInputError names the tensor and what to do instead."""
    if dtype is not None and t.is_floating_point() and t.numel() and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        largest = t.detach().abs().amax()  # exact in t's dtype, so it converts as t's largest entry does
        if torch.isfinite(largest) and torch.isinf(largest.to(dtype)):
            target = str(dtype).removeprefix("torch.")
            raise InvalidInputError(
                f"{name} holds {float(largest):.4g}, past {target}'s largest value {torch.finfo(dtype).max:.6g}: in "
                f"{target} it would be inf; run in bfloat16 or float32 (--dtype bf16 / fp32)"
            )
    return t.to(device=device, dtype=dtype)


@dataclass
class ModelWeights:
    shape: NeoXShape
    embed_in: torch.Tensor  # [vocab, h]
    layers: list[LayerWeights]
    final_ln_weight: torch.Tensor  # [h]
    final_ln_bias: torch.Tensor  # [h]
    embed_out: torch.Tensor  # [vocab, h]  logits = final_ln(x) @ embed_out.T (no bias)

    def to(self, device=None, dtype=None) -> ModelWeights:
        """The weights on `device` in `dtype` (None: unchanged); tensors already so are shared, not
        copied. InvalidInputError, naming the tensor, if one would overflow `dtype` (see converted)."""
        return ModelWeights(
            shape=self.shape,
            embed_in=converted(self.embed_in, device, dtype, "embed_in"),
            layers=[layer.to(device, dtype, name=f"layers.{i}") for i, layer in enumerate(self.layers)],
            final_ln_weight=converted(self.final_ln_weight, device, dtype, "final_ln_weight"),
            final_ln_bias=converted(self.final_ln_bias, device, dtype, "final_ln_bias"),
            embed_out=converted(self.embed_out, device, dtype, "embed_out"),
        )


# LayerWeights field -> Hugging Face name under "gpt_neox.layers.{i}."
_HF_LAYER_NAMES = {
    "ln1_weight": "input_layernorm.weight",
    "ln1_bias": "input_layernorm.bias",
    "ln2_weight": "post_attention_layernorm.weight",
    "ln2_bias": "post_attention_layernorm.bias",
    "qkv_weight": "attention.query_key_value.weight",
    "qkv_bias": "attention.query_key_value.bias",
    "dense_weight": "attention.dense.weight",
    "dense_bias": "attention.dense.bias",
    "fc_in_weight": "mlp.dense_h_to_4h.weight",
    "fc_in_bias": "mlp.dense_h_to_4h.bias",
    "fc_out_weight": "mlp.dense_4h_to_h.weight",
    "fc_out_bias": "mlp.dense_4h_to_h.bias",
}


def _layer_shapes(shape: NeoXShape) -> dict[str, tuple[int, ...]]:
    h, ffn = shape.hidden, shape.ffn
    return {
        "ln1_weight": (h,),
        "ln1_bias": (h,),
        "ln2_weight": (h,),
        "ln2_bias": (h,),
        "qkv_weight": (shape.qkv_dim, h),
        "qkv_bias": (shape.qkv_dim,),
        "dense_weight": (h, h),
        "dense_bias": (h,),
        "fc_in_weight": (ffn, h),
        "fc_in_bias": (ffn,),
        "fc_out_weight": (h, ffn),
        "fc_out_bias": (h,),
    }


def _assemble(shape: NeoXShape, tensors: Mapping[str, torch.Tensor], source: str, tied: bool) -> ModelWeights:
    """ModelWeights from a Hugging Face state dict, checking every tensor is there with its shape.

    `tied`: embed_out is embed_in (tie_word_embeddings), so it may be missing from `tensors`.
    """
    missing: list[str] = []
    wrong: list[str] = []
    not_float: list[str] = []

    def take(name: str, want: tuple[int, ...]) -> torch.Tensor | None:
        tensor = tensors.get(name)
        if tensor is None:
            missing.append(name)
        elif tuple(tensor.shape) != want:
            wrong.append(f"{name} {list(tensor.shape)} (expected {list(want)})")
        elif not tensor.is_floating_point():  # quantized without a quantization_config, or damaged: not castable
            not_float.append(f"{name} ({str(tensor.dtype).replace('torch.', '')})")
        return tensor

    vocab_rows = (shape.vocab, shape.hidden)
    embed_in = take("gpt_neox.embed_in.weight", vocab_rows)
    embed_out = take(_embed_out_name(tensors, tied), vocab_rows)
    final_ln_weight = take("gpt_neox.final_layer_norm.weight", (shape.hidden,))
    final_ln_bias = take("gpt_neox.final_layer_norm.bias", (shape.hidden,))
    layer_shapes = _layer_shapes(shape)
    layers = [
        LayerWeights(**{f: take(f"gpt_neox.layers.{i}.{hf}", layer_shapes[f]) for f, hf in _HF_LAYER_NAMES.items()})
        for i in range(shape.layers)
    ]
    if missing or wrong or not_float:
        found = {"missing": missing, "wrong shape": wrong, "not floating point": not_float}
        problems = [f"{what}: {_first_few(names)}" for what, names in found.items() if names]
        raise InvalidInputError(f"{source} does not hold the model its config describes; {'; '.join(problems)}")
    return ModelWeights(shape, embed_in, layers, final_ln_weight, final_ln_bias, embed_out)


def _embed_out_name(tensors: Mapping[str, torch.Tensor], tied: bool) -> str:
    """The output embedding's name: embed_out in checkpoints and transformers 4, lm_head in
    transformers 5's modules; with tied embeddings it may be absent, and is embed_in."""
    for name in ("embed_out.weight", "lm_head.weight"):
        if name in tensors:
            return name
    return "gpt_neox.embed_in.weight" if tied else "embed_out.weight"


def _first_few(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_hf(model: GPTNeoXForCausalLM) -> ModelWeights:
    """The weights of an in-memory HF model, sharing its storage (no copy, detached from autograd)."""
    if not isinstance(model, GPTNeoXForCausalLM):
        raise UnsupportedModelError(f"from_hf needs a GPTNeoXForCausalLM, got {type(model).__name__}")
    shape = shape_of(model.config)
    return _assemble(shape, model.state_dict(), source=type(model).__name__, tied=model.config.tie_word_embeddings)


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (sharded or not) if present, else pytorch_model*.bin."""
    for index_name, single_name in [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]:
        index = directory / index_name
        if index.is_file():
            files = [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointNotFoundError(f"{index} lists weight files that are missing: {', '.join(absent)}")
            return files
        if (directory / single_name).is_file():
            return [directory / single_name]
    raise CheckpointNotFoundError(
        f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            tensors.update(load_file(file, device="cpu"))
        else:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def model_source(source: str | os.PathLike, revision: str | None = None) -> str | Path:
    """What a model string names, tried in this order:

    1. a local checkpoint directory: returned as a Path;
    2. a model name of configs.MODEL_NAMES: returned as the str (a random-initialised model of that shape);
    3. a Hugging Face Hub repo id ("EleutherAI/pythia-2.8b") whose snapshot at `revision` (a branch, tag or
       commit; main by default; Pythia's training checkpoints are the tags step0 ... step143000) is in the
       local Hugging Face cache (HF_HUB_CACHE, as `hf download` or transformers left it): that snapshot's
       directory, a Path. neoxfuse downloads nothing.

    InvalidInputError for a revision given with a directory or a name; UnsupportedModelError for a file;
    CheckpointNotFoundError for a cached snapshot the cache itself knows to be incomplete; UnknownModelError
    for anything else.
    """
    path = Path(source)
    if path.is_dir() or str(source) in MODEL_NAMES:
        if revision is not None:
            raise InvalidInputError(f"a revision ({revision!r}) picks a version of a Hub repo id; {str(source)!r} is "
                                    "a local directory or a model name")
        return path if path.is_dir() else str(source)
    if path.exists():
        raise UnsupportedModelError(f"{path} is a file; a checkpoint is a directory holding config.json and the weights")
    known = f"a known model name ({', '.join(MODEL_NAMES)})"
    try:
        return Path(snapshot_download(str(source), revision=revision, local_files_only=True))
    except HFValidationError:
        raise UnknownModelError(f"{str(source)!r} is neither {known} nor a checkpoint directory") from None
    except LocalEntryNotFoundError as error:
        if getattr(error, "snapshot_path", None):  # an IncompleteSnapshotError: the cache lists files it lacks
            raise CheckpointNotFoundError(f"{source}: {error}") from error
        at, fetch = ("", "") if revision is None else (f" at revision {revision!r}", f" --revision {revision}")
        raise UnknownModelError(
            f"{str(source)!r} is neither {known}, a checkpoint directory, nor a Hub repo id in the local Hugging Face "
            f"cache {hub_constants.HF_HUB_CACHE}{at}; neoxfuse downloads nothing: `hf download {source}{fetch}` fetches it"
        ) from None


def describe_checkpoint(source: str | os.PathLike, directory: Path, revision: str | None = None) -> str:
    """How a run names the checkpoint directory that model_source(source, revision) found: the directory
    itself, or the Hub repo id it was found by, with its revision and cached snapshot
    ("EleutherAI/pythia-2.8b at step1000 (/.../snapshots/<commit>)")."""
    if Path(source) == directory:
        return str(directory)
    return f"{source}{'' if revision is None else ' at ' + revision} ({directory})"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def read_checkpoint_config(path: str | Path) -> dict:
    """config.json of a local Hugging Face GPT-NeoX checkpoint directory, as a dict.

    CheckpointNotFoundError: no such directory, or no config.json in it.
    UnsupportedModelError: config.json's model_type is not gpt_neox.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {directory} does not exist or is not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type != "gpt_neox":
        raise UnsupportedModelError(
            f"{config_file} describes model_type {model_type!r}, not gpt_neox; neoxfuse runs gpt_neox only"
        )
    return config


def load_checkpoint(path: str | Path) -> tuple[ModelWeights, object | None]:
    """(weights on CPU in the checkpoint's dtype, its tokenizer or None) from a local Hugging Face
    directory: config.json plus model.safetensors (sharded or not) or pytorch_model*.bin.

    CheckpointNotFoundError: no such directory, no config.json, or no weight files.
    UnsupportedModelError: config.json is not a GPT-NeoX model neoxfuse computes.
    InvalidInputError: tensors missing or of the wrong shape for the config.
    """
    directory = Path(path)
    read_checkpoint_config(directory)
    config = GPTNeoXConfig.from_pretrained(directory)
    shape = shape_of(config)
    weights = _assemble(shape, _read_tensors(_weight_files(directory)), str(directory), config.tie_word_embeddings)
    return weights, load_tokenizer(directory)


def load_generation_eos(path: str | Path) -> tuple[int, ...]:
    """The end-of-text token ids that a checkpoint directory's generation_config.json gives
    (eos_token_id: one id or a list of them; a chat model's may add its end-of-turn token); () where
    it gives none. InvalidInputError for a file that is not that."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return ()
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as err:
        raise InvalidInputError(f"{file} is not a JSON object: {err}") from None
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InvalidInputError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(ids)


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint directory (transformers' AutoTokenizer), or None when it has no tokenizer files."""
    directory = Path(path)
    has_tokenizer = any((directory / name).is_file() for name in _TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(directory) if has_tokenizer else None


def random_model(
    name_or_config: str | GPTNeoXConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    device: str | torch.device = "cpu",
) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX HF model (eval mode, on `device`) of a named shape (MODEL_NAMES) or a given config.

    Not HF's training init (std 0.02 everywhere, zero biases, unit LayerNorms): there attention is
    near uniform and biases are zero, so a wrong mask, rotary or bias barely moves the logits. Here
    every activation is of order 1 and every parameter counts:
      embed_in ~ N(0, 1); linear weights ~ N(0, 1/in_features); linear biases ~ N(0, 0.1^2);
      LayerNorm weight ~ N(1, 0.1^2), bias ~ N(0, 0.1^2).
    Each parameter is drawn in fp32 on `device` from one generator seeded with `seed`, then cast to
    `dtype`, so one seed gives one model in every dtype; torch's global RNG is left as it was. A
    CUDA generator draws other numbers than the CPU's, so the same seed gives another model on a GPU.
    Drawing where the model runs matters at full size: Pythia-2.8B takes ~20 s on two CPU cores, a
    few GPU kernels per parameter on a GPU; no fp32 copy of the whole model is held on either.
    """
    check_seed(seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating-point torch.dtype (torch.float16, ...), got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device must be a torch.device or a name like 'cpu' or 'cuda:0', got {device!r}") from None
    config = pythia_config(name_or_config) if isinstance(name_or_config, str) else copy.deepcopy(name_or_config)
    shape_of(config)  # refuse what neoxfuse cannot compute before building it
    with _without_hf_init():  # HF's init would take most of the time, and every parameter is drawn below
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.tie_weights()  # skipped with the init; a no-op unless tie_word_embeddings
    _draw_parameters(model, torch.Generator(device).manual_seed(seed), dtype)
    return model.to(device=device, dtype=dtype).eval()


def _without_hf_init():
    """transformers' context that skips its weight initialisation (it lives elsewhere in version 4)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _draw_parameters(model: GPTNeoXForCausalLM, generator: torch.Generator, dtype: torch.dtype) -> None:
    """random_model's distributions, each parameter replaced by its draw on the generator's device in
    `dtype` (the model's own, never-touched fp32 storage is freed as it goes); UnsupportedModelError if a
    parameter is left undrawn (uninitialised memory)."""
    drawn: set[int] = set()

    def draw(parameter: torch.nn.Parameter, mean: float, std: float) -> None:
        fp32 = torch.empty(parameter.shape, device=generator.device).normal_(mean, std, generator=generator)
        parameter.data = fp32.to(dtype)
        drawn.add(id(parameter))

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            draw(module.weight, 0.0, 1.0)
        elif isinstance(module, torch.nn.Linear):
            draw(module.weight, 0.0, module.in_features**-0.5)
            if module.bias is not None:
                draw(module.bias, 0.0, 0.1)
        elif isinstance(module, torch.nn.LayerNorm):
            draw(module.weight, 1.0, 0.1)
            draw(module.bias, 0.0, 0.1)
    undrawn = [name for name, parameter in model.named_parameters() if id(parameter) not in drawn]
    if undrawn:
        raise UnsupportedModelError(f"random_model does not know how to draw {', '.join(undrawn)}")
