"""`pytest_test`: one py_test per test file, run by pytest against the built library."""

def pytest_test(name, src, deps = [], data = [], args = [], size = "medium", tags = []):
    """Runs pytest on `src` with NEOXFUSE_LIB pointing at the freshly built library (and
    NEOXFUSE_EMULATED_LIB at its CPU-emulated twin, tests/emulator).

    `args` reach the test as pytest options (declare them in conftest.py). Results are written as JUnit XML where Bazel expects them (bazel-testlogs/.../test.xml),
    so .ci/run can count test cases, not only targets.
    """
    native.py_test(
        name = name,
        srcs = ["//tests:pytest_main.py", src],
        main = "//tests:pytest_main.py",
        args = [
            "--lib=$(rootpath //kernels:libneoxfuse.so)",
            "--emulated-lib=$(rootpath //tests/emulator:libneoxfuse_emulated.so)",
            "$(rootpath %s)" % src,
        ] + args,
        data = data + ["//kernels:libneoxfuse.so", "//tests/emulator:libneoxfuse_emulated.so", "//tests:conftest.py"],
        deps = deps + ["//python:package"],
        python_version = "PY3",
        size = size,
        tags = tags,
    )
