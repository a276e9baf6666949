"""The issues' targets as a benchmark suite checks them: a value measured in the run against a bound.

    target("median us", "1x2560x7680:g128", 6.1, 8.0, at_most=True)   # met: 6.1 <= 8.0

A suite keeps its targets in its results file under "targets"; the pipeline's summary and the
dashboard read them back. No torch here, so that both can without loading it.
"""

from __future__ import annotations


def target(name: str, shape: str, value: float | None, threshold: float, *, at_most: bool = False) -> dict:
    """One of an issue's targets as measured: {target, shape, value, threshold, at_most, met}, where met is
    value <= threshold (at_most) or value >= threshold, and None when value is None (not measured)."""
    met = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"target": name, "shape": shape, "value": value, "threshold": threshold, "at_most": at_most, "met": met}


def verdict(t: dict) -> str:
    """'met', 'NOT met' or 'not measured'."""
    return "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")


def bound(t: dict) -> str:
    """The bound a value must keep, e.g. '<= 8.0' or '>= 2.5'."""
    return f"{'<=' if t['at_most'] else '>='} {t['threshold']}"


def target_lines(title: str, targets: list[dict]) -> list[str]:
    """The targets as table lines under `title`: name, shape, value, bound and verdict."""
    lines = [title]
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  {t['target']:<36} {t['shape']:<36} {value} ({bound(t)}): {verdict(t)}")
    return lines
