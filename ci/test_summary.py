"""Prints one line counting the test cases Bazel ran: 'tests: N passed, N failed, N skipped'.

Bazel reports targets; each pytest target writes JUnit XML (tests/pytest_main.py), so the
cases are summed from bazel-testlogs/<package>/<name>/test.xml of the test targets named on the
command line (`bazel query 'tests(//...)'`). Only those: bazel-testlogs also keeps the logs of
targets since removed. Exit status 1 if any case failed or errored, or a target left no log.

Usage: test_summary.py TESTLOGS //package:target...
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def log_of(testlogs: Path, label: str) -> Path:
    """//tests:test_cli -> TESTLOGS/tests/test_cli/test.xml"""
    package, name = label.removeprefix("//").split(":")
    return testlogs / package / name / "test.xml"


def main(testlogs: str, labels: list[str]) -> int:
    passed = failed = skipped = 0
    missing = []  # one line per target without a log
    for label in labels:
        log = log_of(Path(testlogs), label)
        if not log.is_file():
            missing.append(f"test_summary: {label} left no {log}")
            continue
        for case in ET.parse(log).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            elif case.find("skipped") is not None:
                skipped += 1
            else:
                passed += 1
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    for line in missing:
        print(line, file=sys.stderr)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
