"""The wheel: it holds the package and the library, its RECORD is right, and it installs and runs."""

import base64
import hashlib
import os
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
    assert (name, python, abi, platform) == ("neoxfuse", "py3", "none", "linux_x86_64")
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
