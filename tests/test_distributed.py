"""Scale and faults through the real entry point: a 2-process DDP run (gloo, CPU) against 1 process, and a run
SIGKILLed in the middle of an iteration, resumed from its last checkpoint."""
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
    common = ["algorithm.iterations=3", "algorithm.epochs_per_iteration=1", "algorithm.dual_estimator=exact",
              "logger.enabled=false"]
    one = _train(tmp_path, tmp_path / "one", *common, "policy_step.batch_size=64")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path, tmp_path / "two", *common, "policy_step.batch_size=32", "trainer=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
    assert two.returncode == 0, two.stderr[-3000:]
    single, _ = _trajectory(tmp_path / "one")
    double, summary = _trajectory(tmp_path / "two")
    assert all(record["ranks"] == 2 for record in summary["trajectory"])
    assert len(single) == len(double) == 3
    difference = max(abs(a - b) for x, y in zip(single, double) for a, b in zip(x, y))
    print(f"\n1 vs 2 processes: lambda {single} vs {double}, max difference {difference:.2e}")
    assert difference < 1e-4, (single, double)
    assert single[-1] != single[0]  # lambda moved, so the comparison means something


def test_sigkill_mid_iteration_then_resume_matches_the_uninterrupted_run(tmp_path):
    """Iteration 2 of 3 (2 epochs of 8 steps each) is killed at optimiser step 21 (epoch 3, mid-epoch, after the
    epoch-2 checkpoint); ckpt_path=last resumes from there, with the same MLflow run."""
    common = ["algorithm.iterations=3", "algorithm.epochs_per_iteration=2", f"logger.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    full = _train(tmp_path, tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train(tmp_path, tmp_path / "killed", *common, env={"DUALIGN_FAULT": "step=21:SIGKILL"})
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    resumed = _train(tmp_path, tmp_path / "killed", *common, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted, _ = _trajectory(tmp_path / "full")
    after_kill, _ = _trajectory(tmp_path / "killed")
    difference = max(abs(a - b) for x, y in zip(uninterrupted, after_kill) for a, b in zip(x, y))
    print(f"\nuninterrupted vs SIGKILL + resume: lambda {uninterrupted} vs {after_kill}, max difference {difference:.2e}")
    assert len(after_kill) == 3 and difference < 1e-5, (uninterrupted, after_kill)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dualign").experiment_id])
    assert len(runs) == 2  # the full run and the killed-then-resumed one: one MLflow run, continued
    killed_run = [r for r in runs if r.info.run_id == (tmp_path / "killed" / "mlflow_run_id").read_text().strip()]
    assert killed_run and killed_run[0].info.status == "FINISHED"
    assert len(client.get_metric_history(killed_run[0].info.run_id, "dual/lambda_safety")) >= 4
