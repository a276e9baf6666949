"""neoxfuse.hf.fuse_layernorms: an HF GPTNeoXForCausalLM running the ln_residual kernels.

CPU: fusing keeps parameters and classes' contracts; the restructured forward equals HF's in
both residual modes, eagerly and under torch.compile, with the kernels emulated by the oracle
(the `emulated_kernels` fixture swaps the one function every op goes through); compiled on the
meta device, the graph holds exactly the expected ln_residual ops and no LayerNorm. With the real
kernel code on the CPU emulator (`real_kernels_emulated`, tests/emulator) in that one function,
HF's own tensors go through the op's layout code and the kernel: fp32, fp16 and bf16 models in
both modes against HF, and a Pythia-2.8B-sized model's teacher-forced logits and perplexity.
GPU: the real kernels — logits against unmodified HF over a 64-token decode (eager and
torch.compile), the kernels seen by the profiler, and the perplexity of a random Pythia-2.8B.
"""

import ctypes
import functools
import math

import pytest
import torch
from transformers import GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

from neoxfuse import hf
from neoxfuse.configs import pythia_config
from neoxfuse.errors import UnsupportedModelError
from neoxfuse.ops import ln_residual
from neoxfuse.reference import layer_norm
from neoxfuse.weights import random_model

RESIDUAL_MODES = {"parallel": True, "sequential": False}


def _kernels_per_forward(layers: int, parallel: bool) -> int:
    """Layer 0's own LayerNorm(s), then one kernel per layer (parallel) or two (sequential)."""
    return 1 + (layers if parallel else 2 * layers)


def _tiny(parallel: bool, seed: int = 0, layers: int = 3) -> GPTNeoXForCausalLM:
    return random_model(pythia_config("tiny", use_parallel_residual=parallel, num_hidden_layers=layers), seed=seed)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every compiling test compiles the same HF forward code anew. Without a reset, the compiles of
    earlier tests count towards Dynamo's recompile limit (8), and a later test would silently run
    eagerly under the name of torch.compile."""
    torch._dynamo.reset()


@pytest.fixture
def emulated_kernels(monkeypatch):
    """Runs every ln_residual op as the oracle computes it (on CPU); yields the list of calls,
    each the number of LayerNorms of the call. The kernels themselves are tested on a GPU in
    tests/test_ln_residual.py; this checks what fuse_layernorms wires around them."""
    calls = []

    def run(x, residuals, weights, biases, eps, write_sum):
        calls.append(len(weights))
        h = x.float()
        for r in residuals:
            h = h + r.float()
        h = h.to(x.dtype)
        ys = [layer_norm(h.float(), w.float(), b.float(), eps).to(x.dtype) for w, b in zip(weights, biases)]
        return ([h] if write_sum else []) + ys

    monkeypatch.setattr(ln_residual, "_run", run)
    return calls


@pytest.fixture
def real_kernels_emulated(monkeypatch, emulated):
    """Runs every ln_residual op through the real kernel on the CPU emulator: outputs allocated as
    the op allocates them, the C arguments built by the op's own layout code. Yields the list of
    calls, each the number of LayerNorms of the call."""
    calls = []

    def run(x, residuals, weights, biases, eps, write_sum):
        calls.append(len(weights))
        outs = [torch.empty(x.shape, dtype=x.dtype) for _ in weights]
        h = torch.empty(x.shape, dtype=x.dtype) if write_sum else None
        args = ln_residual._args(x, residuals, weights, biases, eps, outs, h, fresh_outputs=True)
        emulated.call("neoxfuse_ln_residual", [ctypes.POINTER(ln_residual._Args), ctypes.c_void_p], ctypes.byref(args), None)
        return ([h] if write_sum else []) + outs

    monkeypatch.setattr(ln_residual, "_run", run)
    return calls


# ---------------------------------------------------------------------------------------------
# CPU


def test_fusing_keeps_parameters_hooks_and_isinstance(emulated_kernels):
    model = _tiny(parallel=True)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    hooked = []
    model.gpt_neox.layers[1].register_forward_hook(lambda *args: hooked.append(1))
    assert hf.fuse_layernorms(model) is model and hf.is_fused(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert all(isinstance(layer, GPTNeoXLayer) for layer in model.gpt_neox.layers)
    assert isinstance(model.gpt_neox.final_layer_norm, torch.nn.LayerNorm)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert hooked == [1] and len(emulated_kernels) == _kernels_per_forward(3, parallel=True)
    hf.fuse_layernorms(model)  # idempotent
    assert hf.unfuse_layernorms(model) is model and not hf.is_fused(model)
    assert all(type(layer) is GPTNeoXLayer for layer in model.gpt_neox.layers)
    assert type(model.gpt_neox.final_layer_norm) is torch.nn.LayerNorm


def test_fusing_refuses_what_it_does_not_reimplement():
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM or GPTNeoXModel"):
        hf.fuse_layernorms(torch.nn.Linear(4, 4))
    model = _tiny(parallel=True)
    model.gpt_neox.layers[1].post_attention_layernorm.eps = 1e-6
    with pytest.raises(UnsupportedModelError, match="one eps"):
        hf.fuse_layernorms(model)
    model = _tiny(parallel=True)
    model.gpt_neox.layers[0].input_layernorm = torch.nn.RMSNorm(64)
    with pytest.raises(UnsupportedModelError, match="LayerNorms with weight and bias"):
        hf.fuse_layernorms(model)
    # accelerate's device_map hooks set module.forward on the instance, which a fused class would not override.
    model = _tiny(parallel=True)
    layer = model.gpt_neox.layers[1]
    layer.forward = functools.partial(type(layer).forward, layer)
    with pytest.raises(UnsupportedModelError, match="the forward of 'layers.1' is replaced on the module itself"):
        hf.fuse_layernorms(model)
    assert not hf.is_fused(model)


@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_fused_forward_equals_hf_in_both_residual_modes(mode, emulated_kernels):
    parallel = RESIDUAL_MODES[mode]
    model = _tiny(parallel)
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
        hf.fuse_layernorms(model)
        got = model(tokens).logits
    assert emulated_kernels == [2 if parallel else 1] + ([2] * 2 + [1] if parallel else [1] * 6)
    assert len(emulated_kernels) == _kernels_per_forward(3, parallel)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_fused_generate_equals_hf_with_the_kv_cache(mode, emulated_kernels):
    model = _tiny(RESIDUAL_MODES[mode], seed=2)
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf.fuse_layernorms(model)
    got = model.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)
    assert len(emulated_kernels) == 10 * _kernels_per_forward(3, RESIDUAL_MODES[mode])


def test_training_mode_and_gradients_run_hf_forward(emulated_kernels):
    model = hf.fuse_layernorms(_tiny(parallel=True))
    tokens = torch.tensor([[5, 6, 7, 8]])
    model(tokens).logits.sum().backward()  # gradients on: HF's forward, which has a backward
    model.train()
    with torch.no_grad():
        model(tokens)
    assert emulated_kernels == []


def test_layers_called_one_by_one_normalise_their_own_input(emulated_kernels):
    # The hand-over is keyed by tensor identity: a layer called on some other tensor than its
    # predecessor's output must not use what was handed over.
    model = _tiny(parallel=True)
    hidden = torch.randn(1, 4, 64)
    position_ids = torch.arange(4)[None]
    with torch.no_grad():
        cos_sin = model.gpt_neox.rotary_emb(hidden, position_ids=position_ids)
        layer = model.gpt_neox.layers[1]
        expected = layer(hidden, position_ids=position_ids, position_embeddings=cos_sin)
        hf.fuse_layernorms(model)
        model.gpt_neox.layers[0](torch.randn(1, 4, 64), position_ids=position_ids, position_embeddings=cos_sin)
        got = layer(hidden, position_ids=position_ids, position_embeddings=cos_sin)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# HF rounds after each residual add in its dtype, the kernel sums in fp32 and rounds once.
# Measured: fp32 4e-7, fp16 8e-4 (parallel; sequential: bit-equal, one add), bf16 7e-3.
EMULATED_TOLERANCES = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", EMULATED_TOLERANCES, ids=str)
@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_real_kernels_emulated_in_the_forward_and_generate_equal_hf(mode, dtype, real_kernels_emulated):
    parallel = RESIDUAL_MODES[mode]
    model = _tiny(parallel, seed=10).to(dtype)
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(11))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        expected = model(prompt).logits.float()
        expected_generation = model.generate(prompt, **kwargs)
        hf.fuse_layernorms(model)
        got = model(prompt).logits.float()
        got_generation = model.generate(prompt, **kwargs)
    assert len(real_kernels_emulated) == 7 * _kernels_per_forward(3, parallel)  # the forward, prefill, 5 steps
    assert _relative_error(got[0], expected[0]) < EMULATED_TOLERANCES[dtype]
    logits = [torch.stack(g.logits).float()[:, 0] for g in (got_generation, expected_generation)]  # [steps, vocab]
    assert _relative_error(*logits) < EMULATED_TOLERANCES[dtype]
    if dtype == torch.float32:
        assert torch.equal(got_generation.sequences, expected_generation.sequences)


@torch.inference_mode()
def test_real_kernels_emulated_in_a_pythia_2p8b_sized_model_keep_logits_and_perplexity(real_kernels_emulated):
    # The GPU tests' model on the CPU, shortened: 2 full-size layers (hidden 2560), fp16, 48 tokens
    # teacher forced; the GPU tests' bounds (measured here: logits 7e-4, perplexity 1.1e-4).
    model = random_model(pythia_config("pythia-2.8b", num_hidden_layers=2), seed=8, dtype=torch.float16)
    tokens = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(9))
    expected_logits = model(tokens[None]).logits[0].float()
    expected = _perplexity(model, tokens)
    hf.fuse_layernorms(model)
    got_logits = model(tokens[None]).logits[0].float()
    got = _perplexity(model, tokens)
    assert len(real_kernels_emulated) == 2 * _kernels_per_forward(2, parallel=True)
    assert _relative_error(got_logits, expected_logits) < 1e-2
    assert math.isfinite(expected) and abs(got / expected - 1) < 1e-3, (got, expected)


@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_fused_forward_equals_hf_under_torch_compile(mode, emulated_kernels):
    model = _tiny(RESIDUAL_MODES[mode], seed=4)
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(tokens, use_cache=False).logits
        hf.fuse_layernorms(model)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(tokens, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_compiled_graph_runs_the_kernels_in_place_of_layernorms(mode):
    # On the meta device the ops run their fake implementations, so this traces the real op path.
    parallel = RESIDUAL_MODES[mode]
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(pythia_config("tiny", use_parallel_residual=parallel, num_hidden_layers=4)).eval()
    hf.fuse_layernorms(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.zeros(1, 5, dtype=torch.long, device="meta"), use_cache=False)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.neoxfuse.ln_residual.default) == _kernels_per_forward(4, parallel)
    assert not [t for t in targets if "layer_norm" in str(t)]


# ---------------------------------------------------------------------------------------------
# GPU


def _decode_logits(model, prompt, steps, forced=None):
    """Prefill `prompt`, then `steps` greedy decode steps with the KV cache (teacher forced by
    `forced` [steps] where given). Returns (logits [steps + 1, vocab] of every step, tokens fed)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        logits, fed = [out.logits[0, -1].float()], []
        cache = out.past_key_values
        for step in range(steps):
            token = forced[step] if forced is not None else logits[-1].argmax()
            fed.append(token)
            out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1].float())
    return torch.stack(logits), torch.stack(fed)


def _relative_error(got, expected):
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_fused_model_logits_match_hf_over_a_64_token_decode(mode, compiled):
    parallel = RESIDUAL_MODES[mode]
    layers = 4
    config = pythia_config("pythia-2.8b", num_hidden_layers=layers, use_parallel_residual=parallel)
    model = random_model(config, seed=6, dtype=torch.float16, device="cuda")
    prompt = torch.randint(0, config.vocab_size, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    expected, tokens = _decode_logits(model, prompt, 64)
    hf.fuse_layernorms(model)
    runner = torch.compile(model) if compiled else model
    before = ln_residual.launch_count()
    got, _ = _decode_logits(runner, prompt, 64, forced=tokens)
    # Every forward (prefill + 64 steps) runs the kernels in place of HF's LayerNorms and adds.
    assert ln_residual.launch_count() - before == 65 * _kernels_per_forward(layers, parallel)
    # fp16 both ways; the fused model sums each residual in fp32 and rounds once where HF rounds
    # after each add, so logits differ by a few fp16 roundings carried through 4 layers: ~1e-3.
    assert _relative_error(got, expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.quick
@pytest.mark.parametrize("mode", RESIDUAL_MODES)
def test_profiler_sees_the_kernels_and_no_layernorm(mode):
    parallel = RESIDUAL_MODES[mode]
    layers = 3
    config = pythia_config("pythia-410m", num_hidden_layers=layers, use_parallel_residual=parallel)
    model = random_model(config, dtype=torch.float16, device="cuda")
    hf.fuse_layernorms(model)
    tokens = torch.randint(0, 50304, (1, 8), device="cuda")
    with torch.no_grad():
        model(tokens)  # warm up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(tokens)
            torch.cuda.synchronize()
    kernels = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("ln_residual_kernel" in name for name in kernels) == _kernels_per_forward(layers, parallel), kernels
    assert not [name for name in kernels if "layer_norm" in name.lower()], kernels


def _perplexity(model, tokens):
    """exp(mean cross-entropy of token t+1 given tokens <= t), teacher forced, in fp32."""
    with torch.no_grad():
        logits = model(tokens[None], use_cache=False).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, tokens[1:]).item())


@pytest.mark.gpu
@pytest.mark.quick
def test_perplexity_of_random_pythia_2p8b_matches_hf():
    model = random_model("pythia-2.8b", seed=8, dtype=torch.float16, device="cuda")
    tokens = torch.randint(0, model.config.vocab_size, (512,), generator=torch.Generator().manual_seed(9)).to("cuda")
    expected = _perplexity(model, tokens)
    hf.fuse_layernorms(model)
    before = ln_residual.launch_count()
    got = _perplexity(model, tokens)
    assert ln_residual.launch_count() - before == _kernels_per_forward(32, parallel=True)
    assert math.isfinite(expected) and abs(got / expected - 1) < 1e-3, (got, expected)
