"""Weights: from an HF model in memory, from local checkpoints of every format, random models, bad input."""

import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPTNeoXModel, PreTrainedTokenizerFast

from neoxfuse.configs import pythia_config, shape_of
from neoxfuse.engine import Engine
from neoxfuse.errors import CheckpointNotFoundError, InvalidInputError, NeoxfuseError, UnknownModelError, UnsupportedModelError
from neoxfuse.weights import (
    LayerWeights,
    ModelWeights,
    from_hf,
    load_checkpoint,
    model_source,
    random_model,
)

# An odd shape (head_dim 12, rotary 2, ffn 72, vocab 97) so no size is confused with another.
ODD = dict(hidden_size=36, num_attention_heads=3, intermediate_size=72, vocab_size=97, rotary_pct=0.2)


def named_tensors(weights: ModelWeights) -> dict[str, torch.Tensor]:
    """Every tensor of `weights` by a readable name."""
    found = {name: getattr(weights, name) for name in ["embed_in", "final_ln_weight", "final_ln_bias", "embed_out"]}
    for i, layer in enumerate(weights.layers):
        found.update({f"layers.{i}.{f.name}": getattr(layer, f.name) for f in fields(LayerWeights)})
    return found


def assert_same_weights(got: ModelWeights, want: ModelWeights):
    assert got.shape == want.shape
    got_tensors, want_tensors = named_tensors(got), named_tensors(want)
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        assert got_tensors[name].dtype == tensor.dtype, name
        assert torch.equal(got_tensors[name], tensor), name


@pytest.fixture(scope="module")
def model():
    return random_model(pythia_config("tiny", **ODD), seed=3)


def test_from_hf_shares_storage_and_has_the_contract_shapes(model):
    weights = from_hf(model)
    h, ffn, vocab = 36, 72, 97
    assert weights.shape == shape_of(model.config)
    assert weights.embed_in.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert weights.embed_out.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    hf_layer = model.gpt_neox.layers[1]
    assert weights.layers[1].qkv_weight.data_ptr() == hf_layer.attention.query_key_value.weight.data_ptr()
    assert weights.layers[1].fc_out_bias.data_ptr() == hf_layer.mlp.dense_4h_to_h.bias.data_ptr()
    assert weights.layers[1].ln2_weight.data_ptr() == hf_layer.post_attention_layernorm.weight.data_ptr()
    assert not any(t.requires_grad for t in named_tensors(weights).values())
    assert (weights.embed_in.shape, weights.embed_out.shape) == ((vocab, h), (vocab, h))
    assert weights.final_ln_weight.shape == weights.final_ln_bias.shape == (h,)
    assert len(weights.layers) == 2
    want = {
        "ln1_weight": (h,), "ln1_bias": (h,), "ln2_weight": (h,), "ln2_bias": (h,),
        "qkv_weight": (3 * h, h), "qkv_bias": (3 * h,), "dense_weight": (h, h), "dense_bias": (h,),
        "fc_in_weight": (ffn, h), "fc_in_bias": (ffn,), "fc_out_weight": (h, ffn), "fc_out_bias": (h,),
    }
    for layer in weights.layers:
        assert {f.name: tuple(getattr(layer, f.name).shape) for f in fields(LayerWeights)} == want


def test_from_hf_refuses_a_model_without_lm_head():
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM"):
        from_hf(GPTNeoXModel(pythia_config("tiny")))


def test_weights_to_changes_dtype_of_every_tensor(model):
    weights = from_hf(model)
    half = weights.to(dtype=torch.float16)
    assert half.shape == weights.shape
    for name, tensor in named_tensors(half).items():
        assert tensor.dtype == torch.float16, name
        assert torch.equal(tensor, named_tensors(weights)[name].half()), name
    same = weights.to()
    assert same.layers[0].qkv_weight.data_ptr() == weights.layers[0].qkv_weight.data_ptr()


@pytest.mark.parametrize("source, near_limit, in_fp16", [(torch.float32, 65519.0, 65504.0), (torch.bfloat16, 65280.0, 65280.0)],
                         ids=str)
def test_weights_to_fp16_refuses_a_value_past_its_range(model, source, near_limit, in_fp16):
    # fp16's largest finite value is 65504; fp32 and bf16 reach ~3e38. A weight that would become
    # inf is named with the way out, not turned into inf logits.
    weights = from_hf(copy.deepcopy(model)).to(dtype=source)  # the test writes into it
    weights.layers[1].fc_out_weight[3, 5] = -7e4
    with pytest.raises(InvalidInputError, match=r"layers\.1\.fc_out_weight holds 7(\.01\d)?e\+04, past float16's largest "
                                                r"value 65504: .* run in bfloat16 or float32"):  # 70144 in bf16
        weights.to(dtype=torch.float16)
    assert weights.to(dtype=torch.bfloat16).layers[1].fc_out_weight[3, 5] == -70144  # bf16 holds it (rounded)
    weights.embed_out[0, 0] = float("inf")  # already inf: narrowing does not make it so
    weights.layers[1].fc_out_weight[3, 5] = near_limit  # the largest entry now: at fp16's edge, yet finite there
    assert weights.to(dtype=torch.float16).layers[1].fc_out_weight[3, 5] == in_fp16
    weights.final_ln_bias[2] = 2.0**17
    with pytest.raises(InvalidInputError, match=r"final_ln_bias holds 1\.311e\+05"):
        weights.to(dtype=torch.float16)


def test_engine_refuses_fp16_for_weights_past_its_range(model):
    weights = from_hf(copy.deepcopy(model))
    weights.embed_in[7, 1] = 1e6
    with pytest.raises(InvalidInputError, match=r"embed_in holds 1e\+06.*--dtype bf16 / fp32"):
        Engine(weights, device="cpu", dtype="fp16")
    assert Engine(weights, device="cpu", dtype="bf16").weights.embed_in[7, 1] == 1e6


def test_safetensors_checkpoint_equals_from_hf(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights, tokenizer = load_checkpoint(tmp_path)
    assert_same_weights(weights, from_hf(model))
    assert tokenizer is None


def test_sharded_safetensors_checkpoint_equals_from_hf(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    weights, _ = load_checkpoint(tmp_path)
    assert_same_weights(weights, from_hf(model))


def test_bin_checkpoint_equals_from_hf(model, tmp_path):
    # transformers 5's save_pretrained writes safetensors only (it ignores safe_serialization=False),
    # so write pytorch_model.bin as transformers 4 did: torch.save of the state dict under the
    # checkpoint names. Like the published Pythia .bin files, it also holds the old causal-mask
    # buffers (attention.bias / masked_bias), which the loader must ignore.
    model.save_pretrained(tmp_path / "st")
    state = load_file(tmp_path / "st" / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    weights, _ = load_checkpoint(tmp_path / "bin")
    assert_same_weights(weights, from_hf(model))


def test_sharded_bin_checkpoint_equals_from_hf(model, tmp_path):
    model.save_pretrained(tmp_path / "st")
    state = load_file(tmp_path / "st" / "model.safetensors")
    model.config.save_pretrained(tmp_path / "bin")
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, shard_names in shards.items():
        torch.save({name: state[name] for name in shard_names}, tmp_path / "bin" / file)
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights, _ = load_checkpoint(tmp_path / "bin")
    assert_same_weights(weights, from_hf(model))


def test_fp16_checkpoint_loads_in_fp16(tmp_path):
    model = random_model(pythia_config("tiny", **ODD), seed=4, dtype=torch.float16)
    model.save_pretrained(tmp_path)
    weights, _ = load_checkpoint(tmp_path)
    assert weights.embed_in.dtype == torch.float16
    assert_same_weights(weights, from_hf(model))


def test_tied_embeddings_load_as_embed_in(tmp_path):
    model = random_model(pythia_config("tiny", tie_word_embeddings=True), seed=5)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)  # writes embed_in only
    weights, _ = load_checkpoint(tmp_path)
    assert torch.equal(weights.embed_out, model.get_input_embeddings().weight)
    assert_same_weights(weights, from_hf(model))


def test_tokenizer_is_loaded_when_the_checkpoint_has_one(model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["<unk>", "the", "quick", "brown", "fox", "jumps"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    _, tokenizer = load_checkpoint(tmp_path)
    assert tokenizer is not None
    assert tokenizer("the quick red fox")["input_ids"] == [1, 2, 0, 4]


def test_a_hub_repo_id_is_read_from_the_local_hugging_face_cache(model, hub_cache):
    snapshot = hub_cache.snapshot("EleutherAI/pythia-odd")
    model.save_pretrained(snapshot)
    assert model_source("EleutherAI/pythia-odd").resolve() == snapshot.resolve()
    engine = Engine("EleutherAI/pythia-odd", device="cpu")
    assert_same_weights(engine.weights, from_hf(model))
    assert engine.description.startswith("EleutherAI/pythia-odd (") and snapshot.name in engine.description
    assert not engine.random_init


def test_a_revision_picks_its_own_cached_snapshot(model, hub_cache):
    main = hub_cache.snapshot("EleutherAI/pythia-odd")
    step = hub_cache.snapshot("EleutherAI/pythia-odd", revision="step1000")
    early = copy.deepcopy(model)
    with torch.no_grad():
        early.get_output_embeddings().weight.mul_(-1)
    model.save_pretrained(main)
    early.save_pretrained(step)
    assert model_source("EleutherAI/pythia-odd", revision="step1000").resolve() == step.resolve()
    engine = Engine("EleutherAI/pythia-odd", device="cpu", revision="step1000")
    assert_same_weights(engine.weights, from_hf(early))
    assert engine.description.startswith("EleutherAI/pythia-odd at step1000 (")
    with pytest.raises(UnknownModelError, match="at revision 'step7'.*hf download EleutherAI/pythia-odd --revision step7"):
        model_source("EleutherAI/pythia-odd", revision="step7")


@pytest.mark.parametrize("source", ["tiny", "directory", "in-memory"])
def test_a_revision_applies_to_hub_repo_ids_only(model, tmp_path, source):
    model.save_pretrained(tmp_path)
    source = {"tiny": "tiny", "directory": tmp_path, "in-memory": model}[source]
    with pytest.raises(InvalidInputError, match="'step1000'.* picks a version of a Hub repo id"):
        Engine(source, device="cpu", revision="step1000")


def test_a_directory_then_a_model_name_come_before_the_hub_cache(model, hub_cache, tmp_path, monkeypatch):
    model.save_pretrained(hub_cache.snapshot("tiny"))
    assert model_source("tiny") == "tiny"  # the random-initialised shape, not the cached repo "tiny"
    hub_cache.snapshot("EleutherAI/pythia-odd")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EleutherAI" / "pythia-odd").mkdir(parents=True)
    assert model_source("EleutherAI/pythia-odd") == Path("EleutherAI/pythia-odd")


def test_a_hub_repo_id_missing_from_the_cache_says_how_to_fetch_it(hub_cache):
    with pytest.raises(UnknownModelError, match="local Hugging Face cache .*hf download EleutherAI/pythia-12b`") as error:
        model_source("EleutherAI/pythia-12b")
    assert str(hub_cache.root) in str(error.value)
    with pytest.raises(UnknownModelError, match="nor a checkpoint directory$"):  # not a repo id: no Hub advice
        model_source("./nowhere/pythia")


def test_an_incomplete_cached_snapshot_is_a_clear_error(model, hub_cache):
    snapshot = hub_cache.snapshot("EleutherAI/pythia-odd")
    model.config.save_pretrained(snapshot)  # the download stopped before the weights
    listing = {name: {"size": 1, "blob_id": "0" * 40} for name in ("config.json", "model.safetensors")}
    trees = snapshot.parents[1] / "trees"  # huggingface_hub's cached tree listing of the commit
    trees.mkdir()
    (trees / f"{snapshot.name}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    with pytest.raises(CheckpointNotFoundError, match="incomplete.*model.safetensors"):
        model_source("EleutherAI/pythia-odd")


def test_random_model_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    first = from_hf(random_model("tiny", seed=7))
    assert torch.equal(torch.rand(4), before)  # random_model drew from its own generator state
    assert_same_weights(from_hf(random_model("tiny", seed=7)), first)
    other = from_hf(random_model("tiny", seed=8))
    assert not torch.equal(other.layers[0].qkv_weight, first.layers[0].qkv_weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_random_model_in_any_dtype_is_the_fp32_draw_cast(dtype):
    want = {name: t.to(dtype) for name, t in random_model("tiny", seed=7).state_dict().items()}
    got = random_model("tiny", seed=7, dtype=dtype).state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.gpu
def test_random_model_is_drawn_on_the_gpu_it_is_asked_for():
    model = random_model("tiny", seed=7, dtype=torch.float16, device="cuda")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cuda", name
    drawn = from_hf(model)
    assert_same_weights(from_hf(random_model("tiny", seed=7, dtype=torch.float16, device="cuda")), drawn)
    on_cpu = from_hf(random_model("tiny", seed=7, dtype=torch.float16))
    # Same distributions, other numbers: CUDA's generator is not the CPU's.
    assert not torch.equal(drawn.embed_in.cpu(), on_cpu.embed_in)
    assert 0.8 < drawn.embed_in.float().std().item() < 1.2
    fp32 = from_hf(random_model("tiny", seed=7, device="cuda"))
    assert torch.equal(fp32.layers[0].qkv_weight.half(), drawn.layers[0].qkv_weight)


def test_random_model_exercises_every_parameter():
    model = random_model("tiny", dtype=torch.float64)
    assert not model.training
    assert model.config._attn_implementation == "eager"
    for name, tensor in named_tensors(from_hf(model)).items():
        assert tensor.dtype == torch.float64, name
        # No zero biases, no all-ones LayerNorm: a kernel that drops one of them must show it.
        assert tensor.std() > 0.05, name
    weights = from_hf(model)
    assert 0.8 < weights.layers[0].ln1_weight.mean() < 1.2
    assert 0.8 < weights.embed_in.std() < 1.2  # activations of order 1, so attention is not near uniform


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as error:
        load_checkpoint(tmp_path / "nowhere")
    assert isinstance(error.value, NeoxfuseError) and isinstance(error.value, FileNotFoundError)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_checkpoint_of_another_model_type(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_checkpoint(tmp_path)


def test_checkpoint_without_weight_files(model, tmp_path):
    model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="has no weights"):
        load_checkpoint(tmp_path)


def test_index_naming_a_missing_shard(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    missing = sorted(tmp_path.glob("model-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(CheckpointNotFoundError, match=missing.name):
        load_checkpoint(tmp_path)


def test_checkpoint_missing_a_tensor(model, tmp_path):
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(InvalidInputError, match=r"missing: gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.bias"):
        load_checkpoint(tmp_path)


def test_checkpoint_tensor_of_the_wrong_shape(model, tmp_path):
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["gpt_neox.layers.0.attention.dense.weight"] = torch.randn(36, 35)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(InvalidInputError, match=r"attention\.dense\.weight \[36, 35\] \(expected \[36, 36\]\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_checkpoint_tensor_that_is_not_floating_point(model, tmp_path, dtype):
    # An integer weight (a quantized checkpoint without its quantization_config, say) is refused,
    # not cast to a float whose values mean nothing.
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].to(dtype)
    save_file(state, tmp_path / "model.safetensors")
    name = str(dtype).replace("torch.", "")
    with pytest.raises(InvalidInputError, match=rf"not floating point: gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.weight \({name}\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "fp16"}, "dtype must be a floating-point torch.dtype"),
    ({"dtype": torch.int8}, "dtype must be a floating-point torch.dtype"),
    ({"device": "tpu"}, "device must be a torch.device or a name like 'cpu' or 'cuda:0', got 'tpu'"),
    ({"seed": "1"}, "seed must be an integer"),
])
def test_random_model_refuses_bad_arguments(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        random_model("tiny", **kwargs)
