"""Prints one line counting the test cases Bazel ran: 'tests: N passed, N failed, N skipped'.

Bazel reports targets; each pytest target writes JUnit XML (tests/pytest_main.py), so the
cases are summed from bazel-testlogs/**/test.xml. Exit status 1 if any case failed or errored.
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(testlogs: str) -> int:
    passed = failed = skipped = 0
    for xml in sorted(Path(testlogs).rglob("test.xml")):
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            elif case.find("skipped") is not None:
                skipped += 1
            else:
                passed += 1
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bazel-testlogs"))
