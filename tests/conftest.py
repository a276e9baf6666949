"""Shared test set-up: the `gpu` marker (skips with a reason where no CUDA GPU is usable), --wheel."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--wheel", default=None, help="the neoxfuse wheel to check (tests/test_wheel.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason on CPU-only machines")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA GPU: " + ("torch is a CPU build" if torch.version.cuda is None else "no device visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
