"""What every benchmark suite shares: timing with percentiles, the device record and the results
file of DESIGN.md §6, written once or as the run goes (the issues' targets: bench/targets.py); and
what the kernel suites (gptq-ln-qkv, ln-residual: one function per shape, timed per provider)
share: the loop over shapes, buffer sets beyond L2, bandwidth fields, speedups over the peers and
their table. GPU monitoring (clocks, power, throttling) is neoxfuse.monitor's.

    timing = time_cuda(lambda: op(next_buffers()), warmup=10, runs=100)   # Timing in microseconds
    with GpuMonitor() as monitor: ...                                       # neoxfuse.monitor
    write_results("decode", rows, device=device_record(copy_bandwidth()), extra={"nvml": monitor.summary()})
    results = ResultsFile("decode", device, out_dir)      # or saved as the run goes:
    results.save(rows_so_far, extra, complete=False)        # after each part, then complete=True at the end
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from neoxfuse.checks import require_cuda
from neoxfuse.device import CopyBandwidth, devices
from neoxfuse.errors import InvalidInputError
from neoxfuse.progress import progress_bar

DEVICE_FIELDS = ("name", "sm", "copy_GBps")


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `samples`, interpolating linearly between the two nearest ranks:
    with s sorted and r = q/100 * (n-1), it is s[floor(r)] + (r - floor(r)) * (s[floor(r)+1] - s[floor(r)])."""
    if not samples:
        raise InvalidInputError("percentile of no samples")
    if not 0 <= q <= 100:
        raise InvalidInputError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(samples)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings, in microseconds. median_us == p50_us."""

    median_us: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    mean_us: float
    runs: int

    @classmethod
    def from_samples(cls, samples_us: Sequence[float]) -> Timing:
        median = percentile(samples_us, 50)
        return cls(
            median_us=median,
            p50_us=median,
            p90_us=percentile(samples_us, 90),
            p95_us=percentile(samples_us, 95),
            p99_us=percentile(samples_us, 99),
            mean_us=statistics.fmean(samples_us),
            runs=len(samples_us),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def time_cuda(fn: Callable[[], object], *, warmup: int = 10, runs: int = 100) -> Timing:
    """Times `fn()` on the current CUDA stream: `warmup` untimed calls, then `runs` calls each between
    two CUDA events. All events are read after one synchronize, so timing adds no host waits.

    To keep L2 from flattering small ops, `fn` should rotate through buffers larger than L2 in total.
    """
    require_cuda()
    if warmup < 0 or runs < 1:
        raise InvalidInputError(f"time_cuda needs warmup >= 0 and runs >= 1, got {warmup} and {runs}")
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return Timing.from_samples([start.elapsed_time(end) * 1e3 for start, end in events])


def time_graph(step: Callable[[int], object], calls: int, *, runs: int = 100, warmup: int = 3) -> Timing:
    """Per-call time of step(0), ..., step(calls-1) captured in one CUDA graph: replay time / calls.

    Each step runs once outside the graph first, on a side stream (lazy inits, cuBLAS heuristics,
    torch.compile), then all `calls` are captured in one graph whose replays time_cuda times. What a
    step returns is held until capture ends, so every call writes its own output memory. Steps that
    rotate through buffers larger than L2 keep the cache from flattering small ops.
    """
    require_cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    outputs = []
    with torch.cuda.graph(graph):
        for i in range(calls):
            outputs.append(step(i))
    per_replay = time_cuda(graph.replay, warmup=warmup, runs=runs)
    return Timing(**{k: v / calls if k.endswith("_us") else v for k, v in per_replay.as_dict().items()})


def device_record(copy: CopyBandwidth | None) -> dict:
    """The `device` entry of a results file: {name, sm, copy_GBps} of the current CUDA device and the
    copy bandwidth measured in this run. With `copy` None (a CPU run, no probe) sm and copy_GBps are None."""
    if copy is None:
        return {"name": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "sm": None, "copy_GBps": None}
    info = devices()[torch.cuda.current_device()]
    return {"name": info.name, "sm": info.sm, "copy_GBps": round(copy.GBps, 1)}


def git_commit() -> str:
    """The commit being measured: $NEOXFUSE_COMMIT (set where there is no git), else `git rev-parse HEAD`
    in the working directory, else "unknown"."""
    if os.environ.get("NEOXFUSE_COMMIT"):
        return os.environ["NEOXFUSE_COMMIT"]
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else "unknown"


def write_results(
    suite: str,
    rows: list[dict],
    *,
    device: dict,
    out_dir: str | os.PathLike = "bench/results",
    extra: dict | None = None,
    path: Path | None = None,
) -> Path:
    """Writes one run as JSON (DESIGN.md §6): {suite, commit, created, device {name, sm, copy_GBps}, rows, **extra}.

    The file is out_dir/<suite>-<UTC time>-<device>.json; returns its path. `path`: a path this function
    returned earlier for the same run, rewritten with what the run has measured since (a suite that saves
    as it goes keeps its finished part when it is stopped).
    """
    if not suite or not isinstance(suite, str):
        raise InvalidInputError(f"suite must be a non-empty string, got {suite!r}")
    missing = [key for key in DEVICE_FIELDS if key not in device]
    if missing:
        raise InvalidInputError(f"device must hold {', '.join(DEVICE_FIELDS)}; missing {', '.join(missing)}")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise InvalidInputError("rows must be a list of dicts")
    clashes = sorted({"suite", "commit", "created", "device", "rows"} & set(extra or {}))
    if clashes:
        raise InvalidInputError(f"extra must not redefine {', '.join(clashes)}")
    created = datetime.now(timezone.utc)
    record = {
        "suite": suite,
        "commit": git_commit(),
        "created": created.isoformat(timespec="seconds"),
        "device": device,
        **(extra or {}),
        "rows": rows,
    }
    if path is not None:
        _replace_file(path, json.dumps(record, indent=2) + "\n")
        return path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device_slug = re.sub(r"[^a-z0-9]+", "-", str(device["name"]).lower()).strip("-")
    stem = f"{suite}-{created.strftime('%Y%m%dT%H%M%SZ')}-{device_slug}"
    path = out / f"{stem}.json"
    attempt = 1
    while path.exists():
        attempt += 1
        path = out / f"{stem}-{attempt}.json"
    _replace_file(path, json.dumps(record, indent=2) + "\n")
    return path


def _replace_file(path: Path, text: str) -> None:
    """Writes `text` to path.partial, then renames that over `path`: a process killed while writing (a
    pipeline's --budget sends SIGKILL) leaves the earlier file whole, never half of the new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class ResultsFile:
    """One run's results file, saved as the run goes: save() after each finished part rewrites the file
    with the rows measured so far ("complete": false), so a run stopped part-way (a pipeline's --budget, ^C)
    keeps them; the last save, complete=True, leaves the whole run."""

    def __init__(self, suite: str, device: dict, out_dir: str | os.PathLike):
        self.suite, self.device, self.out_dir = suite, device, out_dir
        self.path: Path | None = None

    def save(self, rows: list[dict], extra: dict, *, complete: bool) -> Path:
        self.path = write_results(self.suite, rows, device=self.device, out_dir=self.out_dir,
                                  extra=extra | {"complete": complete}, path=self.path)
        return self.path


def providers_arg(known: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of `known`."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names or any(name not in known for name in names):
            raise argparse.ArgumentTypeError(f"providers are {', '.join(known)}; got {text!r}")
        return names

    return parse


# ---------------------------------------------------------------------------------------------
# Kernel suites: every provider computes the same function per shape, its calls captured in one
# CUDA graph that rotates through buffer sets larger than L2 (time_graph).

OWN = "neoxfuse"  # the provider the peers are compared with


def buffer_set_count(bytes_per_call: int, l2_bytes: int, most: int) -> int:
    """Buffer sets so that one graph replay reads more than twice the L2 cache: ceil(2 L2 / bytes_per_call),
    at least 2 and at most `most` (tiny calls may then fit in L2, which bandwidth_fields records)."""
    return max(2, min(most, math.ceil(2 * l2_bytes / bytes_per_call)))


def bandwidth_fields(timing: Timing, bytes_moved: int, sets: int, copy_GBps: float, l2_bytes: int) -> dict:
    """A kernel row's timing: median and P50/P90/P95/P99 us, GBps = bytes_moved / median, pct_copy = GBps / the
    copy rate, and whether the `sets` buffer sets together read more than twice the L2 (beyond_l2; if not,
    L2 may flatter the time)."""
    gbps = bytes_moved / (timing.median_us * 1e-6) / 1e9
    return {
        "median_us": timing.median_us,
        "p50_us": timing.p50_us,
        "p90_us": timing.p90_us,
        "p95_us": timing.p95_us,
        "p99_us": timing.p99_us,
        "GBps": gbps,
        "pct_copy": 100 * gbps / copy_GBps,
        "bytes": bytes_moved,
        "buffer_sets": sets,
        "beyond_l2": sets * bytes_moved > 2 * l2_bytes,
    }


def add_speedups(rows: list[dict], shape_of: Callable[[dict], str]) -> None:
    """To each neoxfuse row adds speedup_vs_<peer> = the peer's median / neoxfuse's, for every peer row of its shape."""
    for row in rows:
        if row["provider"] == OWN:
            for peer in rows:
                if peer["provider"] != OWN and shape_of(peer) == shape_of(row):
                    row[f"speedup_vs_{peer['provider']}"] = peer["median_us"] / row["median_us"]


def measure_shapes(suite: str, shapes: Sequence, measure: Callable[[Any], list[dict]], shape_of: Callable[[dict], str],
                   on_shape: Callable[[list[dict]], object]) -> list[dict]:
    """Every shape's rows, measure(shape), with the speedups over the peers (add_speedups); on_shape(the rows so
    far) after each shape, so that a suite saves as it goes (ResultsFile)."""
    rows: list[dict] = []
    with progress_bar(len(shapes), f"bench {suite}", unit="shape") as bar:
        for shape in shapes:
            bar.set_postfix_str(str(shape))
            rows += measure(shape)
            add_speedups(rows, shape_of)
            on_shape(rows)
            bar.update(1)
    return rows


def kernel_table(rows: list[dict], shape_of: Callable[[dict], str]) -> list[str]:
    """A kernel suite's rows as table lines, grouped by shape; a peer's line shows how much faster neoxfuse is."""
    width = max([len("shape"), *(len(shape_of(row)) for row in rows)])
    header = (f"{'shape':<{width}} {'provider':<14} {'median us':>10} {'p90 us':>8} {'p99 us':>8} {'GB/s':>8} {'% copy':>7} "
              f"{'rel err':>9} {'neoxfuse speedup':>16}")
    lines = [header, "-" * len(header)]
    by_shape: dict[str, list[dict]] = {}
    for row in rows:
        by_shape.setdefault(shape_of(row), []).append(row)
    for shape, group in by_shape.items():
        own = next((row for row in group if row["provider"] == OWN), None)
        for row in group:
            speedup = own.get(f"speedup_vs_{row['provider']}") if own and row is not own else None
            lines.append((
                f"{shape:<{width}} {row['provider']:<14} {row['median_us']:>10.2f} {row['p90_us']:>8.2f} {row['p99_us']:>8.2f} "
                f"{row['GBps']:>8.0f} {row['pct_copy']:>7.1f} {row['rel_err']:>9.2e} {'' if speedup is None else f'{speedup:.2f}':>16}"
                + ("" if row["beyond_l2"] else "  (buffers fit in L2)")
            ).rstrip())
    return lines
