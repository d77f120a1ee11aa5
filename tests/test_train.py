"""The real entry point end to end with tiny settings."""
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from conftest import ROOT

from dualign.core.oracle import ExactOracle, Instance
from dualign.run import run


def test_caid_moves_lambda_the_right_way_and_closes_the_slack(make_cfg, tmp_path):
    # start at lambda = 0, where the constraint is violated: the dual step must raise lambda and shrink the slack
    cfg = make_cfg("constraints.safety.initial_multiplier=0", "algorithm.iterations=3", "policy_step.batch_size=4",
                   logger=True)  # 4 steps an epoch: train/* metrics are written every 5 steps
    objective = run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lambdas = [summary["initial_multipliers"][0]] + [h["multipliers"][0] for h in summary["trajectory"]]
    shortfall = [summary["threshold"][0] - h["evaluation"]["improvement"][0] for h in summary["trajectory"]]
    assert lambdas[0] == 0 and lambdas[1] > 0 and lambdas[-1] > lambdas[1]
    assert shortfall[0] > 0 and abs(shortfall[-1]) < shortfall[0]
    assert objective["objective"] == summary["final"]["objective"]
    assert objective["constraint_violation"] == [summary["threshold"][0] - summary["final"]["improvement"][0]]

    # files: the instance and final policy in the documented format
    instance = np.load(tmp_path / "run" / "instance.npz")
    P, N = instance["ref_logprob"].shape
    assert (P, N) == (16, 512) and instance["utility"].shape == (1, P, N) and instance["threshold"].shape == (1,)
    assert np.load(tmp_path / "run" / "policy_final.npz")["logprob"].shape == (P, N)
    for key in ("optimum", "final_multipliers", "final", "gaps"):
        assert key in summary

    # MLflow: params, per-iteration lambda from step 0, per-step DPO metrics, artifacts
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("dualign").experiment_id])
    assert mlflow_run.data.params["algorithm/name"] == "caid"
    history = client.get_metric_history(mlflow_run.info.run_id, "dual/lambda_safety")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert "train/rewards/margins" in mlflow_run.data.metrics and "exact/improvement_safety" in mlflow_run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"instance.npz", "policy_final.npz", "summary.json", "config.yaml", "dual_trajectory.png"} <= artifacts


def test_resumed_run_continues_the_same_lambda_trajectory(make_cfg, tmp_path):
    common = ("policy_step.pairs=all", "policy_step.labels=hard", "policy_step.batch_size=4")
    run(make_cfg(*common, "algorithm.iterations=3", "paths.output_dir=" + str(tmp_path / "full")))
    full = json.loads((tmp_path / "full" / "summary.json").read_text())

    run(make_cfg(*common, "algorithm.iterations=2", "paths.output_dir=" + str(tmp_path / "part"), logger=True))
    checkpoint = tmp_path / "part" / "checkpoints" / "last.ckpt"
    run(make_cfg(*common, "algorithm.iterations=3", "paths.output_dir=" + str(tmp_path / "resumed"),
                 f"ckpt_path={checkpoint}", "allow_resume_changes=[algorithm.iterations]", logger=True))
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert json.loads((tmp_path / "resumed" / "resume_changes.json").read_text()) == [{"algorithm.iterations": [2, 3]}]
    assert len(resumed["trajectory"]) == 3
    assert np.allclose([h["multipliers"] for h in resumed["trajectory"]],
                       [h["multipliers"] for h in full["trajectory"]], atol=1e-6)
    # the resumed job continued the first job's MLflow run
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("dualign").experiment_id])
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "dual/lambda_safety")] == [0, 1, 2, 3]


@pytest.mark.parametrize("algorithm", ["one_shot", "fixed_lambda"])
def test_baselines_keep_lambda_fixed(make_cfg, tmp_path, algorithm):
    run(make_cfg(f"algorithm={algorithm}", "algorithm.iterations=1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    expected = summary["one_shot_multipliers"] if algorithm == "one_shot" else [0.0]
    assert np.allclose(summary["final_multipliers"], expected, atol=1e-6)


def test_exact_policy_step_with_exact_dual_estimates(make_cfg, tmp_path):
    run(make_cfg("experiment=exact_policy_step", "algorithm.iterations=3", "policy_step.steps_per_epoch=20"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["policy_step"] == "exact"
    # the exact step optimises the enumerated Lagrangian: 60 steps already halve the distance to pi*
    oracle = ExactOracle(Instance.load(tmp_path / "run" / "instance.npz"))
    start = oracle.evaluate(oracle.instance.ref_logprob)["tv_to_optimum"]
    assert summary["final"]["tv_to_optimum"] < 0.5 * start


def test_the_exact_tasks_rate_anneals_within_each_iteration_and_restarts(make_cfg, monkeypatch):
    """optimizer.schedule=cosine_per_iteration (the exact task's default): lr -> lr / 10 by each dual step, then back."""
    import math

    import lightning as L

    from dualign.training import fit

    rates = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    monkeypatch.setattr(fit, "extra_callbacks", [Record()])
    cfg = make_cfg("algorithm.iterations=2", "algorithm.epochs_per_iteration=4", "algorithm.compare_one_shot=false")
    assert cfg.optimizer.schedule == "cosine_per_iteration"
    run(cfg)
    shape = [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # one full-batch step an epoch
    assert rates == pytest.approx([cfg.optimizer.lr * f for f in shape * 2])


def test_cli_runs_the_fast_debug_config(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "debug=fast", f"hydra.run.dir={tmp_path / 'run'}",
         f"paths.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "|achieved - b| for safety" in result.stdout
    assert (tmp_path / "run" / "summary.json").exists()


def test_absolute_threshold_is_a_level_of_the_utility(make_cfg):
    from dualign import tasks
    from dualign.config import validate

    def build(cfg):
        return tasks.build(cfg).prepare()

    relative = build(validate(make_cfg("constraints.safety.threshold=0.4")))
    level = relative.reference_mean[0].item() + 0.4
    absolute = build(validate(make_cfg("constraints.safety.threshold_type=absolute", f"constraints.safety.threshold={level}")))
    assert abs(absolute.threshold[0].item() - 0.4) < 1e-5
    # the exact instance measures b against the exact E_ref[g]
    exact_level = absolute.enumeration.oracle.instance.reference_mean[0].item()
    assert abs(absolute.enumeration.oracle.instance.threshold[0].item() - (level - exact_level)) < 1e-6


def test_callable_scorer_beside_the_exact_tables(make_cfg):
    """A configured scorer (here a callable) serves a constraint while the reward stays the exact task's table."""
    cfg = make_cfg("algorithm.iterations=1", "constraints=none", "+constraints.brevity.scorer=length",
                   "+constraints.brevity.negate=true", "+constraints.brevity.threshold=-0.5",
                   "+scorers.length.kind=callable", "+scorers.length._target_=dualign.models.scorers.response_length")
    metrics = run(cfg)
    assert metrics["improvement_brevity"] == pytest.approx(0.0, abs=1e-6)  # every exact-task response has 3 words
