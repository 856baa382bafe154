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


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in [minimum, maximum] (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, *,
           exclusive_minimum: bool = False) -> Callable[[str], float]:
    """A finite float in [minimum, maximum] (``exclusive_minimum``: strictly above ``minimum``).
    NaN and infinity are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None:
            if exclusive_minimum and value <= minimum:
                raise argparse.ArgumentTypeError(f"must be greater than {minimum:g}, got {value:g}")
            if not exclusive_minimum and value < minimum:
                raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


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
