"""The shared library: it loads, describes itself, holds sm_90a and sm_120 code, says which GPUs run
it (and a GPU it has no code for is refused by name), copies exactly."""

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

from neoxfuse import _lib, sampling
from neoxfuse.checks import require_kernel_code
from neoxfuse.configs import pythia_config, shape_of
from neoxfuse.device import copy_bandwidth, devices
from neoxfuse.errors import InvalidInputError, NoGPUError, UnsupportedDeviceError
from neoxfuse.fused import FusedBackend
from neoxfuse.ops import fused_decoder
from neoxfuse.ops.copy import device_copy

ARCHS = ["sm_90a", "sm_120", "compute_120"]  # bazel/cuda.bzl's CUDA_GENCODE


def test_library_loads_and_describes_itself():
    info = _lib.build_info()
    assert f"abi={_lib.ABI_VERSION}" in info
    assert "archs=sm_90a,sm_120,compute_120" in info


def test_library_holds_machine_code_for_every_target_arch(cuobjdump):
    listing = subprocess.run(
        [cuobjdump, "--list-elf", "--list-ptx", str(_lib.library_path())], capture_output=True, text=True, check=True
    ).stdout
    elf = [line for line in listing.splitlines() if line.startswith("ELF file")]
    ptx = [line for line in listing.splitlines() if line.startswith("PTX file")]
    assert any(".sm_90a.cubin" in line for line in elf), listing
    assert any(".sm_120.cubin" in line for line in elf), listing
    assert any(".sm_120.ptx" in line for line in ptx), listing
    # Every kernel object carries both machine codes, not only one of them.
    assert sum(".sm_90a.cubin" in line for line in elf) == sum(".sm_120.cubin" in line for line in elf)


@pytest.mark.parametrize(
    ("sm", "archs", "code"),
    [
        ("90", ARCHS, "sm_90a machine code"),  # H100, H200
        ("120", ARCHS, "sm_120 machine code"),  # RTX 5090
        ("121", ARCHS, "sm_120 machine code"),  # same major, later minor: the sm_120 cubin runs
        ("130", ARCHS, "compute_120 PTX, JIT-compiled by the driver at first use"),  # newer: PTX
        ("100", ARCHS, None),  # B200: sm_120 code does not run on 10.x, PTX 12.0 is too new, sm_90a is 9.0 only
        ("89", ARCHS, None),
        ("80", ARCHS, None),  # A100
        ("86", ["sm_80"], "sm_80 machine code"),
        ("100", ["compute_90a"], None),  # arch-specific PTX is not forward compatible
        ("90", ["compute_90a"], "compute_90a PTX, JIT-compiled by the driver at first use"),
        ("89", ["compute_80"], "compute_80 PTX, JIT-compiled by the driver at first use"),
        ("103", ["sm_100f"], "sm_100f machine code"),  # family-specific: later minors of the family
        ("110", ["sm_100f", "compute_100f"], None),
        ("103", ["compute_100a"], None),
    ],
)
def test_code_for_each_compute_capability(sm, archs, code):
    assert _lib.code_for(sm, archs) == code


def test_library_lists_the_archs_it_was_built_for():
    assert _lib.archs() == ARCHS


def test_a_gpu_the_library_has_no_code_for_is_refused_by_name(pretend_gpu):
    pretend_gpu((10, 0), "NVIDIA B200")
    reason = _lib.missing_code(0)
    assert reason is not None and "cuda:0 (NVIDIA B200, sm_100)" in reason and "sm_90a, sm_120, compute_120" in reason
    availability = FusedBackend.available(torch.device("cuda"), torch.float16)
    assert not availability and availability.reason == reason  # so --backend auto takes the reference
    assert not sampling.sample_kernel_runs(torch.device("cuda"), 50304)
    with pytest.raises(UnsupportedDeviceError, match="NVIDIA B200, sm_100"):
        require_kernel_code(torch.device("cuda", 0))
    with pytest.raises(UnsupportedDeviceError, match="NVIDIA B200, sm_100"):
        fused_decoder.plan(shape_of(pythia_config("pythia-2.8b")), "cuda")


@pytest.mark.parametrize("capability", [(9, 0), (12, 0), (12, 1)])
def test_gpus_the_library_has_code_for_are_not_refused(pretend_gpu, capability):
    pretend_gpu(capability)
    assert _lib.missing_code(0) is None
    require_kernel_code(torch.device("cuda", 0))
    assert FusedBackend.available(torch.device("cuda"), torch.float16)
    assert sampling.sample_kernel_runs(torch.device("cuda"), 50304)


def test_library_exports_only_the_c_abi():
    lib = ctypes.CDLL(str(_lib.library_path()))
    for name in ["neoxfuse_abi_version", "neoxfuse_build_info", "neoxfuse_device_copy", "neoxfuse_get_device_info"]:
        assert hasattr(lib, name)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    exported = subprocess.run([nm, "-D", "--defined-only", str(_lib.library_path())], capture_output=True, text=True).stdout
    symbols = [line.split()[-1] for line in exported.splitlines() if " T " in line]
    assert symbols and all(s.startswith("neoxfuse_") for s in symbols), symbols


def test_missing_library_is_a_clear_error(tmp_path):
    code = "from neoxfuse import _lib; _lib.library()"
    env = dict(os.environ, NEOXFUSE_LIB=str(tmp_path / "nowhere.so"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "LibraryNotFoundError" in result.stderr and "libneoxfuse.so not found" in result.stderr


def test_library_that_does_not_load_is_a_clear_error(tmp_path):
    fake = tmp_path / "libneoxfuse.so"
    fake.write_bytes(b"not an ELF file")
    code = "from neoxfuse import _lib; _lib.library()"
    env = dict(os.environ, NEOXFUSE_LIB=str(fake))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "did not load" in result.stderr


def test_device_listing_without_a_gpu_is_empty_not_an_error():
    if torch.cuda.is_available():
        assert devices(), "torch sees a GPU, the library must too"
    else:
        assert devices() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_copy_bandwidth_on_cpu_machine_says_no_gpu():
    with pytest.raises(NoGPUError, match="need a CUDA GPU"):
        copy_bandwidth()


def test_device_copy_refuses_cpu_tensors():
    x = torch.zeros(16)
    with pytest.raises((InvalidInputError, NoGPUError)):
        device_copy(x, torch.empty_like(x))


@pytest.mark.gpu
@pytest.mark.parametrize("nbytes", [16, 17, 4096 + 5, (1 << 20) + 3, 64 << 20])
def test_device_copy_is_exact(nbytes):
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.full_like(src, 0xA5)  # poison: a byte left unwritten shows
    device_copy(src, dst)
    torch.cuda.synchronize()
    assert torch.equal(src, dst)


@pytest.mark.gpu
def test_device_copy_checks_arguments():
    src = torch.zeros(64, dtype=torch.float16, device="cuda")
    with pytest.raises(InvalidInputError, match="match in dtype and size"):
        device_copy(src, torch.empty(32, dtype=torch.float16, device="cuda"))
    with pytest.raises(InvalidInputError, match="16-byte boundary"):
        device_copy(src[1:33], torch.empty(32, dtype=torch.float16, device="cuda"))
    with pytest.raises(InvalidInputError, match="contiguous"):
        device_copy(src.view(8, 8).t(), torch.empty(8, 8, dtype=torch.float16, device="cuda"))


@pytest.mark.gpu
def test_copy_bandwidth_reports_a_plausible_rate():
    result = copy_bandwidth(nbytes=256 << 20, iterations=5)
    assert result.bytes_moved == 2 * (256 << 20)
    # Any GPU this project targets moves more than 100 GB/s and less than 20 TB/s.
    assert 100 < result.GBps < 20_000
