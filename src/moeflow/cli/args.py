"""argparse value types that refuse nonsense at the command line, naming the valid range.

Each factory returns a callable for `add_argument(type=...)`; argparse turns its `ArgumentTypeError` into the
usual two-line usage + "argument --x: ..." message and exit status 2, before any model or file is touched.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(low: int, note: str = "") -> Callable[[str], int]:
    """An integer >= `low` (`note` explains a special value, e.g. '0 = off')."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{note}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{note}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its "invalid int value" fallback
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, note: str = "") -> Callable[[str], float]:
    """A finite float in [low, high] (or (low, high] with `low_open`)."""
    lo = "(" if low_open else "["
    hi = "inf)" if math.isinf(high) else f"{high:g}]"
    span = f"{lo}{low:g}, {hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {span}{note}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number in {span}{note}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
THREADS = int_at_least(1, " (torch CPU threads)")
