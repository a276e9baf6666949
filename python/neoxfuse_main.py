"""`bazel run //:neoxfuse -- ARGS`: the CLI with the library Bazel just built.

Bazel runs this from the runfiles tree; the library sits at kernels/libneoxfuse.so beside
python/, and relative paths the user gave are resolved from where `bazel run` was called.
"""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ.setdefault("NEOXFUSE_LIB", os.path.join(here, "..", "kernels", "libneoxfuse.so"))
    if "BUILD_WORKING_DIRECTORY" in os.environ:
        os.chdir(os.environ["BUILD_WORKING_DIRECTORY"])
    from neoxfuse.cli import main

    sys.exit(main())
