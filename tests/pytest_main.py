"""Bazel's entry point for one test file: `pytest_main.py --lib=LIB --emulated-lib=EMU TEST_FILE`.

Points NEOXFUSE_LIB at the library Bazel built and NEOXFUSE_EMULATED_LIB at its CPU-emulated
twin (tests/emulator), writes JUnit XML where Bazel asks
($XML_OUTPUT_FILE), and keeps pytest's cache out of the read-only runfiles tree. A target with
`shard_count` N runs as N processes (Bazel's test sharding): shard i runs the test cases whose
index in collection order is i modulo N.
"""

import os
import sys

import pytest


class Shard:
    """Keeps the test cases of Bazel's shard TEST_SHARD_INDEX of TEST_TOTAL_SHARDS."""

    def __init__(self, index: int, total: int):
        self.index, self.total = index, total

    def pytest_collection_modifyitems(self, config, items):
        kept = [item for i, item in enumerate(items) if i % self.total == self.index]
        config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % self.total != self.index])
        items[:] = kept


def main() -> int:
    paths = {"--lib=": "NEOXFUSE_LIB", "--emulated-lib=": "NEOXFUSE_EMULATED_LIB"}
    tests = []
    for arg in sys.argv[1:]:
        option = next((o for o in paths if arg.startswith(o)), None)
        if option is None:
            tests.append(arg)
        else:
            os.environ[paths[option]] = os.path.abspath(arg[len(option) :])
    args = ["-p", "no:cacheprovider", "-rs", "-q", *tests]
    if "XML_OUTPUT_FILE" in os.environ:
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    plugins = []
    if "TEST_TOTAL_SHARDS" in os.environ:
        open(os.environ["TEST_SHARD_STATUS_FILE"], "w").close()  # tells Bazel this runner shards
        plugins.append(Shard(int(os.environ["TEST_SHARD_INDEX"]), int(os.environ["TEST_TOTAL_SHARDS"])))
    return pytest.main(args, plugins=plugins)


if __name__ == "__main__":
    sys.exit(main())
