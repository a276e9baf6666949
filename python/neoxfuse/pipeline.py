"""The GPU pipeline: one command tests, benchmarks and profiles the installed neoxfuse on a GPU.

    python -m neoxfuse.pipeline --tests CHECKOUT [--out DIR] [--commit SHA] [--test GLOB]...
                                [--marker EXPR] [--suite NAME]... [--suite-args 'NAME=ARGS']...
                                [--skip STAGE]... [--timeout S] [--budget S]

ci/gpu_pipeline runs exactly this with CHECKOUT = the repository it sits in. It needs the
installed package (the wheel) and a CUDA build of torch; no Bazel, no network. The stages run
in order; each ends passed, failed or skipped with its reason, and any failure makes the exit
status 1:

  environment      GPU, driver, CUDA, clocks and state (NVML), the library's build and archs,
                   torch, ncu, the fused decoder's plan for Pythia-2.8B and the clusters of each
                   size the GPU runs at once -> DIR/environment.json. Fails if the library does
                   not load or holds no code for the GPU's arch.
  tests            pytest -m gpu on CHECKOUT/tests against the installed package, one process per
                   test file (--test GLOB picks files), so that a kernel fault, which poisons the
                   CUDA context of its process, fails only its own file. --marker EXPR narrows
                   the selection to `gpu and (EXPR)`: `--marker sanitize` runs the small case of
                   every kernel path only, a quick pass when GPU time is short.
  sanitize:<tool>  the GPU tests marked `sanitize` (small cases of every kernel path, chosen by each
                   test module's SANITIZE) under compute-sanitizer's memcheck, racecheck and
                   synccheck, with PyTorch's caching allocator off so that every tensor is its own
                   allocation and an access past its end is caught. Fails on any error reported;
                   skipped, with its words, where compute-sanitizer refuses the GPU (gVisor machines).
  bench:<suite>    every suite module of neoxfuse.bench (SUITE, HELP, add_arguments, run), each
                   in its own process with --out-dir DIR/results (and its --suite-args), while a
                   GpuMonitor samples the GPU; each results file it writes gains "nvml" and
                   per-row throttled / gpu_shared (neoxfuse.monitor); the stage's reason counts
                   the issues' targets the suite checked (met, NOT met, not measured). Suites of
                   DESIGN.md §6 missing from this build are reported as skipped.
  profile:<suite>  the suite again under Nsight Compute (neoxfuse.profile), with the suite's
                   optional PROFILE_ARGS (arguments for a short run that still launches each of
                   its kernels); the first launch of each neoxfuse kernel is profiled, the report
                   kept as DIR/profiles/<suite>.ncu-rep and its per-kernel summary added to the
                   suite's results files as "ncu".
  dashboard        DIR/dashboard/index.html from CHECKOUT/bench/results and DIR/results.

With --budget S the whole run takes at most about S seconds (a short GPU loan): a stage not
started by then is skipped with that reason, and a child process still running then is killed
(its stage fails).

DIR holds pipeline.json (every stage: status, reason, seconds, details), environment.json,
results/ (copy these into bench/results/ to commit them), profiles/, logs/ and dashboard/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

import neoxfuse
from neoxfuse import monitor, profile
from neoxfuse.bench.targets import target_lines, verdict

EXPECTED_SUITES = ("decode", "layer", "ln_residual", "gptq_ln_qkv")  # DESIGN.md §6
STAGES = ("tests", "sanitize", "bench", "profile", "dashboard")  # the ones --skip can name
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
SANITIZER_FOUND_ERRORS = 86  # compute-sanitizer's exit status when it reported errors (--error-exitcode)
SANITIZER_UNSUPPORTED = "Device not supported"  # what compute-sanitizer says where it cannot attach (gVisor machines)


@dataclass
class Stage:
    name: str
    status: str  # passed | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class Outcome:
    status: str
    reason: str = ""
    details: dict = field(default_factory=dict)


def _junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped summed over a JUnit XML file's test suites."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else the newest CUDA toolkit's; None if there is none."""
    return profile.find_program(
        "compute-sanitizer", "/usr/local/cuda*/bin/compute-sanitizer", "/usr/local/cuda*/compute-sanitizer/compute-sanitizer"
    )


def _pytest_command(target: Path, marker: str, xml: Path) -> list[str]:
    """pytest on `target` (a test file or folder), the tests carrying `marker` only, JUnit XML into `xml`."""
    return [sys.executable, "-m", "pytest", str(target), "-m", marker, "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]


def target_verdicts(paths: list[Path]) -> str:
    """'targets: 2 met, 1 NOT met (its name at its shape), 1 not measured' over the issues' targets that the
    results files hold (neoxfuse.bench.targets); '' when they hold none."""
    targets = [t for path in paths for t in json.loads(path.read_text()).get("targets", [])]
    if not targets:
        return ""
    verdicts = [verdict(t) for t in targets]
    missed = [f"{t['target']} at {t['shape']}" for t, v in zip(targets, verdicts, strict=True) if v == "NOT met"]
    return (f"targets: {verdicts.count('met')} met, {len(missed)} NOT met" + (f" ({'; '.join(missed)})" if missed else "")
            + f", {verdicts.count('not measured')} not measured")


def _count_summary(counts: dict) -> str:
    """'3 tests, 0 failures, ...' from _junit_counts."""
    return ", ".join(f"{v} {k}" for k, v in counts.items())


@dataclass(frozen=True)
class Suite:
    module: str  # its module's name in neoxfuse.bench, e.g. "ln_residual"
    name: str  # its SUITE (command-line) name, e.g. "ln-residual"
    path: str  # the module to import, e.g. "neoxfuse.bench.ln_residual"


def discover_suites() -> tuple[list[Suite], dict[str, str], str | None]:
    """The suite modules of neoxfuse.bench (neoxfuse.bench.suites(): pkgutil over the package),
    the modules that did not import {module: why}, and why there are none at all."""
    try:
        from neoxfuse import bench
    except ModuleNotFoundError as err:
        return [], {}, f"neoxfuse.bench is not in this build ({err})"
    found, broken = bench.suites()
    suites = [Suite(module.__name__.rsplit(".", 1)[1], name, module.__name__) for name, module in found.items()]
    return sorted(suites, key=lambda s: s.module), broken, None


def run_suite(argv: list[str]) -> int:
    """The child side of a bench stage: `_suite MODULE OUT_DIR [ARGS...]` runs one suite with
    its own argument parser on ARGS plus --out-dir OUT_DIR."""
    module_path, out_dir, *extra = argv
    module = importlib.import_module(module_path)
    parser = argparse.ArgumentParser(prog=f"neoxfuse bench {module.SUITE}", description=getattr(module, "HELP", None))
    module.add_arguments(parser)
    return module.run(parser.parse_args([*extra, "--out-dir", out_dir]))


class Pipeline:
    """One run of the stages into `out` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out.resolve()
        self.results = self.out / "results"
        self.logs = self.out / "logs"
        self.profiles = self.out / "profiles"
        for folder in (self.results, self.logs, self.profiles):
            folder.mkdir(parents=True, exist_ok=True)
        self.checkout: Path | None = args.tests.resolve() if args.tests else None
        self.commit = args.commit or os.environ.get("NEOXFUSE_COMMIT") or self._checkout_commit()
        self.stages: list[Stage] = []
        self.gpu_missing: str | None = "the environment stage did not finish"  # why GPU stages cannot run
        self.suite_results: dict[str, list[Path]] = {}  # suite -> results files its bench stage wrote
        self.started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.deadline = None if args.budget is None else time.monotonic() + args.budget  # time.monotonic() seconds

    def _checkout_commit(self) -> str:
        """`git rev-parse HEAD` in the checkout; "unknown" without one (or without git, or .git)."""
        if self.checkout is None:
            return "unknown"
        try:
            done = subprocess.run(
                ["git", "-C", str(self.checkout), "rev-parse", "HEAD"], capture_output=True, text=True
            )
        except OSError:
            return "unknown"
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    # -- bookkeeping ---------------------------------------------------------------------------

    def _record(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        note = f": {stage.reason}" if stage.reason else ""
        print(f"<== {stage.name} {stage.status.upper()}{note} [{stage.seconds:.1f} s]", flush=True)
        self.write_report()
        return stage

    def skip(self, name: str, reason: str) -> Stage:
        return self._record(Stage(name, "skipped", reason))

    def run_stage(self, name: str, fn, *fn_args) -> Stage:
        """Runs fn(*fn_args) -> Outcome as stage `name`; an exception fails the stage, not the run.
        Skipped once the --budget is spent."""
        if spent := self._budget_spent():
            return self.skip(name, spent)
        print(f"==> {name}", flush=True)
        start = time.monotonic()
        try:
            outcome = fn(*fn_args)
        except Exception as err:  # reported with its traceback; the later stages still run
            outcome = Outcome("failed", f"{type(err).__name__}: {err}", {"traceback": traceback.format_exc()})
        return self._record(
            Stage(name, outcome.status, outcome.reason, round(time.monotonic() - start, 1), outcome.details)
        )

    def write_report(self) -> None:
        report = {
            "started": self.started,
            "commit": self.commit,
            "out": str(self.out),
            "failed": any(s.status == "failed" for s in self.stages),
            "stages": [asdict(s) for s in self.stages],
        }
        (self.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")

    def _budget_spent(self) -> str | None:
        """Why nothing more may start (the --budget is spent), or None."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return f"the --budget of {self.args.budget:g} s was spent before it"
        return None

    def _child_limit(self) -> tuple[float, str]:
        """(seconds a child process started now may run, which limit that is): --timeout, or what is left of --budget."""
        left = None if self.deadline is None else round(max(self.deadline - time.monotonic(), 0.0), 1)
        if left is not None and left < self.args.timeout:
            return left, f"the end of the --budget of {self.args.budget:g} s"
        return self.args.timeout, f"the --timeout of {self.args.timeout:g} s"

    def _run_logged(
        self, command: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, str | None]:
        """Runs `command` (with `env` added to the environment), its output streamed to the console
        (indented) and into `log`. Killed (with its process group) at the _child_limit.
        Returns (exit status, why it was killed or None)."""
        env = os.environ | {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5"} | (env or {})
        if self.commit != "unknown":
            env["NEOXFUSE_COMMIT"] = self.commit  # what bench.common.write_results records
        seconds, limit = self._child_limit()
        timed_out = threading.Event()
        with open(log, "w") as out:
            out.write("$ " + " ".join(command) + "\n")
            child = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                text=True,
                start_new_session=True,
            )

            def kill() -> None:
                timed_out.set()
                os.killpg(child.pid, signal.SIGKILL)

            timer = threading.Timer(seconds, kill)
            timer.start()
            try:
                for line in child.stdout:
                    out.write(line)
                    sys.stdout.write("    " + line)
                    sys.stdout.flush()
            finally:
                timer.cancel()
            status = child.wait()
        return status, f"killed after {seconds} s, {limit}" if timed_out.is_set() else None

    def _exit_reason(self, status: int, killed: str | None, log: Path) -> str:
        where = log.relative_to(self.out)
        return f"{killed} (see {where})" if killed else f"exit status {status} (see {where})"

    def _update_results(self, suite: str, change) -> None:
        """Applies change(result dict) to each results file the suite's bench stage wrote."""
        for path in self.suite_results.get(suite, []):
            data = json.loads(path.read_text())
            change(data)
            path.write_text(json.dumps(data, indent=2) + "\n")

    # -- stages --------------------------------------------------------------------------------

    def environment(self) -> Outcome:
        import torch

        from neoxfuse import _lib
        from neoxfuse.device import devices
        from neoxfuse.errors import NeoxfuseError

        ncu = profile.find_ncu()
        report: dict = {
            "commit": self.commit,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "neoxfuse": {"version": neoxfuse.__version__, "package": str(Path(neoxfuse.__file__).parent)},
            "torch": {
                "version": torch.__version__,
                "cuda": torch.version.cuda,
                "cuda_available": torch.cuda.is_available(),
            },
            "nvml": monitor.device_report(),
            "ncu": {"path": ncu, "version": profile.ncu_version(ncu)} if ncu else None,
        }
        problems = []
        try:
            info = _lib.build_info()
            archs = _lib.archs()
            found = devices()
            report["neoxfuse"] |= {"library": str(_lib.library_path()), "build_info": info, "archs": archs}
            report["devices"] = [asdict(d) | {"code": _lib.code_for(d.sm, archs)} for d in found]
            problems += [
                f"the library has no code for {d['name']} (sm_{d['sm']}; it holds {', '.join(archs)})"
                for d in report["devices"]
                if d["code"] is None
            ]
        except NeoxfuseError as err:
            problems.append(f"the neoxfuse library is unusable: {err}")
            found = []
        if not torch.cuda.is_available():
            self.gpu_missing = "no CUDA GPU: " + (
                "torch is a CPU build" if torch.version.cuda is None else "torch sees no device"
            )
        elif not found:
            self.gpu_missing = "no CUDA GPU that the neoxfuse library can use"
        else:
            self.gpu_missing = None
            report["fused_plan"] = fused_plan_in_child(self._child_limit()[0])
        report["gpu_missing"] = self.gpu_missing
        (self.out / "environment.json").write_text(json.dumps(report, indent=2) + "\n")
        gpus = ", ".join(f"{d['name']} (sm_{d['sm']})" for d in report.get("devices", [])) or "no GPU"
        nvml = report["nvml"]
        print(f"    GPU: {gpus}", flush=True)
        print(f"    NVML: driver {nvml['driver_version']}" if nvml.get("available") else f"    NVML: {nvml['reason']}")
        print(f"    library: {report['neoxfuse'].get('build_info', 'not loaded')}")
        print(f"    torch {torch.__version__} (CUDA {torch.version.cuda}); ncu: {ncu or 'not found'}", flush=True)
        if "fused_plan" in report:
            print(f"    {fused_plan_text(report['fused_plan'])}", flush=True)
        if problems:
            return Outcome("failed", "; ".join(problems), report)
        return Outcome("passed", gpus, report)

    def tests(self) -> Outcome:
        folder = self.checkout / "tests"
        if not folder.is_dir():
            return Outcome("failed", f"{folder} does not exist")
        files = sorted({path for glob in self.args.test or ["test_*.py"] for path in folder.glob(glob)})
        if not files:
            return Outcome("failed", f"no test file in {folder} matches {self.args.test}")
        totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
        per_file, failed = {}, []
        marker = "gpu" if self.args.marker is None else f"gpu and ({self.args.marker})"
        for path in files:
            if spent := self._budget_spent():
                failed.append(f"{path.name}: not run, {spent}")
                continue
            log, xml = self.logs / f"tests-{path.stem}.log", self.logs / f"tests-{path.stem}.xml"
            status, killed = self._run_logged(_pytest_command(path, marker, xml), log, cwd=self.checkout)
            if status == 5 and not killed:  # pytest: no test collected, i.e. none carries the markers
                continue
            counts = _junit_counts(xml) if xml.exists() else {}
            per_file[path.name] = counts | {"status": status}
            for key in totals:
                totals[key] += counts.get(key, 0)
            if status != 0 or killed:
                failed.append(f"{path.name}: {self._exit_reason(status, killed, log)}")
        if not per_file and not failed:
            reason = "no test carries the gpu marker"
            if self.args.marker is not None:
                reason += f" and --marker {self.args.marker}"
            return Outcome("skipped", reason, totals)
        summary = _count_summary(totals)
        details = totals | {"files": per_file}
        if failed:
            return Outcome("failed", f"{summary}; " + "; ".join(failed), details)
        return Outcome("passed", summary, details)

    def sanitize(self, sanitizer: str, tool: str) -> Outcome:
        log, xml = self.logs / f"sanitize-{tool}.log", self.logs / f"sanitize-{tool}.xml"
        command = [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_FOUND_ERRORS)]
        command += _pytest_command(self.checkout / "tests", "gpu and sanitize", xml)
        status, killed = self._run_logged(
            command, log, cwd=self.checkout, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        )
        counts = _junit_counts(xml) if xml.exists() else {}
        summary = _count_summary(counts)
        if status == 0 and not killed:
            return Outcome("passed", f"{summary}; {tool} reported no error", counts)
        if status == 5 and not killed:
            return Outcome("skipped", "no test carries the sanitize marker", counts)
        where = log.relative_to(self.out)
        if status != 0 and SANITIZER_UNSUPPORTED.lower() in log.read_text(errors="replace").lower():
            return Outcome("skipped", f"compute-sanitizer cannot check this GPU here: it says {SANITIZER_UNSUPPORTED!r} "
                           f"(see {where}; so it does on gVisor machines)", counts)
        if status == SANITIZER_FOUND_ERRORS and not killed:
            return Outcome("failed", f"{summary}; {tool} reported errors (see {where})", counts)
        return Outcome("failed", f"{summary or 'no test report'}; {self._exit_reason(status, killed, log)}", counts)

    def bench_suite(self, suite: Suite) -> Outcome:
        log = self.logs / f"bench-{suite.module}.log"
        before = set(self.results.glob("*.json"))
        with monitor.GpuMonitor(interval_s=self.args.nvml_interval) as gpu:
            status, killed = self._run_logged(
                [
                    sys.executable,
                    "-m",
                    "neoxfuse.pipeline",
                    "_suite",
                    suite.path,
                    str(self.results),
                    *self._suite_args(suite),
                ],
                log,
            )
        nvml = gpu.summary()
        written = sorted(set(self.results.glob("*.json")) - before)
        self.suite_results[suite.module] = written
        self._update_results(suite.module, lambda data: monitor.annotate(data, nvml))
        details = {"results": [str(p.relative_to(self.out)) for p in written], "nvml": nvml}
        if status != 0 or killed:
            return Outcome("failed", self._exit_reason(status, killed, log), details)
        if not written:
            return Outcome("failed", f"the suite wrote no results file into {self.results}", details)
        flags = []
        if nvml.get("throttled"):
            flags.append("FLAGGED throttled: " + ", ".join(nvml["throttle_reasons"]))
        if nvml.get("gpu_shared"):
            flags.append("FLAGGED shared the GPU with " + ", ".join(str(p["pid"]) for p in nvml["other_processes"]))
        if not nvml.get("available"):
            flags.append("NVML " + nvml["reason"])
        verdicts = target_verdicts(written)
        return Outcome("passed", "; ".join([f"{len(written)} results file(s)", *filter(None, [verdicts]), *flags]), details)

    def profile_suite(self, suite: Suite, ncu: str) -> Outcome:
        log = self.logs / f"profile-{suite.module}.log"
        report = self.profiles / f"{suite.module}.ncu-rep"
        extra = self._suite_args(suite) + [
            str(a) for a in getattr(importlib.import_module(suite.path), "PROFILE_ARGS", [])
        ]
        with tempfile.TemporaryDirectory(
            prefix=f"profile-{suite.module}-", dir=self.out
        ) as scratch:  # timings under ncu are discarded
            program = [sys.executable, "-m", "neoxfuse.pipeline", "_suite", suite.path, scratch, *extra]
            status, killed = self._run_logged(
                profile.profile_command(ncu, str(report.with_suffix("")), program), log
            )
        output = log.read_text()
        if (blocked := profile.counters_unavailable(output)) is not None:
            return self._attach_ncu(
                suite, Outcome("skipped", f"ncu cannot read the GPU's performance counters here: {blocked}")
            )
        if status != 0 or killed:
            errors = [line for line in output.splitlines() if line.startswith("==ERROR==")]
            return self._attach_ncu(
                suite, Outcome("failed", "; ".join(errors[:3] + [self._exit_reason(status, killed, log)]))
            )
        if not report.exists():
            return self._attach_ncu(
                suite, Outcome("skipped", "the suite launched no neoxfuse kernel, so ncu wrote no report")
            )
        kernels = profile.read_report(ncu, str(report))
        summary = {
            "tool": f"ncu {profile.ncu_version(ncu)}",
            "sections": list(profile.SECTIONS),
            "clock_control": profile.CLOCK_CONTROL,
            "kernel_filter": profile.KERNEL_FILTER,
            "report": str(report.relative_to(self.out)),
            "kernels": kernels,
        }
        return self._attach_ncu(suite, Outcome("passed", f"{len(kernels)} kernel(s) profiled", summary))

    def _attach_ncu(self, suite: Suite, outcome: Outcome) -> Outcome:
        """Puts the profile summary (or why there is none) into the suite's results files as "ncu"."""
        summary = (
            outcome.details
            if outcome.status == "passed"
            else {"kernels": [], "reason": f"{outcome.status}: {outcome.reason}"}
        )
        self._update_results(suite.module, lambda data: data.update(ncu=summary))
        return outcome

    def dashboard(self) -> Outcome:
        from neoxfuse.dashboard import build

        history = self.args.history or (self.checkout / "bench" / "results" if self.checkout else None)
        sources = [p for p in (history, self.results) if p is not None and p.is_dir()]
        page = build(sources, self.out / "dashboard" / "index.html")
        return Outcome("passed", str(page.relative_to(self.out)), {"sources": [str(p) for p in sources]})

    # -- the whole run -------------------------------------------------------------------------

    def run(self) -> int:
        print(f"neoxfuse GPU pipeline -> {self.out} (commit {self.commit})", flush=True)
        skipped = set(self.args.skip or [])
        self.run_stage("environment", self.environment)

        if "tests" in skipped:
            self.skip("tests", "--skip tests")
        elif self.checkout is None:
            self.skip("tests", "no checkout given (--tests CHECKOUT)")
        elif self.gpu_missing:
            self.skip("tests", self.gpu_missing)
        else:
            self.run_stage("tests", self.tests)
        self._sanitize_all(skipped)

        benched = self._bench_all(skipped)
        self._profile_all(skipped, benched)

        if "dashboard" in skipped:
            self.skip("dashboard", "--skip dashboard")
        else:
            self.run_stage("dashboard", self.dashboard)
        return self._finish()

    def _sanitize_all(self, skipped: set[str]) -> None:
        sanitizer = find_sanitizer()
        if "sanitize" in skipped:
            reason = "--skip sanitize"
        elif self.checkout is None:
            reason = "no checkout given (--tests CHECKOUT)"
        elif self.gpu_missing:
            reason = self.gpu_missing
        elif sanitizer is None:
            reason = "compute-sanitizer not found (not on PATH, not in /usr/local/cuda*)"
        else:
            for index, tool in enumerate(SANITIZER_TOOLS):
                stage = self.run_stage(f"sanitize:{tool}", self.sanitize, sanitizer, tool)
                if stage.status == "skipped" and SANITIZER_UNSUPPORTED in stage.reason:  # so would the other tools
                    for later in SANITIZER_TOOLS[index + 1 :]:
                        self.skip(f"sanitize:{later}", f"{stage.reason} (sanitize:{tool})")
                    break
            return
        self.skip("sanitize", reason)

    def _suite_args(self, suite: Suite) -> list[str]:
        """The arguments --suite-args gives this suite (by module or SUITE name)."""
        for given in self.args.suite_args or []:
            name, _, text = given.partition("=")
            if name in (suite.module, suite.name):
                return shlex.split(text)
        return []

    def _selected(self, *names: str) -> bool:
        return not self.args.suite or bool(set(names) & set(self.args.suite))

    def _bench_all(self, skipped: set[str]) -> list[Suite]:
        """Runs the bench stages; returns the suites whose benchmark passed."""
        if "bench" in skipped:
            self.skip("bench", "--skip bench")
            return []
        suites, broken, missing = discover_suites()
        if missing:
            self.skip("bench", missing)
            return []
        present = {s.module for s in suites} | set(broken)
        for module in EXPECTED_SUITES:
            if module not in present and self._selected(module):
                self.skip(f"bench:{module}", f"no neoxfuse.bench.{module} module in this build yet")
        for module, error in broken.items():
            if self._selected(module):
                self._record(Stage(f"bench:{module}", "failed", f"does not import: {error}"))
        passed = []
        for suite in suites:
            if not self._selected(suite.module, suite.name):
                continue
            if self.gpu_missing:
                self.skip(f"bench:{suite.module}", self.gpu_missing)
            elif self.run_stage(f"bench:{suite.module}", self.bench_suite, suite).status == "passed":
                passed.append(suite)
        return passed

    def _profile_all(self, skipped: set[str], benched: list[Suite]) -> None:
        ncu = profile.find_ncu()
        if "profile" in skipped:
            reason = "--skip profile"
        elif self.gpu_missing:
            reason = self.gpu_missing
        elif not benched:
            reason = "no benchmark passed, so there is nothing to profile"
        elif ncu is None:
            reason = "ncu not found (not on PATH, not at /opt/nvidia/nsight-compute/*/ncu)"
        else:
            reason = None
        if reason is not None:
            self.skip("profile", reason)
            for suite in benched:
                self._attach_ncu(suite, Outcome("skipped", reason))
            return
        for suite in benched:
            if reason is not None:  # ncu could not read counters for an earlier suite: it cannot for this one
                self._attach_ncu(suite, Outcome("skipped", reason))
                self.skip(f"profile:{suite.module}", reason)
                continue
            stage = self.run_stage(f"profile:{suite.module}", self.profile_suite, suite, ncu)
            if stage.status == "skipped" and "performance counters" in stage.reason:
                reason = stage.reason

    def _finish(self) -> int:
        print("\nstage                      status   seconds  reason")
        for s in self.stages:
            print(f"{s.name:<26} {s.status:<8} {s.seconds:>7.1f}  {s.reason}")
        for path in (path for written in self.suite_results.values() for path in written):
            data = json.loads(path.read_text())
            if data.get("targets"):
                partial = " (stopped part-way: from the runs it finished)" if data.get("complete") is False else ""
                print("\n" + "\n".join(target_lines(f"targets checked by {path.relative_to(self.out)}{partial}:", data["targets"])))
        failed = [s.name for s in self.stages if s.status == "failed"]
        print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'no stage failed'}; everything is in {self.out}")
        self.write_report()
        return 1 if failed else 0


FUSED_PLAN_MODEL = "pythia-2.8b"


def fused_plan_report() -> dict:
    """The fused decoder's launch plan for FUSED_PLAN_MODEL on the current GPU, and how many
    attn_mlp_in clusters of each size 1..8 the GPU runs at once (its GPC layout shows there), or
    why there is none."""
    from neoxfuse.configs import pythia_config, shape_of
    from neoxfuse.errors import NeoxfuseError
    from neoxfuse.ops import fused_decoder

    shape = shape_of(pythia_config(FUSED_PLAN_MODEL))
    try:
        return {
            "model": FUSED_PLAN_MODEL,
            "plan": asdict(fused_decoder.plan(shape)),
            "clusters_at_once": fused_decoder.clusters_at_once(shape),
        }
    except NeoxfuseError as err:
        return {"model": FUSED_PLAN_MODEL, "unavailable": str(err)}


def fused_plan_in_child(timeout: float) -> dict:
    """fused_plan_report() from a child process: making a plan creates a CUDA context, which the
    pipeline's own process must not hold, or the benchmarks' monitors would see it on the GPU."""
    command = [sys.executable, "-m", "neoxfuse.pipeline", "_fused_plan"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": FUSED_PLAN_MODEL, "unavailable": f"the plan's process was killed after {timeout} s"}
    if done.returncode != 0:
        return {"model": FUSED_PLAN_MODEL, "unavailable": f"the plan's process failed: {done.stderr.strip()[-1000:]}"}
    return json.loads(done.stdout)


def fused_plan_text(report: dict) -> str:
    """One line of fused_plan_report()."""
    if "unavailable" in report:
        return f"fused plan ({report['model']}): none: {report['unavailable']}"
    grids = ", ".join(f"{name} {grid['clusters']} x {grid['cluster_size']}" for name, grid in report["plan"].items())
    at_once = " ".join(f"{size}:{count}" for size, count in report["clusters_at_once"].items())
    return f"fused plan ({report['model']}): {grids} (clusters x blocks); clusters at once by size: {at_once}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m neoxfuse.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    parser.add_argument(
        "--tests", type=Path, metavar="CHECKOUT", help="a checkout of this repository: runs pytest -m gpu on its tests/"
    )
    parser.add_argument("--out", type=Path, default=Path(f"neoxfuse-pipeline-{stamp}"), help="the run's output folder")
    parser.add_argument(
        "--commit", help="the commit being checked (default: $NEOXFUSE_COMMIT, else git rev-parse HEAD in CHECKOUT)"
    )
    parser.add_argument(
        "--history", type=Path, help="earlier results for the dashboard (default: CHECKOUT/bench/results)"
    )
    parser.add_argument(
        "--test", action="append", metavar="GLOB", help="test files of CHECKOUT/tests to run (repeatable; default test_*.py)"
    )
    parser.add_argument(
        "--marker", metavar="EXPR", help="run only the GPU tests that also match this pytest marker expression"
    )
    parser.add_argument("--suite", action="append", help="run only this bench suite (repeatable; module or SUITE name)")
    parser.add_argument(
        "--suite-args",
        action="append",
        metavar="SUITE=ARGS",
        help="arguments for one suite's runs, e.g. --suite-args 'decode=--lengths 16,256' (repeatable)",
    )
    parser.add_argument("--skip", action="append", choices=STAGES, help="leave out a stage (repeatable)")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds any one child process may run (default 3600)"
    )
    parser.add_argument(
        "--budget", type=float, help="seconds the whole run may take: later stages are skipped, a running child is killed"
    )
    parser.add_argument("--nvml-interval", type=float, default=0.1, help="seconds between NVML samples (default 0.1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_suite"]:
        return run_suite(argv[1:])
    if argv[:1] == ["_fused_plan"]:
        print(json.dumps(fused_plan_report()))
        return 0
    return Pipeline(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
