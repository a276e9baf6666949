"""Benchmark suites, run as `neoxfuse bench <SUITE>`: one module per suite in this package.

A suite module defines

    SUITE = "decode"              # its name on the command line
    HELP = "..."                  # one line for `neoxfuse bench --help`
    def add_arguments(parser)     # its options, on an argparse parser
    def run(args) -> int          # runs it, prints a table, writes a results file; the exit code

`suites()` finds every such module here with pkgutil, so adding a suite needs no CLI edit.
common.py holds what the suites share (timing, the device record, write_results), targets.py the issues'
targets they check.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def suites() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """({SUITE name: module}, {module name: why it did not import}) over the modules of this package.

    A module that fails to import (a missing optional dependency, say) is reported, not fatal, so
    one broken suite does not take the others or the CLI down with it.
    """
    found: dict[str, ModuleType] = {}
    broken: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in ("common", "targets"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as err:  # any import-time failure of one suite
            broken[info.name] = f"{type(err).__name__}: {err}"
            continue
        if hasattr(module, "SUITE"):
            found[module.SUITE] = module
    return found, broken
