"""Nsight Compute (ncu): profile the project's kernels once each and summarise every kernel.

`profile_command` wraps a program in ncu so that the first launch of each neoxfuse kernel (the
project's kernels all live in namespace neoxfuse, so their mangled names start with
`_ZN8neoxfuse`) is profiled with a fixed set of sections, and the report is kept as a
.ncu-rep file. `read_report` turns a report into one summary per kernel:

    duration_us                 gpu__time_duration.sum
    dram_throughput_pct         DRAM throughput as % of its peak (SpeedOfLight)
    dram_GBps                   DRAM bytes / s (MemoryWorkloadAnalysis)
    achieved_occupancy_pct      sm__warps_active as % of the peak (Occupancy)
    registers_per_thread, shared_memory_static_bytes, shared_memory_dynamic_bytes,
    grid_size, block_size       (LaunchStats)
"""

from __future__ import annotations

import csv
import glob
import io
import re
import shutil
import subprocess

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats")
KERNEL_FILTER = "^_ZN8neoxfuse"  # mangled names of functions in namespace neoxfuse
INVOCATION = 1  # profile each matching kernel's first launch
CLOCK_CONTROL = "none"  # kernels run at the clocks the benchmarks saw, not locked to base clocks

# Output lines that mean this machine does not let ncu read the GPU's performance counters.
_NO_COUNTERS = re.compile(r"ERR_NVGPUCTRPERM|Failed to initialize the profiler|profiling is not supported", re.I)

_TIME_TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
_BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KiB": 2**10, "MiB": 2**20}
_RATE_TO_GBPS = {
    "byte/second": 1e-9,
    "Kbyte/second": 1e-6,
    "Mbyte/second": 1e-3,
    "Gbyte/second": 1.0,
    "Tbyte/second": 1e3,
}
_PERCENT = {"%": 1.0}
_COUNT = {"": 1, "register/thread": 1, "block": 1, "thread": 1}

# summary field: (metric names, first found wins; unit conversion table)
SUMMARY_METRICS = {
    "grid_size": (("launch__grid_size",), _COUNT),
    "block_size": (("launch__block_size",), _COUNT),
    "duration_us": (("gpu__time_duration.sum",), _TIME_TO_US),
    "dram_throughput_pct": (
        (
            "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
            "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        ),
        _PERCENT,
    ),
    "dram_GBps": (("dram__bytes.sum.per_second",), _RATE_TO_GBPS),
    "achieved_occupancy_pct": (("sm__warps_active.avg.pct_of_peak_sustained_active",), _PERCENT),
    "registers_per_thread": (("launch__registers_per_thread",), _COUNT),
    "shared_memory_static_bytes": (("launch__shared_mem_per_block_static",), _BYTES),
    "shared_memory_dynamic_bytes": (("launch__shared_mem_per_block_dynamic",), _BYTES),
}


class ProfileError(RuntimeError):
    """ncu failed, or its report could not be read."""


def find_program(name: str, *patterns: str) -> str | None:
    """`name` on PATH, else the newest (by the version numbers in its path) file matching one of
    the glob `patterns`; None if there is none."""
    found = shutil.which(name)
    if found:
        return found
    installed = sorted((path for pattern in patterns for path in glob.glob(pattern)), key=_version_key)
    return installed[-1] if installed else None


def find_ncu() -> str | None:
    """ncu on PATH, else the newest /opt/nvidia/nsight-compute/*/ncu; None if neither exists."""
    return find_program("ncu", "/opt/nvidia/nsight-compute/*/ncu")


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def ncu_version(ncu: str) -> str:
    """e.g. '2025.3.1.0' (from `ncu --version`)."""
    out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"Version\s+(\S+)", out)
    return match.group(1) if match else out.strip()


def profile_command(ncu: str, report_base: str, program: list[str]) -> list[str]:
    """The command that runs `program` under ncu and writes report_base + '.ncu-rep'."""
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    return [
        ncu,
        "--target-processes", "all",
        "--kernel-name-base", "mangled",
        "--kernel-id", f"::regex:{KERNEL_FILTER}:{INVOCATION}",
        *sections,
        "--clock-control", CLOCK_CONTROL,
        "--export", report_base,
        "--force-overwrite",
        *program,
    ]  # fmt: skip


def counters_unavailable(output: str) -> str | None:
    """The ncu message saying this machine forbids reading performance counters, if there is one."""
    for line in output.splitlines():
        if _NO_COUNTERS.search(line):
            return line.strip()
    return None


def read_report(ncu: str, report: str) -> list[dict]:
    """One summary per profiled kernel of the .ncu-rep file `report` (see the module docstring)."""
    done = subprocess.run(
        [
            ncu,
            "--import",
            report,
            "--csv",
            "--page",
            "raw",
            "--print-units",
            "base",
            "--print-kernel-base",
            "demangled",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise ProfileError(f"ncu --import {report} failed: {done.stderr.strip() or done.stdout.strip()}")
    return summarize_raw_csv(done.stdout)


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    if not text or text.lower() == "n/a":
        return None
    try:
        return float(text)
    except ValueError as err:
        raise ProfileError(f"not a number in ncu's output: {text!r}") from err


def summarize_raw_csv(text: str) -> list[dict]:
    """Summaries from `ncu --import R --csv --page raw --print-units base`: a header row of metric
    names, a row of their units (empty ID), then one row per profiled launch. The first launch
    of each kernel is kept."""
    start = text.find('"ID"')
    table = list(csv.reader(io.StringIO(text[max(start, 0) :])))
    if not table or not {"ID", "Kernel Name"} <= set(table[0]):
        raise ProfileError("ncu's raw CSV has no 'ID' and 'Kernel Name' columns")
    header, launches = table[0], [row for row in table[1:] if len(row) == len(table[0])]
    column = {name: i for i, name in enumerate(header)}
    units = [""] * len(header)
    if launches and not launches[0][column["ID"]].strip():
        units, launches = launches[0], launches[1:]
    summaries: dict[str, dict] = {}
    for row in launches:
        kernel = row[column["Kernel Name"]]
        if kernel in summaries:
            continue
        summary: dict = {"kernel": kernel}
        for field, (metrics, scale) in SUMMARY_METRICS.items():
            metric = next((m for m in metrics if m in column), None)
            if metric is None:
                continue
            unit = units[column[metric]].strip()
            if unit not in scale:
                raise ProfileError(f"unexpected unit {unit!r} for {metric} in ncu's output")
            value = _number(row[column[metric]])
            summary[field] = None if value is None else value * scale[unit]
        summaries[kernel] = summary
    return list(summaries.values())
