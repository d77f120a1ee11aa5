"""Fault injection for the resume tests and benchmarks/fault_matrix.py, installed only by them:

    DUALIGN_FAULT="<where>:<SIGNAL>" python -m dualign.tools.faults [train.py overrides]

runs the training job and sends the signal to the process once, where <where> is `step=<n>` (before optimiser step n,
mid-epoch) or the start of the n-th (default first) timed stage whose name starts with it: `stage=rollouts`,
`stage=exact evaluation#2`, `stage=writing`. The library only offers the hooks (util.timing.observers,
training.fit.extra_callbacks); nothing here runs in a plain `python train.py`."""
from __future__ import annotations

import os
import signal

import lightning as L

from dualign import cli
from dualign.training import fit
from dualign.util import timing

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


def at_stage(name: str) -> None:
    spec = _spec()
    if spec and spec[0] == "stage" and name.startswith(spec[1]):
        _seen[spec[1]] = _seen.get(spec[1], 0) + 1
        if _seen[spec[1]] == spec[2]:
            _send(spec[3])


class StepFault(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        spec = _spec()
        if spec and spec[0] == "step" and int(spec[1]) == trainer.global_step:
            _send(spec[3])


def install() -> None:
    timing.observers.append(at_stage)
    fit.extra_callbacks.append(StepFault())


if __name__ == "__main__":
    install()
    cli.main()
