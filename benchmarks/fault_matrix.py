"""The fault matrix: a signal in each stage of a run, then `ckpt_path=last`; the final lambda against the uninterrupted
run's and the MLflow run's state after the signal and after the resume. About 6 minutes on 2 CPU cores.

    python benchmarks/fault_matrix.py [--out docs/fault_matrix.md]

Signals are sent by the run to itself at a chosen point (DUALIGN_FAULT, read by `python -m dualign.tools.faults`). The exact task with
2 CAID iterations of one epoch (8 optimiser steps each): the stages in order are pi_ref's SFT, its rollouts, the DPO
epochs, each iteration's dual step (rollouts of the policy, then the exact evaluation), the final evaluation, and
writing the run's files."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.sft_steps=80", "reference.samples_per_prompt=64", "algorithm.compare_one_shot=false",
         "trainer.enable_progress_bar=false", "algorithm.iterations=2", "algorithm.epochs_per_iteration=1",
         "policy_step.batch_size=2"]  # 8 optimiser steps an epoch, as tests/test_termination.py
STAGES = {  # stage -> where DUALIGN_FAULT fires
    "pi_ref SFT": "stage=pi_ref SFT",
    "pi_ref rollouts": "stage=rollouts#1",
    "DPO epoch (step 13 of 16)": "step=13",
    "dual step (policy rollouts, 2nd iteration)": "stage=rollouts#3",
    "final exact evaluation": "stage=exact evaluation#3",
    "writing the run's files": "stage=writing",
}


def train(root: Path, run_dir: Path, store: str, *extra: str, fault: str | None = None, cache: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "DUALIGN_FAULT"}
    if fault:
        env["DUALIGN_FAULT"] = fault
    entry = ["-m", "dualign.tools.faults"] if fault else [str(ROOT / "train.py")]  # train.py with the fault hooks
    args = [sys.executable, *entry, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache or root / 'cache'}",
            f"logger.tracking_uri={store}", *SMALL, *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def trajectory(run_dir: Path) -> list:
    return [h["multipliers"] for h in json.loads((run_dir / "summary.json").read_text())["trajectory"]]


def status(store: str, run_dir: Path) -> str:
    path = run_dir / "mlflow_run_id"
    return mlflow.MlflowClient(store).get_run(path.read_text().strip()).info.status if path.is_file() else "(none yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    store = f"sqlite:///{root / 'mlflow.db'}"
    reference = train(root, root / "uninterrupted", store)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = trajectory(root / "uninterrupted")
    rows = ["| stage | signal | exit | MLflow after the signal | lambda difference after resume | MLflow after resume |",
            "|---|---|---|---|---|---|"]
    for stage, where in STAGES.items():
        for signal_name in ("SIGTERM", "SIGKILL"):
            run_dir = root / f"{len(rows)}"
            # the SFT runs only where pi_ref is not cached yet: those cases get a cache of their own
            cache = run_dir / "cache" if "SFT" in stage else None
            stopped = train(root, run_dir, store, fault=f"{where}:{signal_name}", cache=cache)
            after_signal = status(store, run_dir)
            resumed = train(root, run_dir, store, "ckpt_path=last", cache=cache)
            if resumed.returncode != 0:
                rows.append(f"| {stage} | {signal_name} | {stopped.returncode} | {after_signal} | resume failed | |")
                continue
            got = trajectory(run_dir)
            difference = max(abs(a - b) for x, y in zip(expected, got) for a, b in zip(x, y)) if len(got) == len(expected) \
                else float("nan")
            rows.append(f"| {stage} | {signal_name} | {stopped.returncode} | {after_signal} | {difference:.1e} | "
                        f"{status(store, run_dir)} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\nuninterrupted lambda: {expected}\n\n{table}")
    if args.out:
        Path(args.out).write_text(f"# Fault matrix (`python benchmarks/fault_matrix.py`)\n\nUninterrupted lambda per "
                                  f"iteration: {expected}.\n\n{table}\n")


if __name__ == "__main__":
    main()
