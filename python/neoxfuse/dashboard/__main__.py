"""`python -m neoxfuse.dashboard [PATHS] --out FILE [--check [--screenshot PNG]]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neoxfuse.dashboard import build
from neoxfuse.dashboard.browser import BrowserError, ChromiumNotFoundError, check_page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neoxfuse.dashboard", description=__doc__)
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("bench/results")], help="results files or folders")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument(
        "--check", action="store_true", help="load it in headless Chromium; fail on errors or empty plots"
    )
    parser.add_argument("--screenshot", type=Path, help="with --check: save a full-page PNG here")
    args = parser.parse_args(argv)
    page = build(args.paths, args.out)
    print(f"wrote {page}")
    if not args.check:
        return 0
    try:
        report = check_page(page, screenshot=args.screenshot)
    except (ChromiumNotFoundError, BrowserError) as err:
        print(f"check failed: {err}", file=sys.stderr)
        return 1
    problems = report.problems()
    print(f"Chromium shows {len(report.plots)} plots with {sum(p['marks'] for p in report.plots)} data marks")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
