#!/usr/bin/env bash
# Installs the wheel Bazel built into a fresh virtual environment, as a user would, and runs
# `neoxfuse env` from it (no NEOXFUSE_LIB: the library must come from the wheel).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheel=$("$root/ci/wheel_path")
fresh=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$fresh")"' EXIT
python3 -m venv "$fresh"
"$fresh/bin/python" -m pip install -q "$wheel" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
cd "$(dirname "$fresh")"
env -u NEOXFUSE_LIB "$fresh/bin/neoxfuse" env
