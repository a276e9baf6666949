"""The wheel: it holds the package and the library, its RECORD is right, its platform tag is what the
library needs of the system, and it installs and runs."""

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def wheel(request) -> Path:
    path = request.config.getoption("--wheel")
    if path is None:
        pytest.skip("run through Bazel (//tests:test_wheel), which passes --wheel")
    return Path(path).resolve()


def test_wheel_name_follows_pep427(wheel):
    name, version, python, abi, platform = wheel.name[: -len(".whl")].split("-")
    assert (name, python, abi) == ("neoxfuse", "py3", "none")
    assert re.fullmatch(r"manylinux_\d+_\d+_x86_64", platform), platform
    import neoxfuse

    assert version == neoxfuse.__version__


def test_wheel_holds_package_library_and_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {"neoxfuse/__init__.py", "neoxfuse/_lib.py", "neoxfuse/lib/libneoxfuse.so"} <= names
    assert {f"{dist_info}/{f}" for f in ["METADATA", "WHEEL", "RECORD", "entry_points.txt"]} <= names
    assert not any("__pycache__" in n or n.startswith("python/") for n in names)


def test_wheel_record_matches_contents(wheel):
    zf = zipfile.ZipFile(wheel)
    record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    rows = [line.split(",") for line in zf.read(record_name).decode().splitlines()]
    listed = {row[0] for row in rows}
    assert listed == set(zf.namelist())
    for name, digest, size in rows:
        if name == record_name:
            continue
        data = zf.read(name)
        want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (want, len(data)), name


# The distribution that provides each module the package imports from outside the standard library,
# and the imports that are optional peers (a benchmark reports them as not run where they are missing).
DISTRIBUTIONS = {"torch": "torch", "transformers": "transformers", "huggingface_hub": "huggingface_hub",
                 "safetensors": "safetensors", "tqdm": "tqdm", "jinja2": "jinja2", "pynvml": "nvidia-ml-py"}
OPTIONAL_IMPORTS = {"flashinfer", "lm_eval"}  # bench ln-residual's FlashInfer peer; neoxfuse.evaluation and `neoxfuse eval`


def test_wheel_requires_what_its_modules_import(wheel):
    import ast

    zf = zipfile.ZipFile(wheel)
    imported = set()
    for name in (n for n in zf.namelist() if n.endswith(".py")):
        for node in ast.walk(ast.parse(zf.read(name))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"neoxfuse"}
    assert third_party - OPTIONAL_IMPORTS <= set(DISTRIBUTIONS), "a new import: name its distribution in DISTRIBUTIONS"
    metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    required = {re.split(r"[<>=!~ ;]", line.split(": ", 1)[1])[0] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")}
    assert {DISTRIBUTIONS[module] for module in third_party - OPTIONAL_IMPORTS} == required


# What a manylinux_2_Y wheel may need of the system besides glibc 2.Y (PEP 600): the libraries every
# such system has, and the newest symbol versions of GCC 11's libstdc++ and libgcc_s, as on
# manylinux_2_34's baseline, AlmaLinux 9.
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "ld-linux-x86-64.so.2",
                    "libstdc++.so.6", "libgcc_s.so.1"}
NEWEST_GCC_11 = {"GLIBCXX": (3, 4, 29), "CXXABI": (1, 3, 13), "GCC": (7, 0, 0)}


def dynamic_needs(library: Path) -> tuple[set[str], list[tuple[str, str]]]:
    """The shared libraries `library` names (DT_NEEDED) and the (library, symbol version) pairs it needs, by readelf."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.fail("readelf not found: binutils, which the build's toolchain brings, has it")
    dynamic = subprocess.run([readelf, "-d", "-W", str(library)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic))
    versions, current = [], None
    for line in subprocess.run([readelf, "-V", "-W", str(library)], capture_output=True, text=True, check=True).stdout.splitlines():
        if m := re.search(r"File: (\S+)", line):
            current = m[1]
        elif current and (m := re.search(r"Name: (\S+)", line)):
            versions.append((current, m[1]))
    return needed, versions


def test_library_needs_no_more_of_the_system_than_the_wheel_tag_says(wheel, tmp_path):
    platform = wheel.name[: -len(".whl")].split("-")[4]
    glibc = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", platform)
    assert glibc, f"{platform} is not a manylinux tag"
    newest = {"GLIBC": (int(glibc[1]), int(glibc[2])), **NEWEST_GCC_11}
    library = tmp_path / "libneoxfuse.so"
    library.write_bytes(zipfile.ZipFile(wheel).read("neoxfuse/lib/libneoxfuse.so"))
    needed, versions = dynamic_needs(library)
    assert needed <= SYSTEM_LIBRARIES, f"not on every {platform} system: {sorted(needed - SYSTEM_LIBRARIES)}"
    assert any(name.startswith("GLIBC_") for _, name in versions), "readelf listed no glibc symbol versions"
    too_new = []
    for file, name in versions:
        prefix, _, number = name.rpartition("_")
        if prefix not in newest or not re.fullmatch(r"[\d.]+", number) or tuple(map(int, number.split("."))) > newest[prefix]:
            too_new.append(f"{file}: {name}")
    assert not too_new, f"newer than {platform} promises: {too_new}"


def test_installed_wheel_finds_its_own_library(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NEOXFUSE_LIB", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    code = "import neoxfuse, neoxfuse._lib as l; print(neoxfuse.__file__); print(l.library_path()); print(l.build_info())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    package_file, library, info = out.stdout.splitlines()
    assert package_file.startswith(str(target)) and library.startswith(str(target))
    assert "archs=sm_90a,sm_120,compute_120" in info
