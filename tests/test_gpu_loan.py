"""ci/gpu_loan on a CPU machine, with a stand-in Python that records each call and writes what a
pipeline run would: the parts run in order, each until its end of the loan, and $OUT gets few
files (a lent machine returns at most 8) that hold everything but the Nsight Compute reports,
which come apart."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["1-quick", "2-decode", "3-kernels", "4-rest"]
RUN_FILES = ["pipeline.json", "results/decode-x.json", "logs/test_a.log", "profiles/suite.ncu-rep"]

STAND_IN = f"""#!{sys.executable}
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
if args[:1] == ["-c"]:
    sys.exit(0)
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": args, "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                            "commit": os.environ.get("NEOXFUSE_COMMIT")}}) + "\\n")
if args[:2] == ["-m", "pip"]:
    sys.exit(0)
out = Path(args[args.index("--out") + 1])
for name in {RUN_FILES!r}:
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(out.name)
(out / "profiles/suite.ncu-rep").write_bytes(os.urandom(int(os.environ.get("PROFILE_BYTES", "0"))) or b"ncu")
time.sleep(float(os.environ.get("PART_SECONDS", "0")))
sys.exit(1 if out.name == os.environ.get("FAILING_PART") else 0)
"""


@pytest.fixture
def checkout(tmp_path):
    """A checkout holding only the two scripts, and the stand-in Python."""
    (tmp_path / "ci").mkdir()
    for script in ("gpu_loan", "gpu_pipeline"):
        shutil.copy2(ROOT / "ci" / script, tmp_path / "ci" / script)
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    (tmp_path / "out").mkdir()
    return tmp_path


def loan(checkout: Path, seconds: int, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    calls = checkout / "calls.jsonl"
    environment = {**os.environ, "OUT": str(checkout / "out"), "PYTHON": str(checkout / "python"), "CALLS": str(calls), **env}
    environment.pop("PYTHONPATH", None)
    done = subprocess.run([str(checkout / "ci" / "gpu_loan"), "run", str(seconds)], env=environment, capture_output=True,
                          text=True, check=False)
    return done, [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def pipeline_runs(calls: list[dict]) -> dict[str, int]:
    """{part: its --budget} in call order."""
    runs = {}
    for call in calls:
        argv = call["argv"]
        if argv[:2] == ["-m", "neoxfuse.pipeline"]:
            runs[Path(argv[argv.index("--out") + 1]).name] = int(argv[argv.index("--budget") + 1])
    return runs


def members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {m.name for m in tar.getmembers() if m.isfile()}


def test_the_parts_run_in_order_until_their_ends_and_come_back_as_few_files(checkout):
    done, calls = loan(checkout, 400)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = pipeline_runs(calls)
    assert list(runs) == PARTS
    markers = [call["argv"][call["argv"].index("--marker") + 1] for call in calls if "--marker" in call["argv"]]
    assert markers == ["sanitize or quick", "not (sanitize or quick)"]  # 1-quick's tests, then 4-rest's: all, once
    for part, end in zip(PARTS, (120, 300, 400, 400), strict=True):
        assert end - 2 <= runs[part] <= end, runs  # each took ~0 s: the time to its end is all its own
    out = checkout / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{part}.tgz" for part in PARTS), "profiles.tgz", "loan.log"])
    assert all(p.is_file() for p in out.iterdir())
    for part in PARTS:
        assert members(out / f"{part}.tgz") == {f"{part}/{name}" for name in RUN_FILES if not name.endswith(".ncu-rep")}
    assert members(out / "profiles.tgz") == {f"./{part}/profiles/suite.ncu-rep" for part in PARTS}
    assert "failed parts: none" in (out / "loan.log").read_text()


def test_the_kernel_part_measures_ln_residual_at_its_targets_shapes(checkout):
    import shlex

    from neoxfuse.bench import ln_residual

    _, calls = loan(checkout, 400)
    argv = next(call["argv"] for call in calls if any(arg.endswith("/3-kernels") for arg in call["argv"]))
    given = dict(argv[i + 1].partition("=")[::2] for i, arg in enumerate(argv) if arg == "--suite-args")
    words = shlex.split(given["ln_residual"])
    assert {words[i + 1] for i, word in enumerate(words) if word == "--shape"} == {ln_residual.DECODE_TARGET,
                                                                                     ln_residual.PREFILL_TARGET}


def test_a_part_gets_what_is_left_of_its_time_and_is_skipped_with_too_little(checkout):
    done, calls = loan(checkout, 60, PART_SECONDS="2")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = pipeline_runs(calls)
    assert "1-quick" not in runs and "== 1-quick: skipped, 18 s left" in done.stdout  # 30% of 60 s < 20 s
    assert 44 <= runs["2-decode"] <= 45
    assert 48 <= runs["3-kernels"] <= 58  # the loan's end less 2-decode's 2 s and more (slack for a busy machine)
    assert 40 <= runs["4-rest"] <= runs["3-kernels"] - 2


def test_a_failed_part_fails_the_loan_and_the_later_parts_still_run(checkout):
    done, calls = loan(checkout, 400, FAILING_PART="2-decode")
    assert done.returncode == 1
    assert list(pipeline_runs(calls)) == PARTS
    assert "failed parts: 2-decode;" in (checkout / "out" / "loan.log").read_text()


def test_a_carried_wheel_is_installed_and_its_commit_recorded(checkout):
    dist = checkout / "dist"
    dist.mkdir()
    (dist / "neoxfuse-0.1.0-py3-none-any.whl").write_text("")
    (dist / "COMMIT").write_text("0123abc\n")
    done, calls = loan(checkout, 400)
    assert done.returncode == 0, done.stdout + done.stderr
    install = calls[0]["argv"]
    assert install[:3] == ["-m", "pip", "install"] and install[-1] == str(dist / "neoxfuse-0.1.0-py3-none-any.whl")
    assert install[install.index("--target") + 1] == "/tmp/site"
    for call in calls[1:]:
        assert call["PYTHONPATH"].split(":")[0] == "/tmp/site" and call["commit"] == "0123abc"


def test_reports_too_large_to_come_back_are_left_out_and_the_rest_kept(checkout):
    done, _ = loan(checkout, 400, PROFILE_BYTES=str(5 * 1024 * 1024))  # 4 parts: 20 MiB of incompressible reports
    assert done.returncode == 0, done.stdout + done.stderr
    out = checkout / "out"
    assert not (out / "profiles.tgz").exists() and "profiles.tgz left out: over 16 MiB" in done.stdout
    assert all((out / f"{part}.tgz").is_file() for part in PARTS)


def test_without_OUT_it_says_so(checkout):
    environment = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run([str(checkout / "ci" / "gpu_loan"), "run"], env=environment, capture_output=True, text=True,
                          check=False)
    assert done.returncode != 0 and "set OUT" in done.stderr
