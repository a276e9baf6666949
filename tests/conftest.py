"""Shared test set-up: the `gpu` marker (skips with a reason where no CUDA GPU is usable), the
`sanitize` marker (from each module's SANITIZE), --wheel, and the `cuobjdump`, `emulated`, `hub_cache`,
`pretend_gpu` and `word_tokenizer` fixtures, and a fresh random seed per test that a failing test's report shows
(`rng`; NEOXFUSE_TEST_SEED replays it)."""

import contextlib
import ctypes
import hashlib
import mmap
import os
import random
import re
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import neoxfuse
from neoxfuse import _lib
from neoxfuse.profile import find_program
from neoxfuse.weights import random_model


def pytest_addoption(parser):
    parser.addoption("--wheel", default=None, help="the neoxfuse wheel to check (tests/test_wheel.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason on CPU-only machines")
    config.addinivalue_line(
        "markers",
        "quick: a GPU test a short GPU loan runs first, with the sanitize cases (ci/gpu_pipeline --marker "
        "'sanitize or quick'): the end-to-end checks against HF and the full-size layers",
    )
    config.addinivalue_line(
        "markers",
        "sanitize: a small GPU case the GPU pipeline also runs under compute-sanitizer; given to the tests "
        "whose names match a pattern of their module's SANITIZE ('*' matches anything), e.g. 'test_x[float16-*]'",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        patterns = getattr(item.module, "SANITIZE", ()) if item.module is not None else ()
        if any(_name_matches(item.name, pattern) for pattern in patterns):
            item.add_marker(pytest.mark.sanitize)
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA GPU: " + ("torch is a CPU build" if torch.version.cuda is None else "no device visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def test_seed(request) -> int:
    """Fresh random data every run (DESIGN.md §5), yet reproducible: a new seed per test for torch's
    and Python's generators (and `rng`), shown in a failing test's report; NEOXFUSE_TEST_SEED=N
    replays it."""
    seed = int(os.environ.get("NEOXFUSE_TEST_SEED") or random.SystemRandom().getrandbits(32))
    request.node.test_seed = seed
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def rng(test_seed) -> random.Random:
    """A random.Random of the test's own, from its seed."""
    return random.Random(test_seed)


@pytest.fixture
def pretend_gpu(monkeypatch):
    """pretend_gpu(capability, name): torch reports one CUDA GPU, cuda:0, of that compute capability,
    so code that decides by the GPU can be checked on any machine (nothing may launch on it). The
    library's per-device answers (_lib.missing_code) are forgotten before and after."""

    def pretend(capability: tuple[int, int], name: str = "a pretended GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        _lib.missing_code.cache_clear()

    yield pretend
    _lib.missing_code.cache_clear()


@pytest.fixture
def stand_in_kernel_suite(monkeypatch):
    """stand_in_kernel_suite(suite, measure_shape): a kernel bench suite (gptq-ln-qkv, ln-residual) runs on any
    machine: its GPU parts stand in (a 3000 GB/s copy probe, a 50 MiB L2 on cuda:0, the device record, no table)
    and measure_shape(shape, ...) gives each shape's rows."""

    def stand_in(suite, measure_shape) -> None:
        copy = types.SimpleNamespace(GBps=3000.0, as_dict=lambda: {"GBps": 3000.0})
        monkeypatch.setattr(suite, "require_cuda", lambda: None)
        monkeypatch.setattr(suite, "copy_bandwidth", lambda: copy)
        monkeypatch.setattr(suite, "devices", lambda: [types.SimpleNamespace(l2_cache_bytes=50 * 2**20)])
        monkeypatch.setattr(suite.torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(suite, "device_record", lambda _: {"name": "stand-in", "sm": "90", "copy_GBps": 3000.0})
        monkeypatch.setattr(suite, "_measure_shape", measure_shape)
        monkeypatch.setattr(suite, "_table", lambda *args: "")

    return stand_in


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and hasattr(item, "test_seed"):
        report.sections.append(("random seed", f"NEOXFUSE_TEST_SEED={item.test_seed} replays this test's data"))


def _name_matches(name: str, pattern: str) -> bool:
    """Whether a test's name matches a pattern in which '*' stands for any text (brackets are literal)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None


class HubCache:
    """A Hugging Face Hub cache in a folder, laid out as huggingface_hub keeps one:
    models--{org}--{name}/refs/{revision} names a commit, snapshots/{commit}/ holds its files."""

    def __init__(self, root: Path):
        self.root = root

    def snapshot(self, repo_id: str, revision: str = "main") -> Path:
        """The new, empty snapshot folder of `repo_id` at `revision` (its name is the commit)."""
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        storage = self.root / f"models--{repo_id.replace('/', '--')}"
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True)
        return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty HubCache that huggingface_hub reads in place of HF_HUB_CACHE."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    return HubCache(root)


@pytest.fixture(scope="session")
def word_tokenizer():
    """word_tokenizer(vocab_size): a whitespace word tokenizer with one word per model token, built
    offline: "<|endoftext|>" (id 0, also EOS), "hello", "world", then "w3", "w4", ..."""

    def build(vocab_size: int) -> PreTrainedTokenizerFast:
        words = ["<|endoftext|>", "hello", "world", *(f"w{i}" for i in range(3, vocab_size))]
        tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<|endoftext|>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<|endoftext|>")

    return build


# A chat template in word_tokenizer's words: a system turn is w3, a user turn w4, an assistant turn w5
# before the message (another role is refused); the assistant's turn opened is "w6 " (a space before
# the answer, which lm_eval writes without its target delimiter after a chat's context).
CHAT_TEMPLATE = ("{% set marks = {'system': 'w3', 'user': 'w4', 'assistant': 'w5'} %}{% for m in messages %}"
                 "{% if m['role'] not in marks %}{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
                 "{{ marks[m['role']] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w6 {% endif %}")


def neoxfuse_command(*args: str, env: dict | None = None) -> tuple[list[str], dict]:
    """(command, environment) of `python -m neoxfuse ARGS` in a fresh process that finds this
    checkout's package (env: the environment to start from; default this process's)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(neoxfuse.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    return [sys.executable, "-m", "neoxfuse", *args], env


@pytest.fixture(scope="session")
def tiny_checkpoint_with_tokenizer(tmp_path_factory, word_tokenizer) -> Path:
    """A checkpoint directory: the random "tiny" model of seed 3 (test_cli's tiny_checkpoint), with
    a word tokenizer (EOS: id 0)."""
    directory = tmp_path_factory.mktemp("tiny-checkpoint-with-tokenizer")
    model = random_model("tiny", seed=3)
    model.save_pretrained(directory)
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def cuobjdump() -> str:
    """cuobjdump from PyPI's nvidia-cuda-cuobjdump (requirements.txt), else the toolkit's (on PATH
    or in /usr/local/cuda, as on GPU machines that run the tests from the wheel)."""
    try:
        import nvidia
    except ModuleNotFoundError:
        roots = []
    else:
        roots = list(nvidia.__path__)
    for root in roots:
        for found in Path(root).glob("*/bin/cuobjdump"):
            return str(found)
    path = find_program("cuobjdump", "/usr/local/cuda*/bin/cuobjdump")
    if path is None:
        pytest.fail("cuobjdump not found: requirements.txt installs nvidia-cuda-cuobjdump")
    return path


_LIBC = ctypes.CDLL(None, use_errno=True)


class EmulatedDevice(NamedTuple):
    """What the emulator reports as its device."""

    major: int  # compute capability
    minor: int
    sms: int
    shared_optin: int  # shared memory one block may have, bytes
    gpc_sms: tuple[int, ...] = ()  # SMs per GPC (a cluster runs within one); (): one pool of SMs


class EmulatedKernels:
    """libneoxfuse.so's C ABI with the kernels run on the CPU (tests/emulator/neoxemu.h): the real
    kernel code on CPU tensors' memory, every CUDA thread a fiber, clusters and barriers emulated."""

    H100 = EmulatedDevice(9, 0, 132, 227 * 1024)  # what it reports unless told otherwise
    RTX_5090 = EmulatedDevice(12, 0, 170, 99 * 1024)
    # An H100 SXM's 132 SMs in 8 GPCs of uneven size: this layout runs 15 clusters of 8 at once, as
    # measured on H100 SXM (a GPC below 16 SMs), so 31 of 4 (the 32 heads of Pythia-2.8B do not fit).
    H100_GPCS = EmulatedDevice(9, 0, 132, 227 * 1024, (18, 18, 18, 16, 16, 16, 16, 14))

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.neoxfuse_last_error.restype = ctypes.c_char_p

    def call(self, name: str, argtypes: list, *args) -> None:
        """Calls the C function `name`; KernelError with the emulator's message on a non-zero status."""
        fn = getattr(self.lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _lib.check_status(self.lib, name, fn(*args))

    @staticmethod
    def guarded(t: torch.Tensor) -> torch.Tensor:
        """t (same shape, strides and values) in memory that ends less than 16 bytes before an
        inaccessible page: a kernel that reads or writes past the end of t's storage faults. An
        empty tensor is returned as it is (its data pointer stays NULL, as torch makes it)."""
        elements = t.untyped_storage().nbytes() // t.element_size()
        if elements == 0:
            return t
        nbytes = elements * t.element_size()
        pages = max(1, -(-nbytes // mmap.PAGESIZE))
        memory = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        if _LIBC.mprotect(ctypes.c_void_p(base + pages * mmap.PAGESIZE), mmap.PAGESIZE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        start = (pages * mmap.PAGESIZE - nbytes) // 16 * 16  # kernels need 16-byte aligned storage
        storage = torch.frombuffer(memory, dtype=t.dtype, count=elements, offset=start)  # [elements]
        storage.copy_(torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (elements,)))
        out = storage.as_strided(t.shape, t.stride(), t.storage_offset())
        out.guard = memory  # the mapping lives as long as the tensor
        return out

    def call_sample_token(self, logits, rng, token, temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
        """neoxfuse_fused_sample_token on CPU tensors as they are: logits [vocab] fp32, rng [2] and
        token [1] int64 (both written)."""
        self.call("neoxfuse_fused_sample_token", [ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
                  logits.data_ptr(), logits.numel(), temperature, top_k, top_p, rng.data_ptr(), token.data_ptr(), None)

    def sample_token(self, logits, rng, token, temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
        """call_sample_token on guarded copies of the tensors; rng and token receive the results."""
        guarded = [self.guarded(t) for t in (logits, rng, token)]
        self.call_sample_token(*guarded, temperature, top_k, top_p)
        rng.copy_(guarded[1])
        token.copy_(guarded[2])

    def take_streamed_bytes(self) -> int:
        """Bytes the kernels read with streaming loads (ld.global.cs: data read once, like weights)
        since the last call."""
        self.lib.neoxemu_take_streamed_bytes.restype = ctypes.c_uint64
        return int(self.lib.neoxemu_take_streamed_bytes())

    @contextlib.contextmanager
    def watch(self, t: torch.Tensor):
        """Counts the bytes the kernels read from t's memory (t contiguous) with cache-operator loads
        (__ldg, __ldcg, __ldcs: how they read weights, activations and the KV cache) while the
        `with` body runs; yields a list that holds the count afterwards."""
        fn = self.lib.neoxemu_watch
        fn.argtypes, fn.restype = [ctypes.c_size_t, ctypes.c_uint64], ctypes.c_uint64
        count: list[int] = []
        fn(t.data_ptr(), t.numel() * t.element_size())
        try:
            yield count
        finally:
            count.append(int(fn(0, 0)))

    @contextlib.contextmanager
    def device(self, device: EmulatedDevice):
        """The emulator reports `device` while the `with` body runs, then the H100 again."""
        self._set_device(device)
        try:
            yield
        finally:
            self._set_device(self.H100)

    def _set_device(self, device: EmulatedDevice) -> None:
        fn = self.lib.neoxemu_set_device
        fn.argtypes, fn.restype = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_int), ctypes.c_int], ctypes.c_int
        gpc_sms = (ctypes.c_int * max(1, len(device.gpc_sms)))(*device.gpc_sms)
        if fn(*device[:4], gpc_sms, len(device.gpc_sms)) != 0:
            raise ValueError(f"the emulator cannot model {device}")

    @contextlib.contextmanager
    def reverse_schedule(self):
        """Runs each block's threads, and a launch's clusters, in reverse order: a read that no
        barrier orders after its write then sees other data, so results differ from the forward order's."""
        self.lib.neoxemu_set_schedule(1)
        try:
            yield
        finally:
            self.lib.neoxemu_set_schedule(0)


@pytest.fixture(scope="session")
def emulated() -> EmulatedKernels:
    """The CPU-emulated library Bazel builds (//tests/emulator:libneoxfuse_emulated.so; found through
    NEOXFUSE_EMULATED_LIB, else in bazel-bin)."""
    path = os.environ.get("NEOXFUSE_EMULATED_LIB") or str(
        Path(__file__).parents[1] / "bazel-bin/tests/emulator/libneoxfuse_emulated.so"
    )
    if not Path(path).is_file():
        pytest.fail(f"{path} not found: build it with `./bazelw build //tests/emulator:libneoxfuse_emulated.so`")
    return EmulatedKernels(path)
