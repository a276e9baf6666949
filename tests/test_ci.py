"""CI's own scripts on made-up Bazel outputs: the test-case summary counts the current targets'
logs only (bazel-testlogs keeps those of removed targets) and fails on a target without a log."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "ci" / "test_summary.py"

CASES = {"passed": "", "failed": "<failure message='x'/>", "errored": "<error message='x'/>", "skipped": "<skipped/>"}


def write_log(testlogs: Path, label: str, *outcomes: str) -> None:
    package, name = label.removeprefix("//").split(":")
    log = testlogs / package / name / "test.xml"
    log.parent.mkdir(parents=True)
    cases = "".join(f"<testcase name='c{i}'>{CASES[outcome]}</testcase>" for i, outcome in enumerate(outcomes))
    log.write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")


def summarize(testlogs: Path, *labels: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUMMARY), str(testlogs), *labels], capture_output=True, text=True, check=False)


def test_counts_cases_of_the_named_targets(tmp_path):
    write_log(tmp_path, "//tests:test_a", "passed", "passed", "skipped")
    write_log(tmp_path, "//tests/sub:test_b", "passed", "skipped")
    result = summarize(tmp_path, "//tests:test_a", "//tests/sub:test_b")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tests: 3 passed, 0 failed, 2 skipped\n"


@pytest.mark.parametrize("outcome", ["failed", "errored"])
def test_a_failed_case_fails_the_summary(tmp_path, outcome):
    write_log(tmp_path, "//tests:test_a", "passed", outcome)
    result = summarize(tmp_path, "//tests:test_a")
    assert result.returncode == 1
    assert result.stdout == "tests: 1 passed, 1 failed, 0 skipped\n"


def test_a_removed_targets_leftover_log_is_not_counted(tmp_path):
    write_log(tmp_path, "//tests:test_a", "passed")
    write_log(tmp_path, "//tests:test_removed", "failed", "passed")
    result = summarize(tmp_path, "//tests:test_a")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tests: 1 passed, 0 failed, 0 skipped\n"


def test_a_target_without_a_log_fails_the_summary_by_name(tmp_path):
    write_log(tmp_path, "//tests:test_a", "passed")
    result = summarize(tmp_path, "//tests:test_a", "//tests:test_silent")
    assert result.returncode == 1
    assert "//tests:test_silent left no" in result.stderr


def test_no_targets_is_a_usage_error(tmp_path):
    result = summarize(tmp_path)
    assert result.returncode == 1
    assert "Usage" in result.stderr
