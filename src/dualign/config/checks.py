"""The checks every config section uses: one-line ConfigErrors naming the key and what is allowed."""
from __future__ import annotations

import math
from enum import Enum
from typing import Any

from dualign.errors import ConfigError


def choice(key: str, value: Any, allowed) -> None:
    allowed = [member.value for member in allowed] if isinstance(allowed, type) and issubclass(allowed, Enum) else allowed
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def positive(key: str, value, strict: bool = True) -> None:
    if value is None or not math.isfinite(value) or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} 0")


def within(key: str, value, low: float, high: float, closed: str = "()") -> None:
    """low < value < high, with closed[0] == '[' or closed[1] == ']' allowing the end."""
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if value is None or not (above and below):
        raise ConfigError(f"{key}={value!r} must be in {closed[0]}{low:g}, {high:g}{closed[1]}")
