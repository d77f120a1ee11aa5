"""Wall time by stage, exclusive of nested stages (a dual step's rollouts inside training count as rollouts, not as
training). `with stage("rollouts"): ...`; `breakdown()` gives seconds per stage since the last `reset()`."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

observers: list[Callable[[str], None]] = []  # called with a stage's name as it starts (tools/faults.py installs one)
_totals: dict[str, float] = defaultdict(float)
_stack: list[list] = []  # [name, start, time spent in nested stages]


@contextmanager
def stage(name: str):
    for observer in observers:
        observer(name)
    start = time.perf_counter()
    _stack.append([name, start, 0.0])
    try:
        yield
    finally:
        _, _, nested = _stack.pop()
        elapsed = time.perf_counter() - start
        _totals[name] += elapsed - nested
        if _stack:
            _stack[-1][2] += elapsed


def breakdown() -> dict[str, float]:
    return dict(_totals)


def reset() -> None:
    _totals.clear()
