#!/usr/bin/env bash
# Sets up everything the build and the tests need, from nothing, and is a no-op when done:
#   1. Bazel: one on PATH, else Debian's bazel-bootstrap (4.2.3) through apt, else bazelisk.
#   2. Debian's chromium, for the dashboard test.
#   3. .bazelrc.offline: the offline stand-ins of third_party/ for this checkout's path.
#   4. The Python environment .venv from requirements.txt (re-made when the file changes).
# Used by ./bazelw, by .ci/run and by the Dockerfile, so all three set up the same way.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NEOXFUSE_VENV:-$root/.venv}
python=${NEOXFUSE_PYTHON:-python3}

say() { echo "[neoxfuse setup] $*" >&2; }

# pip warns about every package a machine-local index lacks; keep its real messages only.
pip_install() {
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v bazel >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    say "no bazel on PATH: installing Debian's bazel-bootstrap"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap >/dev/null
  elif ! command -v bazelisk >/dev/null 2>&1; then
    say "no bazel, no apt-get and no bazelisk: install Bazel 4.2.3 (see README)"; exit 1
  fi
fi

# Headless Chromium for the dashboard test (tests/test_dashboard.py loads the page in it).
# Debian's package only: Ubuntu's `chromium` is a snap stub that does not run in containers.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && grep -q '^ID=debian' /etc/os-release; then
  say "installing Debian's chromium (the dashboard test loads the page in it)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# Bazel 4.2.3 takes only absolute paths in --override_repository (.bazelrc imports this file).
for repo in rules_cc rules_java remote_coverage_tools; do
  echo "common --override_repository=$repo=$root/third_party/$repo"
done >"$root/.bazelrc.offline"

stamp="$venv/.requirements.sha256"
want=$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "creating the Python environment $venv (requirements.txt changed or first run)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip_install --upgrade pip
  pip_install -r "$root/requirements.txt"
  echo "$want" >"$stamp"
fi
