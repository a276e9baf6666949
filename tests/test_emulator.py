"""The CPU emulator of the kernels (tests/emulator) catches the mistakes it claims to catch, on the
kernels of tests/emulator/selftest.cu: without this, a kernel test passing on the emulator would
say less than it seems to."""

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoxfuse.errors import KernelError

ORDERED, UNORDERED, DIVERGENT, BAD_PTX, PAST_END, PDL_EARLY, PDL, MISALIGNED, UNWRITTEN, OVERWRITE = range(10)
THREADS = 64  # selftest.cu: kThreads


def _selftest(emulated, which: int) -> torch.Tensor:
    out = torch.full((THREADS,), float("nan"))
    emulated.call("neoxemu_selftest", [ctypes.c_int, ctypes.c_void_p], which, out.data_ptr())
    return out


def test_a_barrier_orders_shared_memory_whatever_the_thread_order(emulated):
    want = torch.roll(torch.arange(THREADS, dtype=torch.float32), -1)  # thread t reads what t + 1 wrote
    assert torch.equal(_selftest(emulated, ORDERED), want)
    with emulated.reverse_schedule():
        assert torch.equal(_selftest(emulated, ORDERED), want)


def test_static_shared_memory_no_thread_wrote_reads_as_nan(emulated):
    # On the GPU it holds whatever was there; zeros here would hide a read of an unwritten slot in a sum.
    assert _selftest(emulated, UNWRITTEN).isnan().all()


def test_a_missing_barrier_shows_as_results_that_depend_on_thread_order(emulated):
    forward = _selftest(emulated, UNORDERED)
    with emulated.reverse_schedule():
        reverse = _selftest(emulated, UNORDERED)
    assert not torch.equal(forward.nan_to_num(-1.0), reverse.nan_to_num(-1.0))


def test_an_overwrite_no_barrier_orders_after_the_reads_shows_as_results_that_depend_on_the_schedule(emulated):
    forward = _selftest(emulated, OVERWRITE)
    assert torch.equal(forward, torch.ones(THREADS))  # warps advance together: every read comes first
    with emulated.reverse_schedule():
        reverse = _selftest(emulated, OVERWRITE)
    assert torch.equal(reverse, torch.ones(THREADS).index_fill(0, torch.arange(32), 2.0))  # the last warp ran ahead


def test_a_divergent_barrier_fails_the_launch_and_names_the_deadlock(emulated):
    states = r"32 thread\(s\) in a warp shuffle .*; 32 thread\(s\) in __syncthreads"
    with pytest.raises(KernelError, match="deadlock in block 0; " + states):
        _selftest(emulated, DIVERGENT)


def test_unknown_ptx_fails_the_launch(emulated):
    with pytest.raises(KernelError, match="does not know the PTX `membar.gl;`"):
        _selftest(emulated, BAD_PTX)


def test_a_dependent_launch_reads_earlier_kernels_data_only_after_its_wait(emulated):
    # With PDL a kernel starts while the previous one runs: a coherent load before
    # griddepcontrol.wait could read data the previous kernel has not written yet.
    with pytest.raises(KernelError, match="ld.global.cg .* before griddepcontrol.wait"):
        _selftest(emulated, PDL_EARLY)
    out = torch.arange(THREADS, dtype=torch.float32)
    emulated.call("neoxemu_selftest", [ctypes.c_int, ctypes.c_void_p], PDL, out.data_ptr())
    assert torch.equal(out, torch.arange(1, THREADS + 1, dtype=torch.float32))


def test_the_emulator_runs_again_after_a_failed_launch(emulated):
    with pytest.raises(KernelError):
        _selftest(emulated, DIVERGENT)
    test_a_barrier_orders_shared_memory_whatever_the_thread_order(emulated)


def _run_in_child(emulated, body: str, *args: str) -> subprocess.CompletedProcess:
    """`body` in a fresh Python process that has `emulated` (this library), KernelError and
    selftest(which, out): for what a fault or a sticky error would do to this process."""
    preamble = f"""
import ctypes, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import EmulatedKernels
from neoxfuse.errors import KernelError
emulated = EmulatedKernels({emulated.path!r})
def selftest(which, out):
    emulated.call("neoxemu_selftest", [ctypes.c_int, ctypes.c_void_p], which, out.data_ptr())
"""
    return subprocess.run([sys.executable, "-c", preamble + body, *args], capture_output=True, text=True, timeout=120)


def test_a_write_past_a_guarded_tensor_faults(emulated):
    # In a child process: the fault kills it. The same call on an unguarded tensor of room enough runs.
    child = f"""
room = sys.argv[1] == "room"
out = torch.zeros({THREADS + 16}) if room else emulated.guarded(torch.zeros({THREADS}))
selftest({PAST_END}, out)
"""
    for room, expected in (("room", 0), ("guarded", -signal.SIGSEGV)):
        done = _run_in_child(emulated, child, room)
        assert done.returncode == expected, (room, done.stderr[-2000:])


def test_a_misaligned_vector_access_fails_the_launch_and_every_later_one(emulated):
    # As on the GPU, where cudaErrorMisalignedAddress is sticky: the context is lost. In a child
    # process, so this one's emulator stays usable.
    child = f"""
out = torch.zeros({THREADS})
for which in ({ORDERED}, {MISALIGNED}, {ORDERED}):
    try:
        selftest(which, out)
        print(which, "ran")
    except KernelError as error:
        print(which, "failed:", error)
"""
    done = _run_in_child(emulated, child)
    assert done.returncode == 0, done.stderr[-2000:]
    before, misaligned, after = done.stdout.splitlines()
    assert before == f"{ORDERED} ran"
    assert misaligned.startswith(f"{MISALIGNED} failed:") and "misaligned address" in misaligned, misaligned
    assert after.startswith(f"{ORDERED} failed:") and "misaligned address" in after, after
