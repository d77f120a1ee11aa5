"""Scale through the real entry point: a 2-process DDP run (gloo, CPU) against 1 process. (Signals and resume:
tests/test_termination.py.)"""
import json
import os
import subprocess
import sys

from conftest import ROOT

TINY = ["data.sft_steps=80", "reference.samples_per_prompt=64", "algorithm.compare_one_shot=false",
        "trainer.enable_progress_bar=false"]


def _train(tmp_path, run_dir, *overrides, env=None):
    args = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
            *TINY, *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _trajectory(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    return [h["multipliers"] for h in summary["trajectory"]], summary


def test_two_process_ddp_gives_the_one_process_lambda_trajectory(tmp_path):
    """Same data and seeds: 64 pairs a step in one process, 32 on each of 2 ranks (their union is the same batch);
    exact dual estimates sharded over ranks and reduced as sums and counts. Every dual step checks that the ranks agree."""
    common = ["algorithm.iterations=2", "algorithm.epochs_per_iteration=1", "algorithm.dual_estimator=exact",
              "logger.enabled=false"]
    one = _train(tmp_path, tmp_path / "one", *common, "policy_step.batch_size=64")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path, tmp_path / "two", *common, "policy_step.batch_size=32", "trainer=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
    assert two.returncode == 0, two.stderr[-3000:]
    single, _ = _trajectory(tmp_path / "one")
    double, summary = _trajectory(tmp_path / "two")
    assert all(record["ranks"] == 2 for record in summary["trajectory"])
    assert len(single) == len(double) == 2
    difference = max(abs(a - b) for x, y in zip(single, double) for a, b in zip(x, y))
    print(f"\n1 vs 2 processes: lambda {single} vs {double}, max difference {difference:.2e}")
    assert difference < 1e-4, (single, double)
    assert single[-1] != single[0]  # lambda moved, so the comparison means something
