"""tests/pytest_main.py, Bazel's runner for every test file: with Bazel's sharding variables set,
the shards run disjoint sets of test cases that together are all of them."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "pytest_main.py"


def _run(test_file: Path, tmp_path: Path, **env: str) -> tuple[int, set[str]]:
    """Exit status and the test cases of the runner's JUnit XML, run as Bazel would with `env`."""
    xml = tmp_path / f"{'-'.join(env.values()) or 'all'}.xml"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TEST_") and k != "XML_OUTPUT_FILE"}
    status = subprocess.run([sys.executable, str(RUNNER), str(test_file)], cwd=tmp_path, capture_output=True,
                            env=clean | env | {"XML_OUTPUT_FILE": str(xml)}).returncode
    return status, {case.get("name") for case in ElementTree.parse(xml).getroot().iter("testcase")}


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_split_the_test_cases_between_them(tmp_path, shards):
    test_file = tmp_path / "test_cases.py"
    test_file.write_text("import pytest\n\n@pytest.mark.parametrize('n', range(7))\ndef test_case(n):\n    pass\n")
    status, everything = _run(test_file, tmp_path)
    assert status == 0 and len(everything) == 7
    seen: list[str] = []
    for index in range(shards):
        status_file = tmp_path / f"shard-{index}"
        status, cases = _run(test_file, tmp_path, TEST_TOTAL_SHARDS=str(shards), TEST_SHARD_INDEX=str(index),
                             TEST_SHARD_STATUS_FILE=str(status_file))
        assert status == 0 and status_file.exists()  # the file tells Bazel the runner shards
        assert 7 // shards <= len(cases) <= -(-7 // shards)
        seen += cases
    assert sorted(seen) == sorted(everything)  # each case in exactly one shard
