"""`local_venv`: the project's virtual environment (made by ./bazelw) as Bazel's Python toolchain.

py_test and py_binary otherwise run the host's python3, which has no torch. The
interpreter path must be absolute, so a repository rule writes it from the workspace path.
`NEOXFUSE_VENV` names another environment.
"""

_BUILD = """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "python3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":python3_runtime",
)

toolchain(
    name = "python_toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _local_venv_impl(ctx):
    venv = ctx.os.environ.get("NEOXFUSE_VENV", "")
    if not venv:
        venv = str(ctx.path(Label("//:WORKSPACE.bazel")).dirname) + "/.venv"
    python = venv + "/bin/python3"
    if not ctx.path(python).exists:
        fail("No Python environment at %s: run ./bazelw, which creates it." % venv)
    ctx.file("BUILD.bazel", _BUILD.format(python = python))

local_venv = repository_rule(
    implementation = _local_venv_impl,
    environ = ["NEOXFUSE_VENV"],
    local = True,
)
