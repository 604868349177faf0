"""Range checks of the core's config dataclasses: one message format for every knob."""

from __future__ import annotations

import numbers
from dataclasses import fields
from typing import Any


def check_ranges(config: Any, ranges: dict[str, tuple[float, float]], int_fields: tuple[str, ...] = ()) -> None:
    """ValueError naming the class and field of the first value outside its [lo, hi] (or not an integer
    where ``int_fields`` asks for one); bools are not numbers here."""
    name = type(config).__name__
    for f in fields(config):
        value = getattr(config, f.name)
        lo, hi = ranges[f.name]
        is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if f.name in int_fields and not is_int:
            raise ValueError(f"{name}.{f.name} must be an integer in [{lo}, {hi}], got {value!r}")
        if not (is_int or isinstance(value, numbers.Real)) or not lo <= value <= hi:
            raise ValueError(f"{name}.{f.name} must be a number in [{lo}, {hi}], got {value!r}")
