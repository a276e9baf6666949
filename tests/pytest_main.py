"""Bazel's entry point for one test file: `pytest_main.py --lib=LIB --emulated-lib=EMU TEST_FILE`.

Points NEOXFUSE_LIB at the library Bazel built and NEOXFUSE_EMULATED_LIB at its CPU-emulated
twin (tests/emulator), writes JUnit XML where Bazel asks
($XML_OUTPUT_FILE), and keeps pytest's cache out of the read-only runfiles tree.
"""

import os
import sys

import pytest


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
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main())
