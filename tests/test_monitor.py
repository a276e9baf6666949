"""NVML monitoring: the summary and flags from synthetic samples, the sampler thread, no-NVML machines."""

import os
import random
import statistics
import subprocess
import sys
import time
import types
from dataclasses import replace

import pytest
import torch

from neoxfuse import monitor
from neoxfuse.monitor import CLOCK_EVENT_REASONS, GpuMonitor, GpuProcess, Sample, annotate, summarize

BIT = {name: bit for name, (bit, _) in CLOCK_EVENT_REASONS.items()}
THROTTLING = [name for name, (_, throttling) in CLOCK_EVENT_REASONS.items() if throttling]
NOT_THROTTLING = [name for name, (_, throttling) in CLOCK_EVENT_REASONS.items() if not throttling]


def random_samples(n: int, rng: random.Random, reasons=(), others=()) -> list[Sample]:
    return [
        Sample(
            time_s=0.1 * i,
            sm_clock_mhz=rng.choice([1410, 1755, 1980]),
            memory_clock_mhz=rng.choice([1593, 2619]),
            power_w=rng.uniform(60, 700),
            temperature_c=rng.randint(30, 85),
            memory_used_mib=rng.uniform(500, 80000),
            clock_event_reasons=reasons[i] if i < len(reasons) else 0,
            other_processes=others[i] if i < len(others) else (),
        )
        for i in range(n)
    ]


def test_reason_bits_match_nvml():
    import pynvml

    for name, (bit, _) in CLOCK_EVENT_REASONS.items():
        camel = "".join(part.capitalize() for part in name.split("_"))
        assert getattr(pynvml, f"nvmlClocksEventReason{camel}") == bit, name


def test_summary_has_min_median_max_of_each_quantity(rng):
    samples = random_samples(rng.randint(3, 40), rng)
    summary = summarize(samples, device={"name": "test"}, interval_s=0.1)
    assert summary["available"] and summary["samples"] == len(samples)
    for quantity in monitor.MEASURED:
        values = [getattr(s, quantity) for s in samples]
        assert summary[quantity] == {"min": min(values), "median": statistics.median(values), "max": max(values)}
    assert summary["device"] == {"name": "test"}
    assert not summary["throttled"] and not summary["gpu_shared"]


@pytest.mark.parametrize("reason", THROTTLING)
def test_thermal_and_power_reasons_flag_the_run_as_throttled(reason, rng):
    n = 20
    hit = rng.randrange(n)
    reasons = [BIT["gpu_idle"] if i != hit else BIT[reason] | BIT["gpu_idle"] for i in range(n)]
    summary = summarize(random_samples(n, rng, reasons=reasons))
    assert summary["throttled"]
    assert summary["throttle_reasons"] == [reason]
    assert summary["clock_event_reasons"][reason] == 1
    assert summary["clock_event_reasons"]["gpu_idle"] == n


def test_idle_application_clocks_and_sync_boost_are_not_throttling(rng):
    reasons = [BIT[rng.choice(NOT_THROTTLING)] for _ in range(30)]
    summary = summarize(random_samples(30, rng, reasons=reasons))
    assert not summary["throttled"] and summary["throttle_reasons"] == []
    assert sum(summary["clock_event_reasons"].values()) == 30


def test_another_process_on_the_gpu_flags_the_run_as_shared(rng):
    stranger = GpuProcess(pid=rng.randint(1000, 99999), name="python train.py", used_memory_mib=2048.0)
    others = [()] * 5 + [(stranger,)] * 3
    summary = summarize(random_samples(10, rng, others=others))
    assert summary["gpu_shared"]
    assert summary["other_processes"] == [{"pid": stranger.pid, "name": "python train.py", "used_memory_mib": 2048.0}]


def test_quantities_nvml_does_not_report_are_left_out(rng):
    samples = [replace(s, power_w=None) for s in random_samples(5, rng)]
    summary = summarize(samples)
    assert "power_w" not in summary and "sm_clock_mhz" in summary


def test_annotate_flags_every_row_and_keeps_the_suites_own_summary(rng):
    summary = summarize(random_samples(4, rng, reasons=[BIT["sw_power_cap"]]))
    suite_own = {"available": True, "samples": 17}
    result = {"suite": "x", "rows": [{"i": i} for i in range(rng.randint(1, 9))], "nvml": suite_own}
    annotate(result, summary)
    assert all(row["throttled"] is True and row["gpu_shared"] is False for row in result["rows"])
    assert result["nvml"]["throttled"] and result["nvml"]["suite_sampler"] == suite_own


def test_annotate_without_nvml_sets_no_flags():
    result = {"suite": "x", "rows": [{"i": 1}]}
    annotate(result, monitor.unavailable("no driver"))
    assert result["nvml"] == {"available": False, "reason": "unavailable: no driver"}
    assert result["rows"] == [{"i": 1}]


class FakeSource:
    """Stands in for NVML: random readings, and remembers being closed."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.closed = False

    def device(self) -> dict:
        return {"index": 0, "name": "fake"}

    def read(self, time_s: float) -> Sample:
        return replace(random_samples(1, self.rng)[0], time_s=time_s)

    def close(self) -> None:
        self.closed = True


def test_monitor_samples_on_a_thread_until_the_block_ends(rng):
    source = FakeSource(rng)
    with GpuMonitor(interval_s=0.005, source=source) as gpu:
        while len(gpu.samples) < 5:
            time.sleep(0.002)
    count = len(gpu.samples)
    assert source.closed
    times = [s.time_s for s in gpu.samples]
    assert times == sorted(times)
    summary = gpu.summary()
    assert summary["available"] and summary["samples"] == count >= 6  # plus the one taken at exit
    assert summary["device"] == {"index": 0, "name": "fake"}


def test_monitor_without_nvidia_ml_py_says_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with GpuMonitor() as gpu:
        pass
    summary = gpu.summary()
    assert summary["available"] is False and summary["reason"].startswith("unavailable: nvidia-ml-py is not installed")
    assert monitor.device_report()["available"] is False


def test_monitor_without_a_driver_says_unavailable(monkeypatch):
    class NVMLError(Exception):
        pass

    def no_driver():
        raise NVMLError("NVML Shared Library Not Found")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=no_driver)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with GpuMonitor() as gpu:
        pass
    assert gpu.summary() == {
        "available": False,
        "reason": "unavailable: NVML did not initialise: NVML Shared Library Not Found",
    }


def test_own_process_tree_is_recognised():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert monitor._is_own_process(os.getpid(), os.getpid())
        assert monitor._is_own_process(child.pid, os.getpid())
        assert not monitor._is_own_process(os.getppid(), os.getpid())
    finally:
        child.kill()
        child.wait()


@pytest.mark.gpu
def test_monitor_reads_a_real_gpu_under_load():
    with GpuMonitor(interval_s=0.02) as gpu:
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(200):
            x = torch.tanh(x @ x)
        torch.cuda.synchronize()
    summary = gpu.summary()
    assert summary["available"], summary
    assert summary["samples"] >= 3
    assert summary["sm_clock_mhz"]["max"] > 0 and summary["memory_used_mib"]["max"] > 0
    assert os.getpid() not in [p["pid"] for p in summary["other_processes"]]
    report = monitor.device_report()
    assert report["available"] and report["driver_version"] and report["max_sm_clock_mhz"] > 0
