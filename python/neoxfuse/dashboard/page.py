"""The dashboard page: every results file (DESIGN.md §6) drawn into one self-contained HTML file.

Sections, in order:
  decode      TPOT vs context length, one line per backend, the memory floor dashed
              (latest run per device, one plot per model), and its table; sampled runs
              (suite decode_sampled) likewise in their own section
  floor       % of the memory floor reached by neoxfuse's own kernels over commits: per run,
              the median over its rows of floor_time / measured_time (decode: floor_ms /
              tpot_ms, layer: floor_us / median_us) or GBps / the run's copy GBps (kernel
              suites); 100 % means the kernel runs at the speed of memory
  suites      the other suites likewise: a plot per facet and the kernel table (sample: the
              time to draw a token, no floor); a suite the dashboard does not know gets its table
  nvml        clocks, power, temperature, throttle reasons and other processes per run;
              runs that throttled or shared the GPU are flagged at the top
  ncu         Nsight Compute summary per kernel (duration, DRAM % of peak, occupancy, ...)
  sources     the files the page was drawn from
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path

from neoxfuse.bench.targets import bound, verdict
from neoxfuse.dashboard.svg import Series, bar_plot, line_plot, range_plot

OWN_PROVIDERS = frozenset({"fused", "neoxfuse"})  # the project's own backend / provider names


@dataclass(frozen=True)
class SuiteView:
    """How a known suite is drawn: `y` against `x`, a line per `series` value, a plot per `facets`."""

    title: str
    x: str
    y: str
    series: str
    facets: tuple[str, ...]
    x_label: str
    y_label: str
    floor: str | None = None  # row field holding the memory floor in y's unit (time)
    copy_ceiling: bool = False  # y is GB/s: the run's measured copy bandwidth is its ceiling

    def floor_fraction(self, row: dict, device: dict) -> float | None:
        """floor / time for timed suites, GB/s / copy GB/s for bandwidth suites; None if unknown."""
        y = _num(row.get(self.y))
        if not y:
            return None
        if self.floor:
            floor = _num(row.get(self.floor))
            return floor / y if floor else None
        copy = _num(device.get("copy_GBps"))
        return y / copy if self.copy_ceiling and copy else None


_DECODE = SuiteView(
    "Decode: time per output token vs context length", x="context", y="tpot_ms", series="backend",
    facets=("model",), x_label="context length (tokens)", y_label="TPOT (ms)", floor="floor_ms",
)
VIEWS = {
    "decode": _DECODE,
    "decode_sampled": replace(_DECODE, title="Decode, sampled (bench decode --temperature): time per output token vs context length"),
    "layer": SuiteView(
        "One decoder layer", x="seq_len", y="median_us", series="provider", facets=("model", "layer", "dtype"),
        x_label="sequence length (tokens)", y_label="median (µs)", floor="floor_us",
    ),
    "ln_residual": SuiteView(
        "Residual add + LayerNorm", x="tokens", y="GBps", series="provider", facets=("hidden", "dtype", "variant"),
        x_label="tokens", y_label="GB/s", copy_ceiling=True,
    ),
    "sample": SuiteView(
        "Sampling a token from the logits (temperature, top-k, top-p)", x="vocab", y="median_us", series="provider",
        facets=("rule",), x_label="vocabulary (logits)", y_label="median (µs)",
    ),
    "gptq_ln_qkv": SuiteView(
        "LayerNorm + GPTQ int4 dequant + QKV", x="tokens", y="GBps", series="provider", facets=("K", "N", "group_size"),
        x_label="tokens", y_label="GB/s", copy_ceiling=True,
    ),
}  # fmt: skip


@dataclass
class Run:
    """One results file."""

    path: Path
    data: dict

    @property
    def suite(self) -> str:
        return self.data["suite"]

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    @property
    def device(self) -> dict:
        return self.data.get("device") or {}

    @property
    def device_name(self) -> str:
        return str(self.device.get("name", "unknown device"))

    @property
    def commit(self) -> str:
        return str(self.data.get("commit", "unknown"))

    @property
    def created(self) -> str:
        return str(self.data.get("created", ""))

    @property
    def label(self) -> str:
        return f"{self.suite} @ {self.commit[:8]} {self.created[:16]}"


def load_results(paths: Iterable[Path]) -> tuple[list[Run], list[str]]:
    """The runs in `paths` (results files, or folders of them), oldest first, and what was unreadable."""
    runs: dict[tuple, Run] = {}
    problems = []
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{path}: not readable JSON ({err})")
            continue
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("suite"), str)
            or not isinstance(data.get("rows"), list)
        ):
            problems.append(f"{path}: not a results file (needs 'suite' and 'rows')")
            continue
        run = Run(path, data)
        runs.setdefault((run.suite, run.commit, run.created, run.device_name), run)  # the same run twice: once
    return sorted(runs.values(), key=lambda r: r.created), problems


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _slug(*parts) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(map(str, parts)).lower()).strip("-")


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return escape(json.dumps(value, separators=(", ", ": ")))
    return escape(str(value))


def _table(columns: list[str], rows: list[dict], flagged=lambda row: False) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr{' class=flagged' if flagged(row) else ''}>"
        + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _latest_per_device(runs: list[Run]) -> list[Run]:
    latest: dict[str, Run] = {}
    for run in runs:  # oldest first: later runs replace earlier ones
        latest[run.device_name] = run
    return list(latest.values())


def _row_flagged(row: dict) -> bool:
    return bool(row.get("throttled") or row.get("gpu_shared"))


def _suite_plots(view: SuiteView, run: Run) -> list[str]:
    """One line plot per facet of the run's rows."""
    facets: dict[tuple, list[dict]] = defaultdict(list)
    for row in run.rows:
        if _num(row.get(view.x)) is not None and _num(row.get(view.y)) is not None:
            facets[tuple(row.get(f) for f in view.facets)].append(row)
    plots = []
    for facet, rows in facets.items():
        by_series: dict[str, Series] = {}
        for row in rows:
            name = str(row.get(view.series, "?"))
            fraction = view.floor_fraction(row, run.device)
            tip = f"{name}: {view.x}={row[view.x]}, {view.y}={row[view.y]:.4g}" + (
                f", {100 * fraction:.1f}% of floor" if fraction else ""
            )
            by_series.setdefault(name, Series(name)).points.append((row[view.x], row[view.y], tip))
        series = list(by_series.values())
        if view.floor:
            floors = {row[view.x]: row[view.floor] for row in rows if _num(row.get(view.floor)) is not None}
            series.append(Series("memory floor", [(x, y, "") for x, y in floors.items()], reference=True))
        copy = _num(run.device.get("copy_GBps"))
        if view.copy_ceiling and copy:
            xs = [row[view.x] for row in rows]
            series.append(Series("copy bandwidth", [(min(xs), copy, ""), (max(xs), copy, "")], reference=True))
        label = ", ".join(f"{f}={v}" for f, v in zip(view.facets, facet, strict=True) if v is not None)
        plots.append(
            line_plot(
                _slug(run.suite, run.device_name, *facet),
                f"{label} · {run.device_name}" if label else run.device_name,
                series,
                x_label=view.x_label,
                y_label=view.y_label,
                log_x=True,
            )
        )
    return plots


def _suite_section(suite: str, runs: list[Run]) -> str:
    view = VIEWS.get(suite)
    parts = [f'<section id="suite-{_slug(suite)}"><h2>{escape(view.title if view else suite)}</h2>']
    if view is None:
        parts.append(f"<p>Suite <code>{escape(suite)}</code> has no plot layout here yet; its latest rows:</p>")
    for run in _latest_per_device(runs):
        parts.append(f"<h3>{escape(run.device_name)} · {escape(run.label)}</h3>")
        if view is not None:
            parts.append('<div class="plots">' + "".join(_suite_plots(view, run)) + "</div>")
            rows = [
                row | {"% of floor": 100 * f if (f := view.floor_fraction(row, run.device)) else None}
                for row in run.rows
            ]
        else:
            rows = run.rows
        parts.append(_table(_columns(rows), rows, _row_flagged))
    parts.append("</section>")
    return "".join(parts)


def _targets_section(runs: list[Run]) -> str:
    """The issues' targets as the latest run of each suite on each device checked them (neoxfuse.bench.targets);
    a target not met is flagged."""
    rows = []
    for suite in dict.fromkeys(run.suite for run in runs):
        for run in _latest_per_device([r for r in runs if r.suite == suite and r.data.get("targets")]):
            rows += [
                {"suite": suite, "device": run.device_name, "commit": run.commit, "target": t["target"], "shape": t["shape"],
                 "value": t["value"], "bound": bound(t), "verdict": verdict(t)}
                for t in run.data["targets"]
            ]  # fmt: skip
    heading = '<section id="targets"><h2>Targets</h2>'
    if not rows:
        return heading + '<p class="note">No run has checked the issues\' targets yet.</p></section>'
    return heading + _table(_columns(rows), rows, lambda row: row["verdict"] == "NOT met") + "</section>"


def _floor_history(runs: list[Run]) -> str:
    """% of the floor reached by the own kernels, one point per run, x = commits oldest first."""
    positions: dict[str, int] = {}
    series: dict[str, Series] = {}
    for run in runs:
        view = VIEWS.get(run.suite)
        if view is None:
            continue
        fractions = [
            f
            for row in run.rows
            if row.get(view.series) in OWN_PROVIDERS and (f := view.floor_fraction(row, run.device))
        ]
        if not fractions:
            continue
        key = run.commit if run.commit != "unknown" else f"unknown {run.created[:16]}"
        x = positions.setdefault(key, len(positions))
        median = 100 * statistics.median(fractions)
        tip = (
            f"{run.suite} on {run.device_name} @ {key}: median {median:.1f}% of floor over {len(fractions)} rows "
            f"(min {100 * min(fractions):.1f}%, max {100 * max(fractions):.1f}%)"
        )
        name = f"{run.suite} · {run.device_name}"
        series.setdefault(name, Series(name)).points.append((x, median, tip))
    intro = (
        "<p>Per run, the median over the rows of neoxfuse's own kernels of floor time / measured time "
        "(bandwidth suites: GB/s / the copy GB/s measured in the same run). 100 % is the speed of memory.</p>"
    )
    heading = '<section id="floor"><h2>% of the memory floor over commits</h2>' + intro
    if not series:
        return heading + '<p class="note">No run has rows of neoxfuse kernels with a floor yet.</p></section>'
    lines = list(series.values())
    lines.append(Series("the floor", [(0, 100.0, ""), (len(positions) - 1, 100.0, "")], reference=True))
    plot = line_plot(
        "floor-over-commits",
        "% of the memory floor reached, per commit",
        lines,
        x_label="commit (oldest → newest)",
        y_label="% of floor",
        x_names={x: key[:8] if not key.startswith("unknown") else key[8:18] for key, x in positions.items()},
    )
    return f'{heading}<div class="plots">{plot}</div></section>'


def _nvml_section(runs: list[Run]) -> str:
    rows, ranges = [], []
    for run in reversed(runs):
        nvml = run.data.get("nvml")
        row = {"run": run.label, "device": run.device_name}
        if not isinstance(nvml, dict):
            rows.append(row | {"NVML": "not recorded"})
            continue
        if not nvml.get("available"):
            rows.append(row | {"NVML": nvml.get("reason", "unavailable")})
            continue
        stats = {
            q: nvml.get(q) or {}
            for q in ("sm_clock_mhz", "memory_clock_mhz", "power_w", "temperature_c", "memory_used_mib")
        }
        rows.append(
            row
            | {
                "NVML": f"{nvml.get('samples')} samples over {nvml.get('duration_s')} s",
                "SM clock MHz (min / median / max)": " / ".join(
                    _cell(stats["sm_clock_mhz"].get(k)) for k in ("min", "median", "max")
                ),
                "memory clock MHz": " / ".join(
                    _cell(stats["memory_clock_mhz"].get(k)) for k in ("min", "median", "max")
                ),
                "power W (max)": stats["power_w"].get("max"),
                "temperature °C (max)": stats["temperature_c"].get("max"),
                "memory used MiB (max)": stats["memory_used_mib"].get("max"),
                "clock events (samples)": nvml.get("clock_event_reasons"),
                "throttled": nvml.get("throttled"),
                "gpu_shared": nvml.get("gpu_shared"),
                "other processes": [f"{p.get('pid')} {p.get('name')}" for p in nvml.get("other_processes", [])] or None,
            }
        )
        sm = stats["sm_clock_mhz"]
        if {"min", "median", "max"} <= sm.keys():
            tip = (
                f"{run.label} on {run.device_name}: SM clock {sm['min']:.0f} / {sm['median']:.0f} / {sm['max']:.0f} MHz"
            )
            ranges.append((run.label, sm["min"], sm["median"], sm["max"], tip))
    plot = (
        '<div class="plots">'
        + range_plot("nvml-sm-clock", "SM clock during each run (NVML)", ranges, x_label="MHz")
        + "</div>"
        if ranges
        else '<p class="note">No run has NVML samples (runs on machines without NVML say why in the table).</p>'
    )
    table = _table(_columns(rows), rows, _row_flagged) if rows else ""
    return f'<section id="nvml"><h2>GPU state during the runs (NVML)</h2>{plot}{table}</section>'


def short_kernel_name(demangled: str) -> str:
    """'void neoxfuse::(anonymous namespace)::copy_kernel<4>(uint4*, ...)' -> 'copy_kernel<4>'."""
    name = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    name = name.removeprefix("void ").strip()
    return name.removeprefix("neoxfuse::")


def _ncu_section(runs: list[Run]) -> str:
    latest: dict[tuple, Run] = {}
    for run in runs:
        if isinstance(run.data.get("ncu"), dict):
            latest[(run.suite, run.device_name)] = run
    if not latest:
        return '<section id="ncu"><h2>Nsight Compute</h2><p class="note">No run has an Nsight Compute summary yet.</p></section>'
    parts = ['<section id="ncu"><h2>Nsight Compute</h2>']
    for (suite, device), run in sorted(latest.items()):
        ncu = run.data["ncu"]
        parts.append(f"<h3>{escape(suite)} · {escape(device)} · {escape(run.label)}</h3>")
        kernels = ncu.get("kernels") or []
        if not kernels:
            parts.append(f'<p class="note">{escape(str(ncu.get("reason", "no kernel was profiled")))}</p>')
            continue
        names = [short_kernel_name(k.get("kernel", "?")) for k in kernels]
        quantities = (
            ("DRAM throughput % of peak", "dram_throughput_pct"),
            ("achieved occupancy %", "achieved_occupancy_pct"),
        )
        series = [
            (
                label,
                [_num(k.get(key)) for k in kernels],
                [f"{n}: {label} {_cell(k.get(key))}" for n, k in zip(names, kernels, strict=True)],
            )
            for label, key in quantities
        ]
        parts.append(
            '<div class="plots">'
            + bar_plot(
                _slug("ncu", suite, device),
                f"{suite} kernels · {device}",
                names,
                series,
                x_label="% of peak",
                x_max=100,
            )
            + "</div>"
        )
        meta = {k: ncu[k] for k in ("tool", "sections", "clock_control", "report") if k in ncu}
        parts.append(f"<p class=note>{_cell(meta)}</p>")
        parts.append(_table(_columns(kernels), kernels))
    parts.append("</section>")
    return "".join(parts)


def _warnings(runs: list[Run], problems: list[str]) -> str:
    items = [escape(p) for p in problems]
    for run in runs:
        nvml = run.data.get("nvml") or {}
        if nvml.get("throttled"):
            items.append(
                f"{escape(run.label)} on {escape(run.device_name)} throttled: {escape(', '.join(nvml.get('throttle_reasons', [])))}"
            )
        if nvml.get("gpu_shared"):
            items.append(f"{escape(run.label)} on {escape(run.device_name)} shared the GPU with other processes")
        if run.data.get("complete") is False:
            items.append(f"{escape(run.label)} on {escape(run.device_name)} was stopped part-way: its rows are the runs it finished")
    synthetic = [run for run in runs if run.data.get("synthetic")]
    banner = (
        f'<p class="synthetic">{len(synthetic)} of these files are SYNTHETIC samples (for testing the page), not measurements.</p>'
        if synthetic
        else ""
    )
    listed = "<ul class=warnings>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else ""
    return banner + listed


def _sources(runs: list[Run]) -> str:
    rows = [
        {
            "file": run.path.name,
            "suite": run.suite,
            "device": run.device_name,
            "commit": run.commit,
            "created": run.created,
            "rows": len(run.rows),
        }
        | ({"synthetic": True} if run.data.get("synthetic") else {})
        for run in reversed(runs)
    ]
    return f'<section id="sources"><h2>Sources</h2>{_table(_columns(rows), rows)}</section>'


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #1a1a1a; }
h1 { font-size: 22px; } h2 { margin-top: 36px; border-bottom: 1px solid #ccc; } h3 { font-size: 15px; color: #444; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #e2e2e2; }
svg .title { font-size: 13px; font-weight: 600; } svg .tick, svg .legend { font-size: 11px; fill: #333; }
svg .axis { font-size: 12px; fill: #222; } svg .frame { fill: none; stroke: #999; } svg .grid { stroke: #eee; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; margin: 8px 0 16px; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.flagged td { background: #fff1e0; } .note { color: #555; } .synthetic { background: #fde8e8; padding: 8px; font-weight: 600; }
ul.warnings li { color: #8a3b00; }
"""


def render(runs: list[Run], problems: list[str], generated: str | None = None) -> str:
    """The whole page as one HTML string (inline CSS and SVG; no scripts, nothing fetched)."""
    generated = generated or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    by_suite: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_suite[run.suite].append(run)
    ordered = [s for s in VIEWS if s in by_suite] + sorted(s for s in by_suite if s not in VIEWS)
    body = [
        "<h1>neoxfuse benchmark dashboard</h1>",
        f"<p>{len(runs)} result files · suites: {escape(', '.join(ordered) or 'none')} · "
        f"devices: {escape(', '.join(sorted({r.device_name for r in runs})) or 'none')} · generated {escape(generated)}</p>",
        _warnings(runs, problems),
    ]
    if not runs:
        body.append('<p class="note">No results yet: run the GPU pipeline (ci/gpu_pipeline) to make some.</p>')
    body += [_targets_section(runs), _floor_history(runs)]
    body += [_suite_section(suite, by_suite[suite]) for suite in ordered]
    body += [_nvml_section(runs), _ncu_section(runs), _sources(runs)]
    html = "\n".join(body)
    plots = html.count('<svg class="plot"')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,"><title>neoxfuse dashboard</title>'
        f'<style>{STYLE}</style></head>\n<body data-plots="{plots}">\n{html}\n</body></html>\n'
    )


def build(paths: Iterable[Path], out: Path) -> Path:
    """Renders the runs found in `paths` into the HTML file `out` (folders made as needed)."""
    runs, problems = load_results(paths)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs, problems))
    return out
