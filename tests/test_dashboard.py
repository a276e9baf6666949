"""The dashboard: its plots hold the data they are given, the page holds every section, and headless
Chromium (Debian's `chromium`; CI installs it) loads the page drawn from the synthetic sample
results (tests/data/sample_results) without console errors and shows every plot with its marks."""

import json
import math
import random
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from neoxfuse.dashboard import build, load_results, render
from neoxfuse.dashboard.browser import ChromiumNotFoundError, check_page, find_chromium
from neoxfuse.dashboard.page import VIEWS, short_kernel_name
from neoxfuse.dashboard.svg import Series, bar_plot, line_plot, log2_ticks, nice_ticks, range_plot

SAMPLES = Path(__file__).resolve().parent / "data" / "sample_results"
SVG = "{http://www.w3.org/2000/svg}"


def marks(svg: str) -> list[ElementTree.Element]:
    root = ElementTree.fromstring(svg)
    return [e for e in root.iter() if e.get("class") == "mark"]


def random_range(rng: random.Random) -> tuple[float, float]:
    lo = rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-3, 3)
    return lo, lo + rng.uniform(1e-3, 1e4)


@pytest.mark.parametrize("trial", range(100))
def test_nice_ticks_cover_the_range_in_round_steps(trial, rng):
    check_nice_ticks(*random_range(rng))


def test_nice_ticks_cover_a_top_just_past_a_tick():
    check_nice_ticks(-0.7856328697193113, 2000.1725576641777)  # once ended at 2000: a step short


def check_nice_ticks(lo: float, hi: float) -> None:
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6


def test_log2_ticks_are_powers_of_two_covering_the_range(rng):
    lo, hi = rng.randint(1, 100), rng.randint(200, 1 << 20)
    ticks = log2_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and len(ticks) <= 10
    assert all(math.log2(t).is_integer() for t in ticks)


def test_line_plot_draws_one_mark_per_point_inside_the_frame(rng):
    series = [
        Series(f"s{k}", [(2 ** rng.randint(0, 12), rng.uniform(0, 50), f"p{k}.{i}") for i in range(rng.randint(1, 8))])
        for k in range(rng.randint(1, 5))
    ]
    series.append(Series("floor", [(1, 1.0, ""), (4096, 2.0, "")], reference=True))
    svg = line_plot("p", "title", series, x_label="x", y_label="y", log_x=True)
    drawn = marks(svg)
    points = sum(len(s.points) for s in series[:-1])
    assert len(drawn) == points == int(ElementTree.fromstring(svg).get("data-marks"))
    frame = next(e for e in ElementTree.fromstring(svg).iter() if e.get("class") == "frame")
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
    for mark in drawn:
        assert x0 - 0.1 <= float(mark.get("cx")) <= x1 + 0.1 and y0 - 0.1 <= float(mark.get("cy")) <= y1 + 0.1
    assert sorted(m.find(f"{SVG}title").text for m in drawn) == sorted(p[2] for s in series[:-1] for p in s.points)


def test_line_plot_puts_higher_values_higher():
    svg = line_plot("p", "t", [Series("s", [(1, 1.0, "a"), (2, 5.0, "b"), (3, 3.0, "c")])], x_label="x", y_label="y")
    cy = {m.find(f"{SVG}title").text: float(m.get("cy")) for m in marks(svg)}
    assert cy["b"] < cy["c"] < cy["a"]  # SVG's y grows downwards


def test_bar_and_range_plots_draw_a_mark_per_value(rng):
    categories = [f"kernel{i}" for i in range(rng.randint(1, 6))]
    values = [[rng.choice([None, rng.uniform(0, 100)]) for _ in categories] for _ in range(2)]
    svg = bar_plot("b", "t", categories, [(f"q{k}", v, [""] * len(v)) for k, v in enumerate(values)], x_label="%")
    assert len(marks(svg)) == sum(v is not None for vs in values for v in vs)
    rows = [(f"run{i}", 1400.0, rng.uniform(1400, 1980), 1980.0, "") for i in range(rng.randint(1, 5))]
    assert len(marks(range_plot("r", "t", rows, x_label="MHz"))) == len(rows)


def random_results(folder: Path, rng: random.Random) -> dict[str, dict]:
    """One random results file per known suite (two decode runs, one sampled) and one of an unknown suite."""
    device = {"name": "RANDOM-GPU (test)", "sm": "90", "copy_GBps": rng.uniform(2000, 4000)}
    files = {}

    def write(name: str, suite: str, commit: str, rows: list[dict], **extra) -> None:
        data = {"suite": suite, "commit": commit, "created": f"2026-01-0{len(files) + 1}T00:00:00+00:00"}
        data |= {"device": device, "rows": rows, **extra}
        (folder / name).write_text(json.dumps(data))
        files[name] = data

    for commit in ("aaaaaaa1", "bbbbbbb2"):
        rows = [
            {"model": "pythia-2.8b", "backend": b, "context": c, "tpot_ms": rng.uniform(2, 9), "floor_ms": 1.8}
            for b in ("fused", "hf_eager")
            for c in (128, 1024, 4096)
        ]
        write(f"decode-{commit}.json", "decode", commit, rows, complete=commit == "bbbbbbb2")
    sampled = [{"model": "pythia-2.8b", "backend": b, "context": c, "tpot_ms": rng.uniform(2, 9), "floor_ms": 1.8,
                "sampling": {"temperature": 0.8, "top_k": 0, "top_p": 0.9, "seed": 0}, "match": None}
               for b in ("fused", "hf_eager") for c in (128, 1024)]  # fmt: skip
    write("decode-sampled.json", "decode_sampled", "bbbbbbb2", sampled)
    write(
        "ln.json",
        "ln_residual",
        "bbbbbbb2",
        [
            {"tokens": t, "hidden": h, "dtype": "float16", "variant": "dual", "provider": p, "GBps": rng.uniform(100, 3000)}
            for t in (1, 8)
            for h in (512, 2560)
            for p in ("neoxfuse", "torch_eager")
        ],
        nvml={"available": True, "samples": 3, "duration_s": 0.2, "sm_clock_mhz": {"min": 1500, "median": 1900, "max": 1980},
              "throttled": True, "throttle_reasons": ["hw_thermal_slowdown"], "gpu_shared": False, "other_processes": []},
        targets=[{"target": "decode speedup", "shape": "1x2560", "value": 3.1, "threshold": 2.5, "at_most": False, "met": True},
                 {"target": "median us", "shape": "1x2560", "value": 9.5, "threshold": 8.0, "at_most": True, "met": False},
                 {"target": "prefill speedup", "shape": "16384x2560", "value": None, "threshold": 1.0, "at_most": False,
                  "met": None}],
    )  # fmt: skip
    write("layer.json", "layer", "bbbbbbb2",
          [{"model": "pythia-2.8b", "layer": 0, "seq_len": n, "dtype": d, "provider": p, "median_us": rng.uniform(55, 90),
            "floor_us": 52.0} for n in (1, 512, 2048) for d in ("fp16", "bf16") for p in ("fused", "torch_graph")])  # fmt: skip
    write("sample.json", "sample", "bbbbbbb2",
          [{"vocab": v, "rule": r, "provider": p, "median_us": rng.uniform(3, 80), "match": 1.0 if p == "neoxfuse" else None}
           for v in (8192, 50304) for r in ("T=1 k=0 p=1", "T=0.7 k=50 p=0.95") for p in ("neoxfuse", "torch_graph")])  # fmt: skip
    write(
        "new.json",
        "brand_new_suite",
        "bbbbbbb2",
        [{"widgets": rng.randint(1, 9), "median_us": rng.uniform(1, 5)}],
        ncu={
            "kernels": [
                {"kernel": "void neoxfuse::k<1>(int)", "dram_throughput_pct": 50.0, "achieved_occupancy_pct": 20.0}
            ]
        },
    )
    return files


def test_page_draws_every_section_from_random_results(tmp_path, rng):
    files = random_results(tmp_path, rng)
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": "world"}))
    runs, problems = load_results([tmp_path])
    assert len(runs) == len(files) and len(problems) == 2
    html = render(runs, problems)
    for section in ("targets", "floor", "suite-decode", "suite-decode-sampled", "suite-layer", "suite-ln-residual", "suite-sample",
                    "suite-brand-new-suite", "nvml", "ncu", "sources"):
        assert f'id="{section}"' in html
    assert 'id="floor-over-commits"' in html and 'id="nvml-sm-clock"' in html and 'id="ncu-brand-new-suite' in html
    assert html.count('<svg class="plot"') == int(html.split('data-plots="')[1].split('"')[0])
    # ln_residual: one plot per (hidden, dtype, variant) facet; decode: one per model
    assert html.count('id="ln-residual-random-gpu-test-') == 2 and html.count('id="decode-random-gpu-test-') == 1
    assert html.count('id="decode-sampled-random-gpu-test-') == 1
    assert html.count('id="sample-random-gpu-test-') == 2  # one plot per rule
    assert html.count('id="layer-random-gpu-test-') == 2 and "model=pythia-2.8b, layer=0, dtype=bf16" in html  # per dtype
    assert "broken.json: not readable JSON" in html and "other.json: not a results file" in html
    assert "throttled: hw_thermal_slowdown" in html
    assert html.count("was stopped part-way") == 1 and "aaaaaaa1" in html.split("was stopped part-way")[0].rsplit("<li>", 1)[1]
    targets = html.split('id="targets"')[1].split("</section>")[0]
    assert targets.count("<tr class=flagged>") == 1 and "<td>NOT met</td>" in targets and "<td>&lt;= 8.0</td>" in targets
    assert targets.count("<td>met</td>") == 1 and targets.count("<td>not measured</td>") == 1
    assert "No run has checked" in render([run for run in runs if run.suite != "ln_residual"], [])
    assert "Suite <code>brand_new_suite</code> has no plot layout" in html


def test_percent_of_floor_is_floor_over_time_and_bandwidth_over_copy(rng):
    tpot, floor, gbps, copy = rng.uniform(2, 9), rng.uniform(1, 2), rng.uniform(100, 2000), rng.uniform(2000, 4000)
    assert VIEWS["decode"].floor_fraction({"tpot_ms": tpot, "floor_ms": floor}, {}) == pytest.approx(floor / tpot)
    assert VIEWS["ln_residual"].floor_fraction({"GBps": gbps}, {"copy_GBps": copy}) == pytest.approx(gbps / copy)
    assert VIEWS["ln_residual"].floor_fraction({"GBps": gbps}, {"copy_GBps": None}) is None
    assert VIEWS["decode"].floor_fraction({"tpot_ms": tpot, "floor_ms": None}, {}) is None


def test_short_kernel_names():
    assert short_kernel_name("void neoxfuse::(anonymous namespace)::copy_kernel<4>(uint4 *, int)") == "copy_kernel<4>"
    assert short_kernel_name("neoxfuse::ln_residual(const __half *)") == "ln_residual"


def test_samples_are_marked_synthetic_and_kept_out_of_bench_results():
    for path in SAMPLES.glob("*.json"):
        data = json.loads(path.read_text())
        assert "SYNTHETIC" in data["synthetic"] and "sample" in data["device"]["name"], path
    published = Path(__file__).resolve().parent.parent / "bench" / "results"
    for path in published.glob("*.json"):
        assert "synthetic" not in json.loads(path.read_text()), f"{path}: synthetic samples belong in tests/data"


def test_a_machine_without_chromium_is_told_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ChromiumNotFoundError, match="apt-get install -y chromium"):
        find_chromium()


def chromium() -> str:
    try:
        return find_chromium()
    except ChromiumNotFoundError as err:
        pytest.fail(f"the dashboard check needs headless Chromium: {err}")


def test_dashboard_of_the_samples_loads_in_chromium_without_errors_and_shows_its_plots(tmp_path):
    chromium()
    page = build([SAMPLES], tmp_path / "index.html")
    report = check_page(page, screenshot=tmp_path / "page.png")
    assert report.problems() == []
    assert report.title == "neoxfuse dashboard"
    ids = {plot["id"] for plot in report.plots}
    assert {"floor-over-commits", "nvml-sm-clock", "ncu-ln-residual-synthetic-gpu-sample"} <= ids
    targets = page.read_text().split('id="targets"')[1].split("</section>")[0]
    assert targets.count("<tr class=flagged>") == 2  # decode-sample-2.json: 2 of its 4 targets not met
    assert any(i.startswith("decode-") for i in ids) and any(i.startswith("gptq-ln-qkv-") for i in ids)
    assert len(report.plots) == report.declared_plots >= 8
    assert all(plot["marks"] > 0 for plot in report.plots)
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chromium_check_catches_console_errors_and_empty_plots(tmp_path):
    chromium()
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><title>bad</title></head><body data-plots="2">'
        '<svg class="plot" id="empty" data-marks="3" width="100" height="50"><circle class="mark" r="2"/></svg>'
        "<script>console.error('drawn wrong'); undefinedFunction();</script></body></html>"
    )
    problems = check_page(page).problems()
    assert any("console.error: drawn wrong" in p for p in problems)
    assert any("exception" in p and "undefinedFunction" in p for p in problems)
    assert any("declares 2 plots; the browser shows 1" in p for p in problems)
    assert any("plot empty shows 1 data marks of 3" in p for p in problems)


def test_chromium_check_sees_failed_network_loads(tmp_path):
    chromium()
    page = tmp_path / "net.html"
    page.write_text(
        '<!DOCTYPE html><html><head><title>net</title><script src="https://cdn.example.com/plot.js"></script></head>'
        '<body data-plots="0"></body></html>'
    )
    problems = check_page(page).problems()
    assert any("cdn.example.com" in p for p in problems), problems
