"""Progress bars for long runs: tqdm on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, *, unit: str = "it", enabled: bool = True) -> tqdm:
    """A bar counting to `total` on stderr; silent when `enabled` is False or stderr is not a TTY."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None if enabled else True)
