"""Shared test set-up: the `gpu` marker (skips with a reason where no CUDA GPU is usable), the
`sanitize` marker (from each module's SANITIZE), --wheel, and the `cuobjdump` fixture."""

import re
from pathlib import Path

import pytest
import torch

from neoxfuse.profile import find_program


def pytest_addoption(parser):
    parser.addoption("--wheel", default=None, help="the neoxfuse wheel to check (tests/test_wheel.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason on CPU-only machines")
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


def _name_matches(name: str, pattern: str) -> bool:
    """Whether a test's name matches a pattern in which '*' stands for any text (brackets are literal)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None


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
