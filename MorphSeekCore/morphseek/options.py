"""Argument types for the ``morphseek`` command: numbers are checked when the command line is
parsed, before any file is read or any work starts, so ``--iterations 0`` or ``--lr nan`` is one
clear line (argparse's "argument --lr: ..." and exit status 2), never a traceback or a silent result.

Each factory returns a callable for ``add_argument(type=...)``; its error names the value given and
what is accepted.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _bounded(kind: str, convert: Callable[[str], float], minimum, maximum, exclusive_minimum: bool,
             show: Callable[[float], str]) -> Callable[[str], float]:
    """THE bounded-number parser behind :func:`integer` and :func:`number`: ``convert`` the text
    (its ValueError: "is not a {kind}"), refuse NaN and infinity, check the bounds (``show`` writes
    a bound or value into the message)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None:
            if exclusive_minimum and value <= minimum:
                raise argparse.ArgumentTypeError(f"must be greater than {show(minimum)}, got {show(value)}")
            if not exclusive_minimum and value < minimum:
                raise argparse.ArgumentTypeError(f"must be at least {show(minimum)}, got {show(value)}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {show(maximum)}, got {show(value)}")
        return value

    parse.__name__ = "integer" if convert is int else "number"
    return parse


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in [minimum, maximum] (either bound optional)."""
    return _bounded("whole number", int, minimum, maximum, False, str)


def number(minimum: float | None = None, maximum: float | None = None, *,
           exclusive_minimum: bool = False) -> Callable[[str], float]:
    """A finite float in [minimum, maximum] (``exclusive_minimum``: strictly above ``minimum``).
    NaN and infinity are refused."""
    return _bounded("number", float, minimum, maximum, exclusive_minimum, lambda v: f"{v:g}")


#: Smallest model-grid size along an axis: the backbones halve the grid four times.
MIN_GRID = 16


def grid(text: str) -> tuple[int, int, int]:
    """A model grid: ``D,H,W``, ``DxHxW`` or one number for a cube; each size at least MIN_GRID
    (divisibility by the backbone is checked once the backbone is known)."""
    parts = [p for p in text.lower().replace("x", ",").split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid is D,H,W or DxHxW or one number, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 3
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"a grid is D,H,W or DxHxW or one number, got {text!r}")
    if min(sizes) < MIN_GRID:
        raise argparse.ArgumentTypeError(f"each grid size must be at least {MIN_GRID}, got {text!r}")
    return tuple(sizes)


positive_int = integer(1)
non_negative_int = integer(0)
positive_float = number(0.0, exclusive_minimum=True)
non_negative_float = number(0.0)
finite_float = number()
