"""Every number a user types is checked where it enters, here, the same way for the CLI and the app.

Each check returns the value as the library wants it or raises `UserError` naming the input, the
allowed range and what was given. Non-finite numbers (nan, inf) are always refused: a NaN learning
rate trains a network of NaNs, an infinite budget matches everything.
"""
from __future__ import annotations

import math

from composer.errors import UserError

_SCALE = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def _text(value) -> str:
    return str(value)[:30]


def whole(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number in [lo, hi]: 3, "3" or 3.0, never 2.5, "abc" or True."""
    if isinstance(value, bool):
        raise UserError(f"{what} must be a whole number, not '{value}'")
    try:
        x = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, not '{_text(value)}'") from None
    if not math.isfinite(x) or x != int(x):
        raise UserError(f"{what} must be a whole number, not '{_text(value)}'")
    return _in_range(int(x), what, lo, hi)


def number(value, what: str, lo: float | None = None, hi: float | None = None, *, above: float | None = None) -> float:
    """A finite number in [lo, hi] (and > `above` when given)."""
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number, not '{value}'")
    try:
        x = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, not '{_text(value)}'") from None
    if not math.isfinite(x):
        raise UserError(f"{what} must be a finite number, not '{_text(value)}'")
    if above is not None and not x > above:
        raise UserError(f"{what} must be greater than {above:g}, got {x:g}")
    return _in_range(x, what, lo, hi)


def count(value, what: str, lo: float | None = None, hi: float | None = None) -> float:
    """A count with an optional k/M/G/T suffix (97170000, 97.17M, 0.1G, 500k), finite and in range."""
    text = str(value).strip()
    scale = _SCALE.get(text[-1:].lower(), 1) if text else 1
    try:
        x = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise UserError(f"{what} must be a number like 97170000 or 97.17M, not '{_text(value)}'") from None
    return number(x, what, lo, hi)


def _in_range(x, what: str, lo, hi):
    if lo is not None and x < lo or hi is not None and x > hi:
        if hi is None:
            raise UserError(f"{what} must be at least {lo:g}, got {x:g}")
        if lo is None:
            raise UserError(f"{what} must be at most {hi:g}, got {x:g}")
        raise UserError(f"{what} must be between {lo:g} and {hi:g}, got {x:g}")
    return x
