"""The project's Optuna sweeper, the submitit launcher and MLflow grouping, through the real entry point."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
import yaml
from conftest import ROOT

TINY = ["data.sft_steps=40", "reference.samples_per_prompt=16", "algorithm.iterations=1",
        "algorithm.epochs_per_iteration=8", "algorithm.dual_samples=16", "trainer.enable_progress_bar=false"]

SWEEP_CONFIG = """
defaults:
  - train
  - override hydra/sweeper: optuna
  - _self_
constraints:
  safety:
    threshold: 0.05
reference:
  samples_per_prompt: 64
# the step this test was built on (consecutive pairs, gentle rate): with only 64 samples a prompt it keeps lambda = 0
# the best-scoring trial, which the test needs to mean something; the sweeper, not the step, is under test
policy_step:
  pairs: consecutive
  batch_size: 64
optimizer:
  lr: 1.0e-3
  schedule: cosine
algorithm:
  name: fixed_lambda
  epochs_per_iteration: 3
hydra:
  sweeper:
    study_name: test_study
    direction: maximize
    objective: objective
    constraints: constraint_violation
    sampler:
      _target_: optuna.samplers.GridSampler
      seed: 0
      search_space:
        constraints.safety.initial_multiplier: [0.0, 3.0, -1.0, 0.5, 2.0, 1.0]
    params:
      constraints.safety.initial_multiplier: choice(0.0, 3.0, -1.0, 0.5, 2.0, 1.0)
"""


def train(tmp, *args, timeout=400):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 4-trial sweep over a 6-point grid of fixed lambdas (0: best J but infeasible; 3: feasible; -1: a bad config,
    fails), then a second invocation asking for 6 trials."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "conf").mkdir()
    (tmp / "conf" / "sweep_test.yaml").write_text(SWEEP_CONFIG)
    common = ["-m", "--config-dir", str(tmp / "conf"), "--config-name", "sweep_test", f"hydra.sweep.dir={tmp / 'sweep'}",
              f"paths.cache_dir={tmp / 'cache'}", f"logger.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
              "logger.experiment_name=sweep-test", *TINY]
    train(tmp, *common, "hydra.sweeper.n_trials=4")
    first = {p.parent.name: p.stat().st_mtime_ns for p in (tmp / "sweep").glob("*/summary.json")}
    first_results = yaml.safe_load((tmp / "sweep" / "optimization_results.yaml").read_text())
    train(tmp, *common, "hydra.sweeper.n_trials=6")
    return tmp, first, first_results


def test_sweep_is_stored_and_resumes_without_rerunning(sweep):
    tmp, first, first_results = sweep
    assert first_results["n_complete"] + first_results["n_failed"] == 4
    study = optuna.load_study(study_name="test_study", storage=f"sqlite:///{tmp / 'sweep' / 'optuna.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    again = {p.parent.name: p.stat().st_mtime_ns for p in (tmp / "sweep").glob("*/summary.json")}
    assert all(again[name] == mtime for name, mtime in first.items())  # finished trials were not rerun


def test_failing_trial_is_recorded_and_the_study_goes_on(sweep):
    tmp, _, _ = sweep
    study = optuna.load_study(study_name="test_study", storage=f"sqlite:///{tmp / 'sweep' / 'optuna.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.params["constraints.safety.initial_multiplier"] == -1.0 for t in failed)
    assert "initial_multiplier" in failed[0].user_attrs["error"]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 3


def test_constraint_violating_trial_is_never_reported_best(sweep):
    tmp, _, _ = sweep
    study = optuna.load_study(study_name="test_study", storage=f"sqlite:///{tmp / 'sweep' / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    infeasible = [t for t in complete if max(t.user_attrs["constraints"]) > 0]
    results = yaml.safe_load((tmp / "sweep" / "optimization_results.yaml").read_text())
    best = study.trials[results["best_trial"]]
    assert max(best.user_attrs["constraints"]) <= 0
    # the test means something: an infeasible trial scored higher
    assert infeasible and max(t.value for t in infeasible) > results["best_value"]


def test_trials_are_child_runs_and_the_mlflow_server_shows_them(sweep):
    tmp, _, _ = sweep
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        experiment = _post(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sweep-test", None)
        runs = _post(f"{base}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100})["runs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parents = [t for t in tags if t.get("sweep_id") == "test_study" and "mlflow.parentRunId" not in t]
    children = [t for t in tags if "mlflow.parentRunId" in t]
    assert len(parents) == 1
    assert len(children) >= 4 and all(t["optuna_trial"].isdigit() for t in children)
    params = [{p["key"]: p["value"] for p in run["data"].get("params", [])} for run in runs]
    assert any(p.get("constraints/safety/initial_multiplier") == "3.0" for p in params)


def test_sweep_report_writes_pareto_front_and_table(sweep):
    tmp, _, _ = sweep
    out = tmp / "report"
    result = subprocess.run([sys.executable, "-m", "dualign.tools.sweep_report", "--experiment", "sweep-test",
                             "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0 and (out / "lambda_best.png").stat().st_size > 0
    assert "| yes |" in report and "| no |" in report


def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    train(tmp_path, "-m", "hydra/launcher=submitit_local", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
          f"paths.cache_dir={tmp_path / 'cache'}", "logger.enabled=false", "algorithm=fixed_lambda", *TINY)
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    assert all(json.loads(p.read_text())["algorithm"] == "fixed_lambda" for p in summaries)
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # the jobs went through submitit


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, body):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


TWO_WORKERS = """
defaults:
  - train
  - override hydra/sweeper: optuna
  - _self_
algorithm:
  name: fixed_lambda
hydra:
  sweeper:
    study_name: two_workers
    direction: maximize
    objective: objective
    constraints: constraint_violation
    n_trials: 4
    heartbeat_interval: 1
    grace_period: 4
    sampler:
      _target_: optuna.samplers.TPESampler
      seed: 0
    params:
      constraints.safety.initial_multiplier: interval(0.0, 3.0)
"""


def test_two_workers_share_one_study_and_a_dead_workers_trial_is_asked_again(tmp_path):
    """Two sweeps started together on one sqlite study; one dies (SIGKILL) in its first trial. The other finishes the
    4 trials: the dead worker's trial, without heartbeats, is marked interrupted and asked again; no trial that did not
    really fail is failed (the sweeper used to fail every RUNNING trial, a live worker's included, on start)."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "two.yaml").write_text(TWO_WORKERS)
    args = [sys.executable, str(ROOT / "train.py"), "-m", "--config-dir", str(tmp_path / "conf"), "--config-name", "two",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}", "logger.enabled=false",
            "reference.samples_per_prompt=64", *TINY]
    env = {k: v for k, v in os.environ.items() if k != "DUALIGN_FAULT"}
    subprocess.run(args[:1] + [str(ROOT / "train.py"), "debug=fast", f"paths.cache_dir={tmp_path / 'cache'}",
                               "data.sft_steps=40", "reference.samples_per_prompt=64"], cwd=tmp_path, env=env,
                   capture_output=True, timeout=300)  # pi_ref's SFT cached first, so both workers start on trials
    survivor = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    faulty = [args[0], "-m", "dualign.tools.faults", *args[2:]]  # train.py with the fault hooks installed
    doomed = subprocess.Popen(faulty, cwd=tmp_path, env={**env, "DUALIGN_FAULT": "stage=writing:SIGKILL"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, doomed_err = doomed.communicate(timeout=600)
    out, err = survivor.communicate(timeout=600)
    assert doomed.returncode == -9, doomed_err[-2000:]
    assert survivor.returncode == 0, (out + err)[-3000:]
    study = optuna.load_study(study_name="two_workers", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    states = [(t.number, t.state.name, t.user_attrs.get("worker"), t.user_attrs.get("error")) for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and "error" in t.user_attrs]
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs]
    print(f"\ntwo workers: {states}")
    assert len(complete) == 4 and not failed, states
    assert len(interrupted) == 1 and len({t.user_attrs["worker"] for t in interrupted + complete}) == 2, states
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["n_complete"] == 4 and results["n_failed"] == 0 and results["n_interrupted"] == 1
