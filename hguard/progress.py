"""Progress bars for the long offline steps (sampling, features, evaluation, organism builds).

One wrapper over tqdm so every long loop reports the same way: on stderr, with a count and an ETA,
silent when `HGUARD_PROGRESS=0`. Where stderr is not a terminal (a log file, CI), a bar redraws at most
every 30 seconds so the log stays readable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled() -> bool:
    """Bars are drawn unless HGUARD_PROGRESS is 0 (or false, no)."""
    return os.environ.get("HGUARD_PROGRESS", "1").lower() not in ("0", "false", "no")


def _options(desc: str, total: int | None, unit: str) -> dict:
    interactive = sys.stderr.isatty()
    return dict(desc=desc, total=total, unit=unit, file=sys.stderr, disable=not enabled(), leave=True,
                dynamic_ncols=interactive, mininterval=0.5 if interactive else 30.0)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`iterable`, with a bar on stderr named `desc` (count, rate and ETA)."""
    return iter(tqdm(iterable, **_options(desc, total, unit)))


def bar(desc: str, total: int | None, unit: str = "it") -> tqdm:
    """A bar to `update(n)` by hand, for loops that advance by more than one item (batches of rows)."""
    return tqdm(**_options(desc, total, unit))
