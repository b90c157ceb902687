"""Number options of bits-replay and bits-server: argparse types with one wording for a bad value."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(text: str, convert: Callable[[str], float], kind: str) -> float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number from `low` (to `high`)."""
    def parse(text: str) -> int:
        value = int(_number(text, int, "whole number"))
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not in {low}..{high}")
        return value
    return parse


def seconds(most: float) -> Callable[[str], float]:
    """A duration: more than 0 and at most `most` seconds."""
    def parse(text: str) -> float:
        value = _number(text, float, "number")
        if not 0 < value <= most:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and at most {most:g}")
        return value
    return parse


def finite(low: float) -> Callable[[str], float]:
    """A finite number, `low` or more."""
    def parse(text: str) -> float:
        value = _number(text, float, "number")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {low:g} or more")
        return value
    return parse
