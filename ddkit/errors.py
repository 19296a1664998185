"""The one exception type for bad input: its message is a single line naming the field and the value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class DDKitError(Exception):
    """Bad input (a config value, a file, a tensor). The CLI prints the message alone and exits non-zero."""


def check(condition: bool, field: str, message: str, value: object) -> None:
    """Raise ``DDKitError("<field>: <message>, got <value>")`` unless ``condition`` holds."""
    if not condition:
        raise DDKitError(f"{field}: {message}, got {value!r}")


def check_int(value: Any, field: str, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]``, else one DDKitError.

    Floats are refused even when whole (``8.0``, ``1e15``): a count read from a file or config is written as an
    integer by ddkit, so anything else was edited. ``bool`` is refused too (Python counts it as an int).
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value <= high):
        return value
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise DDKitError(f"{field}: must be an integer {bounds}, got {value!r}")


def check_mapping(value: Any, field: str) -> dict:
    """``value`` as a dict if it is a mapping with string keys, else one DDKitError."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise DDKitError(f"{field}: must be a mapping of names to values, got {value!r}"[:300])
    return dict(value)


def check_finite_numbers(value: Any, field: str, length: int, positive: bool = False) -> tuple[float, ...]:
    """``value`` as a tuple of ``length`` finite numbers (each > 0 when ``positive``), else one DDKitError."""
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)
    if not numbers or len(value) != length:
        kind = "positive finite numbers" if positive else "finite numbers"
        raise DDKitError(f"{field}: must be a list of {length} {kind}, got {value!r}"[:300])
    return tuple(float(v) for v in value)
