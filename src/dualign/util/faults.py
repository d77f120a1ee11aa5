"""Fault injection for the resume tests: DUALIGN_FAULT="<where>:<SIGNAL>" sends the signal to this process once,
where <where> is `step=<n>` (at optimiser step n, mid-epoch) or the start of the n-th (default first) timed stage whose
name starts with it: `stage=rollouts`, `stage=exact evaluation#2`, `stage=writing`. Unset (always, outside tests),
every check is one dictionary lookup."""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def _spec() -> tuple[str, str, int, signal.Signals] | None:
    value = os.environ.get("DUALIGN_FAULT")
    if not value:
        return None
    where, _, name = value.rpartition(":")
    kind, _, target = where.partition("=")
    target, _, count = target.partition("#")
    return kind, target, int(count or 1), signal.Signals[name]


def _send(sig: signal.Signals) -> None:
    os.environ.pop("DUALIGN_FAULT")  # once: the handlers that run next must not fire it again
    os.kill(os.getpid(), sig)


def at_step(global_step: int) -> None:
    spec = _spec()
    if spec and spec[0] == "step" and int(spec[1]) == global_step:
        _send(spec[3])


def at_stage(name: str) -> None:
    spec = _spec()
    if spec and spec[0] == "stage" and name.startswith(spec[1]):
        _seen[spec[1]] = _seen.get(spec[1], 0) + 1
        if _seen[spec[1]] == spec[2]:
            _send(spec[3])
