"""The results dashboard: one static, self-contained HTML page drawn from bench results JSON.

    python -m neoxfuse.dashboard bench/results [more folders or files] --out dashboard.html [--check]

`build(paths, out)` writes the page (neoxfuse.dashboard.page says what it shows); plots are
inline SVG drawn in Python (neoxfuse.dashboard.svg). `--check` then loads it in headless
Chromium (neoxfuse.dashboard.browser) and fails on console errors or plots without data.
"""

from neoxfuse.dashboard.page import build, load_results, render

__all__ = ["build", "load_results", "render"]
