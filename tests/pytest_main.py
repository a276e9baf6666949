"""Bazel's entry point for one test file: `pytest_main.py --lib=LIB TEST_FILE`.

Points NEOXFUSE_LIB at the library Bazel built, writes JUnit XML where Bazel asks
($XML_OUTPUT_FILE), and keeps pytest's cache out of the read-only runfiles tree.
"""

import os
import sys

import pytest


def main() -> int:
    lib = next(a for a in sys.argv[1:] if a.startswith("--lib="))[len("--lib=") :]
    tests = [a for a in sys.argv[1:] if not a.startswith("--lib=")]
    os.environ["NEOXFUSE_LIB"] = os.path.abspath(lib)
    args = ["-p", "no:cacheprovider", "-rs", "-q", *tests]
    if "XML_OUTPUT_FILE" in os.environ:
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main())
