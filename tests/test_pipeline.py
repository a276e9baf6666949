"""The GPU pipeline on a CPU machine: how it degrades, and each stage's logic driven by stand-ins
(a checkout with failing GPU tests, bench suites that pass, fail, hang or write nothing, and an
`ncu` stand-in that runs the program and prints a synthetic raw-CSV page)."""

import csv
import importlib
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import _name_matches

from neoxfuse import pipeline as pipeline_module
from neoxfuse import profile
from neoxfuse import _lib
from neoxfuse.device import DeviceInfo
from neoxfuse.errors import KernelError, UnsupportedDeviceError
from neoxfuse.pipeline import SANITIZER_TOOLS, Pipeline, Suite, parse_args

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "data" / "sample_results"

FAKE_SUITE = '''
"""A stand-in bench suite: writes random rows, or misbehaves as $FAKE_SUITE_MODE says."""
import json, os, random, time
from pathlib import Path

SUITE = "fake"
HELP = "a stand-in"
PROFILE_ARGS = ["--rows", "1"]


def add_arguments(parser):
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--rows", type=int, default=5)


def run(args):
    mode = os.environ.get("FAKE_SUITE_MODE", "ok")
    print(f"fake suite running ({mode})")
    if mode == "fail":
        return 3
    if mode == "hang":
        time.sleep(60)
    if mode == "silent":
        return 0
    rows = [{"tokens": 2**i, "provider": "neoxfuse", "median_us": random.uniform(1, 9)} for i in range(args.rows)]
    record = {"suite": "fake", "commit": os.environ.get("NEOXFUSE_COMMIT", "unknown"), "created": "2026-01-01T00:00:00+00:00",
              "device": {"name": "stand-in", "sm": None, "copy_GBps": None}, "rows": rows}
    if mode == "targets":
        record["complete"] = False
        record["targets"] = [{"target": name, "shape": "1x8", "value": value, "threshold": 2.0, "at_most": False, "met": met}
                             for name, value, met in (("fast", 3.0, True), ("faster", 1.0, False), ("fastest", 1.5, False),
                                                      ("bold", None, None))]
    Path(args.out_dir, f"fake-{random.getrandbits(32):08x}.json").write_text(json.dumps(record))
    return 0
'''

FAKE_NCU = '''#!{python}
"""A stand-in for ncu: --version; --import prints ncu.csv beside it; else runs the program after
--force-overwrite and writes the --export report (holding the command line), or fails as
$FAKE_NCU_MODE says."""
import json, os, subprocess, sys
from pathlib import Path

argv = sys.argv[1:]
if argv == ["--version"]:
    print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2099.1.0.0 (build 1) (public-release)")
    sys.exit(0)
if argv[0] == "--import":
    print("==PROF== Disconnected")
    print(Path(__file__).with_name("ncu.csv").read_text(), end="")
    sys.exit(0)
if os.environ.get("FAKE_NCU_MODE") == "no-counters":
    print("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance Counters")
    sys.exit(1)
status = subprocess.call(argv[argv.index("--force-overwrite") + 1 :])
if os.environ.get("FAKE_NCU_MODE") != "no-kernels":
    Path(argv[argv.index("--export") + 1] + ".ncu-rep").write_text(json.dumps(argv))
sys.exit(status)
'''

METRICS = {  # metric: (unit in ncu's base units, summary field, factor from the unit to the field's)
    "gpu__time_duration.sum": ("nsecond", "duration_us", 1e-3),
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": ("%", "dram_throughput_pct", 1.0),
    "dram__bytes.sum.per_second": ("byte/second", "dram_GBps", 1e-9),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("%", "achieved_occupancy_pct", 1.0),
    "launch__registers_per_thread": ("register/thread", "registers_per_thread", 1.0),
    "launch__shared_mem_per_block_static": ("byte", "shared_memory_static_bytes", 1.0),
    "launch__shared_mem_per_block_dynamic": ("byte", "shared_memory_dynamic_bytes", 1.0),
    "launch__grid_size": ("", "grid_size", 1.0),
    "launch__block_size": ("", "block_size", 1.0),
}


def synthetic_raw_csv(kernels: list[str], rng: random.Random) -> tuple[str, list[dict]]:
    """A SYNTHETIC page shaped like `ncu --import R --csv --page raw --print-units base` (header row,
    units row, one row per launch; big numbers with thousands separators), and each launch's values."""
    head = ["ID", "Process ID", "Process Name", "Kernel Name", "Block Size", "Grid Size", *METRICS]
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    writer.writerow(head)
    writer.writerow(["", "", "", "", "", ""] + [unit for unit, _, _ in METRICS.values()])
    launches = []
    for i, kernel in enumerate(kernels):
        values = {
            metric: rng.randint(1, 3_000_000_000_000) if "second" in unit else rng.randint(1, 100)
            for metric, (unit, _, _) in METRICS.items()
        }
        launches.append(values)
        writer.writerow(
            [str(i), "4242", "python3", kernel, "(256, 1, 1)", "(132, 1, 1)"] + [f"{v:,}" for v in values.values()]
        )
    return out.getvalue(), launches


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A stand-in checkout: tests/ (filled per test) and bench/results/ holding the sample results."""
    root = tmp_path / "checkout"
    (root / "tests").mkdir(parents=True)
    (root / "bench").mkdir()
    (root / "bench" / "results").symlink_to(SAMPLES)
    return root


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> Path:
    """The stand-in suite module (importable by the pipeline's child processes) and ncu."""
    folder = tmp_path / "fakes"
    folder.mkdir()
    (folder / "fake_suite.py").write_text(FAKE_SUITE)
    ncu = folder / "ncu"
    ncu.write_text(FAKE_NCU.format(python=sys.executable))
    ncu.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def pipeline_for(tmp_path, *args) -> Pipeline:
    """A pipeline whose stages are called one by one, as if the environment stage had found a GPU."""
    pipeline = Pipeline(parse_args(["--out", str(tmp_path / "run"), *args]))
    pipeline.gpu_missing = None
    return pipeline


FAKE = Suite(module="fake_suite", name="fake", path="fake_suite")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how the pipeline degrades on a machine without a GPU")
def test_pipeline_on_a_cpu_machine_skips_gpu_stages_with_reasons(tmp_path, checkout):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "neoxfuse.pipeline", "--tests", str(checkout), "--out", str(out), "--commit", "c0ffee"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "pipeline.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert report["commit"] == "c0ffee" and not report["failed"]
    assert stages["environment"]["status"] == "passed"
    for name in ["tests", "profile"] + [n for n in stages if n.startswith("bench")]:
        assert stages[name]["status"] == "skipped" and stages[name]["reason"], name
    assert "no CUDA GPU" in stages["tests"]["reason"]
    assert stages["dashboard"]["status"] == "passed"
    environment = json.loads((out / "environment.json").read_text())
    assert "archs=" in environment["neoxfuse"]["build_info"] and environment["gpu_missing"]
    assert environment["nvml"]["available"] is False and environment["nvml"]["reason"].startswith("unavailable:")
    page = (out / "dashboard" / "index.html").read_text()
    assert page.count('<svg class="plot"') >= 5  # drawn from the checkout's bench/results
    assert "==> environment" in done.stdout and "skipped" in done.stdout  # progress and the closing table


def write_gpu_tests(checkout: Path, failing: int, passing: int) -> None:
    (checkout / "tests" / "conftest.py").write_text(
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'gpu: needs a GPU')\n"
    )
    body = ["import pytest"]
    for i in range(passing):
        body.append(f"@pytest.mark.gpu\ndef test_passes_{i}():\n    assert {i} == {i}")
    for i in range(failing):
        body.append(f"@pytest.mark.gpu\ndef test_fails_{i}():\n    assert {i} == {i + 1}")
    body.append("def test_not_gpu():\n    raise AssertionError('-m gpu must leave this out')")
    (checkout / "tests" / "test_stand_in.py").write_text("\n\n".join(body) + "\n")


def test_a_failing_gpu_test_fails_the_pipeline(tmp_path, checkout, rng):
    failing, passing = rng.randint(1, 3), rng.randint(1, 3)
    write_gpu_tests(checkout, failing, passing)
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout))
    stage = pipeline.run_stage("tests", pipeline.tests)
    assert stage.status == "failed"
    counts = {"tests": failing + passing, "failures": failing, "errors": 0, "skipped": 0}
    assert stage.details == counts | {"files": {"test_stand_in.py": counts | {"status": 1}}}
    assert "test_stand_in.py: exit status 1" in stage.reason and "logs/tests-test_stand_in.log" in stage.reason
    assert "test_fails_0" in (pipeline.out / "logs" / "tests-test_stand_in.log").read_text()
    assert pipeline._finish() == 1
    assert json.loads((pipeline.out / "pipeline.json").read_text())["failed"] is True


def test_each_test_file_runs_in_its_own_process(tmp_path, checkout):
    """A file whose process dies (as after a kernel fault) fails alone; the next file still runs."""
    write_gpu_tests(checkout, failing=0, passing=2)
    (checkout / "tests" / "test_crash.py").write_text(
        "import os, pytest\n\n@pytest.mark.gpu\ndef test_dies():\n    os._exit(3)\n"
    )
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout))
    stage = pipeline.run_stage("tests", pipeline.tests)
    assert stage.status == "failed" and "test_crash.py: exit status 3" in stage.reason
    assert stage.details["files"]["test_stand_in.py"]["status"] == 0
    assert stage.details["tests"] == 2
    only = pipeline_for(tmp_path, "--tests", str(checkout), "--test", "test_stand*.py")
    assert only.run_stage("tests", only.tests).status == "passed"


def test_passing_gpu_tests_pass_and_no_gpu_tests_skip(tmp_path, checkout):
    write_gpu_tests(checkout, failing=0, passing=2)
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout))
    assert pipeline.run_stage("tests", pipeline.tests).status == "passed"
    write_gpu_tests(checkout, failing=0, passing=0)
    (checkout / "tests" / "test_stand_in.py").write_text("def test_cpu():\n    pass\n")
    stage = pipeline.run_stage("tests", pipeline.tests)
    assert (stage.status, stage.reason) == ("skipped", "no test carries the gpu marker")
    assert pipeline._finish() == 0


def test_marker_narrows_the_gpu_tests(tmp_path, checkout):
    write_gpu_tests(checkout, failing=1, passing=0)
    with (checkout / "tests" / "test_stand_in.py").open("a") as f:
        f.write("\n\n@pytest.mark.gpu\n@pytest.mark.quick\ndef test_quick():\n    pass\n")
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout), "--marker", "quick")
    stage = pipeline.run_stage("tests", pipeline.tests)
    assert stage.status == "passed" and stage.details["tests"] == 1  # test_fails_0 is not selected
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout), "--marker", "nothing_has_this")
    stage = pipeline.run_stage("tests", pipeline.tests)
    assert (stage.status, stage.reason) == ("skipped", "no test carries the gpu marker and --marker nothing_has_this")


def test_bench_stage_runs_a_suite_and_adds_nvml_and_the_commit(tmp_path, fakes, capsys):
    rows = random.randint(1, 9)
    pipeline = pipeline_for(tmp_path, "--commit", "feedface", "--suite-args", f"fake=--rows {rows}")
    stage = pipeline.run_stage("bench:fake_suite", pipeline.bench_suite, FAKE)
    assert stage.status == "passed", stage
    [written] = pipeline.suite_results["fake_suite"]
    data = json.loads(written.read_text())
    assert data["commit"] == "feedface" and len(data["rows"]) == rows
    nvml = data["nvml"]
    if nvml["available"]:
        assert all({"throttled", "gpu_shared"} <= row.keys() for row in data["rows"])
    else:
        assert nvml["reason"].startswith("unavailable:") and "NVML unavailable" in stage.reason
    assert "fake suite running (ok)" in (pipeline.out / "logs" / "bench-fake_suite.log").read_text()
    assert "    fake suite running (ok)" in capsys.readouterr().out  # progress streams while it runs


def test_bench_stage_counts_the_targets_the_suite_checked_and_the_summary_lists_them(tmp_path, fakes, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SUITE_MODE", "targets")
    pipeline = pipeline_for(tmp_path)
    stage = pipeline.run_stage("bench:fake_suite", pipeline.bench_suite, FAKE)
    assert stage.status == "passed", stage
    assert "targets: 1 met, 2 NOT met (faster at 1x8; fastest at 1x8), 1 not measured" in stage.reason
    capsys.readouterr()
    pipeline._finish()
    [written] = pipeline.suite_results["fake_suite"]
    title = f"targets checked by results/{written.name} (stopped part-way: from the runs it finished):\n"
    summary = capsys.readouterr().out.split(title)[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in summary] == ["fast", "faster", "fastest", "bold"]
    assert [line.rsplit(": ", 1)[1] for line in summary] == ["met", "NOT met", "NOT met", "not measured"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("fail", "exit status 3"), ("silent", "wrote no results file"), ("hang", "killed after 1.0 s")],
)
def test_bench_stage_fails_a_suite_that_fails(tmp_path, fakes, monkeypatch, mode, reason):
    monkeypatch.setenv("FAKE_SUITE_MODE", mode)
    pipeline = pipeline_for(tmp_path, "--timeout", "1" if mode == "hang" else "120")
    stage = pipeline.run_stage("bench:fake_suite", pipeline.bench_suite, FAKE)
    assert stage.status == "failed" and reason in stage.reason, stage
    assert pipeline._finish() == 1


def test_a_budget_kills_what_runs_at_its_end_and_skips_what_comes_after(tmp_path, fakes, checkout, monkeypatch):
    monkeypatch.setenv("FAKE_SUITE_MODE", "hang")
    write_gpu_tests(checkout, failing=0, passing=1)
    pipeline = pipeline_for(tmp_path, "--budget", "2", "--tests", str(checkout))
    start = time.monotonic()
    hung = pipeline.run_stage("bench:fake_suite", pipeline.bench_suite, FAKE)
    assert hung.status == "failed" and "the end of the --budget of 2 s" in hung.reason, hung
    assert time.monotonic() - start < 30  # the suite sleeps 60 s
    later = pipeline.run_stage("tests", pipeline.tests)
    assert (later.status, later.reason) == ("skipped", "the --budget of 2 s was spent before it")
    assert pipeline._finish() == 1


def test_tests_left_when_the_budget_is_spent_are_not_run_and_fail_the_stage(tmp_path, checkout):
    write_gpu_tests(checkout, failing=0, passing=2)
    pipeline = pipeline_for(tmp_path, "--budget", "1000", "--tests", str(checkout))
    pipeline.deadline = time.monotonic()  # spent just after the stage starts
    stage = pipeline.tests()
    assert stage.status == "failed" and "not run, the --budget of 1000 s was spent before it" in stage.reason


def test_profile_stage_summarises_kernels_into_the_suites_results(tmp_path, fakes, rng):
    kernels = [
        f"void neoxfuse::(anonymous namespace)::k{i}<{rng.randint(1, 8)}>(const __half *, int)" for i in range(3)
    ]
    text, launches = synthetic_raw_csv([*kernels, kernels[0]], rng)  # the last: a second launch of k0
    (fakes / "ncu.csv").write_text(text)
    pipeline = pipeline_for(tmp_path)
    assert pipeline.run_stage("bench:fake_suite", pipeline.bench_suite, FAKE).status == "passed"
    stage = pipeline.run_stage("profile:fake_suite", pipeline.profile_suite, FAKE, str(fakes / "ncu"))
    assert stage.status == "passed", stage
    [written] = pipeline.suite_results["fake_suite"]
    assert sorted(p.name for p in (pipeline.out / "results").iterdir()) == [
        written.name
    ]  # the profiled run's are dropped
    ncu = json.loads(written.read_text())["ncu"]
    assert ncu["tool"] == "ncu 2099.1.0.0" and ncu["sections"] == list(profile.SECTIONS)
    assert [k["kernel"] for k in ncu["kernels"]] == kernels
    for summary, values in zip(ncu["kernels"], launches[: len(kernels)], strict=True):
        for metric, (_, field, factor) in METRICS.items():
            assert summary[field] == pytest.approx(values[metric] * factor), field
    command = json.loads((pipeline.out / ncu["report"]).read_text())
    assert command[command.index("--kernel-id") + 1] == f"::regex:{profile.KERNEL_FILTER}:1"
    assert [command[i + 1] for i, a in enumerate(command) if a == "--section"] == list(profile.SECTIONS)
    assert command[-2:] == ["--rows", "1"]  # the suite's PROFILE_ARGS


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [("no-counters", "skipped", "performance counters"), ("no-kernels", "skipped", "launched no neoxfuse kernel")],
)
def test_profile_stage_says_why_there_is_no_profile(tmp_path, fakes, monkeypatch, mode, status, reason):
    pipeline = pipeline_for(tmp_path)
    assert pipeline.run_stage("bench:fake_suite", pipeline.bench_suite, FAKE).status == "passed"
    monkeypatch.setenv("FAKE_NCU_MODE", mode)
    stage = pipeline.run_stage("profile:fake_suite", pipeline.profile_suite, FAKE, str(fakes / "ncu"))
    assert stage.status == status and reason in stage.reason, stage
    ncu = json.loads(pipeline.suite_results["fake_suite"][0].read_text())["ncu"]
    assert ncu["kernels"] == [] and reason in ncu["reason"]


def test_raw_csv_with_unknown_units_or_columns_is_an_error(rng):
    text, _ = synthetic_raw_csv(["neoxfuse::k"], rng)
    with pytest.raises(profile.ProfileError, match="unexpected unit 'furlong'"):
        profile.summarize_raw_csv(text.replace('"nsecond"', '"furlong"'))
    with pytest.raises(profile.ProfileError, match="Kernel Name"):
        profile.summarize_raw_csv(text.replace('"Kernel Name"', '"Name"'))


def test_find_ncu_on_path(tmp_path, monkeypatch):
    ncu = tmp_path / "ncu"
    ncu.write_text("#!/bin/sh\necho 'Version 2099.2.0.0 (build 3)'\n")
    ncu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert profile.find_ncu() == str(ncu)
    assert profile.ncu_version(str(ncu)) == "2099.2.0.0"


def test_counter_permission_messages_are_recognised():
    assert profile.counters_unavailable("==PROF== Connected\n==ERROR== ERR_NVGPUCTRPERM - no permission\n")
    assert profile.counters_unavailable("==ERROR== Failed to initialize the profiler: LibraryNotLoaded")
    assert profile.counters_unavailable("==PROF== Connected to process 12\n==PROF== Profiling k1: 0%....100%") is None


def test_suite_child_runs_a_suite_with_its_arguments_and_out_dir(tmp_path, fakes):
    done = subprocess.run(
        [sys.executable, "-m", "neoxfuse.pipeline", "_suite", "fake_suite", str(tmp_path), "--rows", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [written] = tmp_path.glob("fake-*.json")
    assert len(json.loads(written.read_text())["rows"]) == 2


def test_help_describes_the_stages():
    done = subprocess.run(
        [sys.executable, "-m", "neoxfuse.pipeline", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for stage in ("environment", "tests", "bench:<suite>", "profile:<suite>", "dashboard"):
        assert stage in done.stdout


FAKE_SANITIZER = '''#!{python}
"""A stand-in for compute-sanitizer: runs the program after --error-exitcode N; with
$FAKE_SANITIZER_MODE=errors reports an error and exits N, as the real one does; with
$FAKE_SANITIZER_MODE=unsupported refuses the device as it does on gVisor machines."""
import os, subprocess, sys

argv = sys.argv[1:]
assert argv[0] == "--tool" and argv[2] == "--error-exitcode", argv
if os.environ.get("FAKE_SANITIZER_MODE") == "unsupported":
    print("========= Error: Device not supported")
    sys.exit(1)
status = subprocess.call(argv[4:])
if os.environ.get("FAKE_SANITIZER_MODE") == "errors":
    print("========= Invalid __global__ read of size 16 bytes")
    sys.exit(int(argv[3]))
sys.exit(status)
'''


def write_sanitize_tests(checkout: Path) -> None:
    write_gpu_tests(checkout, failing=0, passing=1)
    (checkout / "tests" / "conftest.py").write_text(
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'gpu: needs a GPU')\n"
        "    config.addinivalue_line('markers', 'sanitize: under compute-sanitizer')\n"
    )
    (checkout / "tests" / "test_small.py").write_text(
        "import os, pytest\n\n"
        "@pytest.mark.gpu\n@pytest.mark.sanitize\ndef test_small():\n"
        "    assert os.environ['PYTORCH_NO_CUDA_MEMORY_CACHING'] == '1'  # every tensor its own allocation\n"
    )


def fake_sanitizer(tmp_path, monkeypatch, mode: str) -> None:
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(FAKE_SANITIZER.format(python=sys.executable))
    sanitizer.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SANITIZER_MODE", mode)


@pytest.mark.parametrize("mode", ["clean", "errors"])
def test_sanitize_stages_run_the_marked_gpu_tests_under_each_tool(tmp_path, checkout, monkeypatch, mode):
    write_sanitize_tests(checkout)
    fake_sanitizer(tmp_path, monkeypatch, mode)
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout))
    pipeline._sanitize_all(set())
    stages = {stage.name: stage for stage in pipeline.stages}
    assert list(stages) == [f"sanitize:{tool}" for tool in SANITIZER_TOOLS]
    for tool, stage in zip(SANITIZER_TOOLS, stages.values()):
        assert stage.details["tests"] == 1 and stage.details["failures"] == 0  # test_small only
        if mode == "clean":
            assert stage.status == "passed" and f"{tool} reported no error" in stage.reason
        else:
            assert stage.status == "failed" and f"{tool} reported errors (see logs/sanitize-{tool}.log)" in stage.reason


def test_a_sanitizer_that_refuses_the_gpu_skips_every_tool_with_its_words(tmp_path, checkout, monkeypatch):
    write_sanitize_tests(checkout)
    fake_sanitizer(tmp_path, monkeypatch, "unsupported")
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout))
    pipeline._sanitize_all(set())
    assert [(s.name, s.status) for s in pipeline.stages] == [(f"sanitize:{tool}", "skipped") for tool in SANITIZER_TOOLS]
    first, *later = pipeline.stages
    assert "it says 'Device not supported' (see logs/sanitize-memcheck.log" in first.reason
    assert all(stage.reason == f"{first.reason} (sanitize:memcheck)" for stage in later)
    assert pipeline._finish() == 0


def test_sanitize_stage_is_skipped_with_its_reason(tmp_path, checkout, monkeypatch):
    monkeypatch.setattr(pipeline_module, "find_sanitizer", lambda: None)
    pipeline = pipeline_for(tmp_path, "--tests", str(checkout))
    pipeline._sanitize_all(set())
    pipeline._sanitize_all({"sanitize"})
    assert [(s.name, s.status) for s in pipeline.stages] == [("sanitize", "skipped")] * 2
    assert "compute-sanitizer not found" in pipeline.stages[0].reason
    assert pipeline.stages[1].reason == "--skip sanitize"


def test_every_sanitize_pattern_of_the_test_modules_names_a_gpu_test():
    """A renamed test or parameter must not silently drop a case from the sanitizer stages."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu and sanitize", str(ROOT / "tests")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    selected = {line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line}
    modules = [path.stem for path in (ROOT / "tests").glob("test_*.py") if "\nSANITIZE = " in path.read_text()]
    assert {"test_cluster", "test_fused_decoder", "test_gptq_ln_qkv", "test_ln_residual"} <= set(modules)
    for stem in modules:
        patterns = importlib.import_module(stem).SANITIZE
        for pattern in patterns:
            assert any(_name_matches(name, pattern) for name in selected), f"{stem}.SANITIZE: {pattern!r} names no GPU test"


def _fake_plans(monkeypatch, refused_size: int):
    """fused_decoder.plan replaced by a stand-in for a 132-SM GPU with uneven GPCs; forcing
    `refused_size` fails as the library refuses a size whose shared memory does not fit."""
    from neoxfuse.ops import fused_decoder as fd

    at_once = {1: 132, 2: 66, 3: 42, 4: 31, 5: 23, 6: 19, 7: 16, 8: 15}

    def plan(shape, device=None, cluster_size=None):
        if cluster_size == refused_size:
            raise KernelError("neoxfuse_fused_decoder_plan", 2, "unsupported shape or dtype")
        size = cluster_size or 3
        return fd.FusedPlan(attn_mlp_in=fd.FusedGrid(size, max(32, at_once[size]), at_once[size], 52_000),
                            out_proj=fd.FusedGrid(cluster_size or 2, 66, 66, 26_000))

    monkeypatch.setattr(fd, "plan", plan)


def test_environment_records_the_fused_plan_and_the_clusters_the_gpu_runs_at_once(monkeypatch):
    _fake_plans(monkeypatch, refused_size=8)
    report = pipeline_module.fused_plan_report()
    assert report["plan"]["attn_mlp_in"] == {"cluster_size": 3, "clusters": 42, "max_active_clusters": 42, "smem": 52_000}
    assert report["clusters_at_once"] == {1: 132, 2: 66, 3: 42, 4: 31, 5: 23, 6: 19, 7: 16, 8: None}
    assert json.loads(json.dumps(report))["clusters_at_once"]["4"] == 31  # environment.json holds it
    assert pipeline_module.fused_plan_text(report) == (
        "fused plan (pythia-2.8b): attn_mlp_in 42 x 3, out_proj 66 x 2 (clusters x blocks); "
        "clusters at once by size: 1:132 2:66 3:42 4:31 5:23 6:19 7:16 8:None"
    )


def test_environment_asks_a_child_process_for_the_fused_plan():
    # The plan creates a CUDA context, which the pipeline's own process must not hold (the
    # benchmarks' NVML monitors would flag it as another process on the GPU): a child makes it.
    report = pipeline_module.fused_plan_in_child(timeout=120)
    assert report["model"] == "pythia-2.8b"
    if not torch.cuda.is_available():
        assert report["unavailable"].startswith("neoxfuse kernels need a CUDA GPU")
    elif torch.cuda.get_device_capability() < (9, 0):
        assert "sm_90+" in report["unavailable"]
    elif _lib.missing_code(0) is not None:
        assert report["unavailable"] == _lib.missing_code(0)
    else:
        assert report["plan"]["attn_mlp_in"]["clusters"] >= 32  # a cluster per head at least
        assert report["clusters_at_once"]["1"] == torch.cuda.get_device_properties(0).multi_processor_count


def test_environment_says_why_there_is_no_fused_plan(monkeypatch):
    from neoxfuse.ops import fused_decoder as fd

    def plan(shape, device=None, cluster_size=None):
        raise UnsupportedDeviceError("the fused kernels need thread-block clusters (sm_90+); cuda:0 is sm_80")

    monkeypatch.setattr(fd, "plan", plan)
    report = pipeline_module.fused_plan_report()
    assert report == {"model": "pythia-2.8b",
                      "unavailable": "the fused kernels need thread-block clusters (sm_90+); cuda:0 is sm_80"}
    assert pipeline_module.fused_plan_text(report).endswith("none: the fused kernels need thread-block clusters (sm_90+); "
                                                           "cuda:0 is sm_80")


@pytest.mark.parametrize(("name", "sm", "code"), [("NVIDIA H200", "90", "sm_90a machine code"), ("NVIDIA B200", "100", None)])
def test_environment_fails_on_a_gpu_the_library_has_no_code_for(monkeypatch, tmp_path, name, sm, code):
    from neoxfuse import device

    gpu = DeviceInfo(0, name, sm, 132, 141 * 2**30, 60 * 2**20, "13.0", "13.0")
    monkeypatch.setattr(device, "devices", lambda: [gpu])
    monkeypatch.setattr(pipeline_module, "fused_plan_in_child", lambda timeout: {"model": "pythia-2.8b", "unavailable": "not asked"})
    outcome = pipeline_for(tmp_path).environment()
    assert outcome.details["devices"][0]["code"] == code
    if code is None:
        assert outcome.status == "failed"
        assert outcome.reason == f"the library has no code for {name} (sm_{sm}; it holds sm_90a, sm_120, compute_120)"
    else:
        assert outcome.status == "passed"
