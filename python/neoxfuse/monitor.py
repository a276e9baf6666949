"""NVML monitoring of a GPU while a benchmark runs, and the flags a result carries from it.

A `GpuMonitor` thread reads the GPU every `interval_s` through NVML (nvidia-ml-py's `pynvml`):
SM and memory clocks, power, temperature, memory used, the clock-event (throttle) reasons and
the processes on the GPU that are not ours. `summarize(samples)` reduces a run's samples to
min / median / max per quantity and two flags:

    throttled  = some sample had a thermal or power reason set (SW/HW thermal slowdown, SW power
                 cap, HW slowdown, HW power brake). Idle, application clocks, sync boost and
                 display clocks lower clocks too, but they are not throttling.
    gpu_shared = some sample saw a process on the GPU outside this process tree.

`annotate(result, summary)` attaches the summary to a results file (DESIGN.md §6) as its top-level
"nvml" key and copies the two flags onto every row. Without NVML (no driver, no GPU, no
nvidia-ml-py) nothing fails: the summary says {"available": false, "reason": "unavailable: ..."}.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Protocol

# NVML's clock-event reason bits (nvml.h: nvmlClocksEventReason*), with whether each is throttling.
CLOCK_EVENT_REASONS = {
    "gpu_idle": (0x1, False),
    "applications_clocks_setting": (0x2, False),
    "sw_power_cap": (0x4, True),
    "hw_slowdown": (0x8, True),
    "sync_boost": (0x10, False),
    "sw_thermal_slowdown": (0x20, True),
    "hw_thermal_slowdown": (0x40, True),
    "hw_power_brake_slowdown": (0x80, True),
    "display_clock_setting": (0x100, False),
}

MEASURED = ("sm_clock_mhz", "memory_clock_mhz", "power_w", "temperature_c", "memory_used_mib")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_memory_mib: float | None  # None where NVML cannot tell (e.g. some containers)


@dataclass(frozen=True)
class Sample:
    """One reading of the GPU. A quantity NVML does not report on this GPU is None."""

    time_s: float  # since the monitor started
    sm_clock_mhz: float | None
    memory_clock_mhz: float | None
    power_w: float | None
    temperature_c: float | None
    memory_used_mib: float | None
    clock_event_reasons: int  # bitmask of CLOCK_EVENT_REASONS
    other_processes: tuple[GpuProcess, ...] = ()


def reason_names(mask: int) -> list[str]:
    """The names of the clock-event reasons set in `mask`."""
    return [name for name, (bit, _) in CLOCK_EVENT_REASONS.items() if mask & bit]


def unavailable(reason: str) -> dict:
    """The summary of a run NVML could not watch."""
    return {"available": False, "reason": f"unavailable: {reason}"}


def summarize(samples: list[Sample], device: dict | None = None, interval_s: float | None = None) -> dict:
    """min / median / max of each quantity, the reasons seen (in how many samples), and the flags."""
    if not samples:
        return unavailable("no samples were taken")
    summary: dict = {"available": True, "samples": len(samples), "duration_s": round(samples[-1].time_s, 3)}
    if interval_s is not None:
        summary["interval_s"] = interval_s
    if device:
        summary["device"] = device
    for quantity in MEASURED:
        values = [v for s in samples if (v := getattr(s, quantity)) is not None]
        if values:
            summary[quantity] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    reasons = {
        name: sum(1 for s in samples if s.clock_event_reasons & bit) for name, (bit, _) in CLOCK_EVENT_REASONS.items()
    }
    summary["clock_event_reasons"] = {name: count for name, count in reasons.items() if count}
    summary["throttle_reasons"] = [name for name in summary["clock_event_reasons"] if CLOCK_EVENT_REASONS[name][1]]
    summary["throttled"] = bool(summary["throttle_reasons"])
    others = {p.pid: p for s in samples for p in s.other_processes}
    summary["other_processes"] = [asdict(p) for p in sorted(others.values(), key=lambda p: p.pid)]
    summary["gpu_shared"] = bool(others)
    return summary


def annotate(result: dict, summary: dict) -> dict:
    """Adds `summary` as result["nvml"] and, where NVML was available, the flags to every row.

    A summary the suite wrote itself (its own sampler, over its timed part only) is kept inside
    the new one as "suite_sampler"."""
    own = result.get("nvml")
    result["nvml"] = summary | ({"suite_sampler": own} if own is not None and own != summary else {})
    if summary.get("available"):
        for row in result.get("rows", []):
            row["throttled"] = summary["throttled"]
            row["gpu_shared"] = summary["gpu_shared"]
    return result


class SampleSource(Protocol):
    def device(self) -> dict: ...
    def read(self, time_s: float) -> Sample: ...
    def close(self) -> None: ...


def _is_own_process(pid: int, own: int) -> bool:
    """Whether `pid` is `own` or one of its descendants (walks the parent chain in /proc)."""
    while pid > 1:
        if pid == own:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4: ppid (after "pid (comm) state")
        except (OSError, IndexError, ValueError):
            return False
    return False


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200] or "?"
    except OSError:
        return "(not visible from this PID namespace)"


class NvmlSource:
    """Reads GPU `index` in NVML's numbering (PCI order: on a one-GPU machine, the GPU the suites use).
    Raises RuntimeError saying why if NVML cannot be used here."""

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError as err:
            raise RuntimeError(f"nvidia-ml-py is not installed ({err})") from err
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise RuntimeError(f"NVML did not initialise: {err}") from err
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as err:
            pynvml.nvmlShutdown()
            raise RuntimeError(f"no GPU {index} through NVML: {err}") from err
        self._index = index
        self._own_pid = os.getpid()

    def _get(self, fn, *args):
        """fn(handle, *args), or None where this GPU or driver does not report it."""
        try:
            return fn(self._handle, *args)
        except self._nvml.NVMLError:
            return None

    def device(self) -> dict:
        nvml = self._nvml
        power_limit = self._get(nvml.nvmlDeviceGetEnforcedPowerLimit)
        return {
            "index": self._index,
            "name": self._get(nvml.nvmlDeviceGetName),
            "max_sm_clock_mhz": self._get(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_SM),
            "max_memory_clock_mhz": self._get(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_MEM),
            "power_limit_w": None if power_limit is None else power_limit / 1000,
        }

    def _reasons(self) -> int:
        nvml = self._nvml
        read = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        return self._get(read) or 0

    def _other_processes(self) -> tuple[GpuProcess, ...]:
        nvml = self._nvml
        found = {}
        for list_fn in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in self._get(list_fn) or []:
                if not _is_own_process(proc.pid, self._own_pid):
                    used = proc.usedGpuMemory
                    found[proc.pid] = GpuProcess(
                        proc.pid, _process_name(proc.pid), None if used is None else used / 2**20
                    )
        return tuple(found.values())

    def read(self, time_s: float) -> Sample:
        nvml = self._nvml
        power_mw = self._get(nvml.nvmlDeviceGetPowerUsage)
        memory = self._get(nvml.nvmlDeviceGetMemoryInfo)
        return Sample(
            time_s=time_s,
            sm_clock_mhz=self._get(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
            memory_clock_mhz=self._get(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
            power_w=None if power_mw is None else power_mw / 1000,
            temperature_c=self._get(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
            memory_used_mib=None if memory is None else memory.used / 2**20,
            clock_event_reasons=self._reasons(),
            other_processes=self._other_processes(),
        )

    def report(self) -> dict:
        """Driver, CUDA driver version, the device, its clocks (now, max, application), power, state."""
        nvml = self._nvml
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        sample = self.read(0.0)
        persistence = self._get(nvml.nvmlDeviceGetPersistenceMode)
        return {
            "available": True,
            "driver_version": nvml.nvmlSystemGetDriverVersion(),
            "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}",
            **self.device(),
            "sm_clock_mhz": sample.sm_clock_mhz,
            "memory_clock_mhz": sample.memory_clock_mhz,
            "applications_sm_clock_mhz": self._get(nvml.nvmlDeviceGetApplicationsClock, nvml.NVML_CLOCK_SM),
            "applications_memory_clock_mhz": self._get(nvml.nvmlDeviceGetApplicationsClock, nvml.NVML_CLOCK_MEM),
            "power_w": sample.power_w,
            "temperature_c": sample.temperature_c,
            "memory_used_mib": sample.memory_used_mib,
            "clock_event_reasons": reason_names(sample.clock_event_reasons),
            "persistence_mode": None if persistence is None else bool(persistence),
            "other_processes": [asdict(p) for p in sample.other_processes],
        }

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class GpuMonitor:
    """Samples a GPU on a background thread between __enter__ and __exit__; then `summary()`.

        with GpuMonitor() as monitor:
            run_benchmark()
        annotate(result, monitor.summary())

    `source` defaults to NVML on GPU `device_index`; if NVML cannot be used the monitor records why.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.1, source: SampleSource | None = None):
        self.device_index = device_index
        self.interval_s = interval_s
        self.source = source
        self.samples: list[Sample] = []
        self.unavailable_reason: str | None = None
        self._device: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> GpuMonitor:
        if self.source is None:
            try:
                self.source = NvmlSource(self.device_index)
            except RuntimeError as err:
                self.unavailable_reason = str(err)
                return self
        self._device = self.source.device()
        self._start = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="neoxfuse-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.samples.append(self.source.read(time.monotonic() - self._start))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        self.source.close()

    def summary(self) -> dict:
        if self.unavailable_reason is not None:
            return unavailable(self.unavailable_reason)
        return summarize(self.samples, self._device, self.interval_s)


def device_report(index: int = 0) -> dict:
    """NVML's view of GPU `index` for the environment report, or why there is none."""
    try:
        source = NvmlSource(index)
    except RuntimeError as err:
        return unavailable(str(err))
    try:
        return source.report()
    finally:
        source.close()
