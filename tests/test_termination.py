"""How jobs end, through the real entry point: a signal in any stage gives a non-zero exit and a run that resumes to
the uninterrupted lambda; the MLflow run ends with the job (FINISHED, FAILED with the error, KILLED), never before its
files are written; runs started together never share a folder; a refused config leaves no folder.

Signals are sent by the process to itself at a chosen point (`DUALIGN_FAULT` read by `python -m dualign.tools.faults`, train.py with the fault hooks installed)."""
import json
import logging
import os
import subprocess
import sys

import mlflow
import pytest
from conftest import ROOT

from dualign.run import run

SMALL = ["data.sft_steps=80", "reference.samples_per_prompt=64", "algorithm.compare_one_shot=false",
         "trainer.enable_progress_bar=false", "algorithm.iterations=2", "algorithm.epochs_per_iteration=1",
         "algorithm.dual_samples=64", "policy_step.batch_size=2"]  # 8 optimiser steps an epoch (16 prompt groups), so signals can land mid-epoch


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cache and MLflow store for the module, and the uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("termination")
    store = f"sqlite:///{root / 'mlflow.db'}"
    result = _train(root, root / "uninterrupted", store)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, store, _trajectory(root / "uninterrupted")


def _train(root, run_dir, store, *overrides, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "DUALIGN_FAULT"}
    if fault:
        env["DUALIGN_FAULT"] = fault
    entry = ["-m", "dualign.tools.faults"] if fault else [str(ROOT / "train.py")]  # the fault hook: tests' own entry point
    args = [sys.executable, *entry, f"hydra.run.dir={run_dir}", f"paths.cache_dir={root / 'cache'}",
            f"logger.tracking_uri={store}", *SMALL, *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _resume(root, run_dir, store):
    """ckpt_path=last in this process (the signalled run had to be a process of its own; its resume need not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={run_dir}", f"paths.cache_dir={root / 'cache'}", f"logger.tracking_uri={store}",
            f"paths.fixtures_dir={ROOT / 'tests' / 'fixtures'}", *SMALL, "ckpt_path=last"])
    GlobalHydra.instance().clear()
    return run(cfg)


def _trajectory(run_dir):
    return [h["multipliers"] for h in json.loads((run_dir / "summary.json").read_text())["trajectory"]]


def _status(store, run_dir):
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run_info = mlflow.MlflowClient(store).get_run(run_id)
    return run_info.info.status, run_info.data.tags.get("error"), run_info.data.metrics


# where the signal lands (8 optimiser steps an epoch, 2 epochs): mid-epoch in fit (step 13, after the first
# epoch's checkpoint), in the setup's pi_ref rollouts (before any checkpoint: the resumed job starts over), and
# while writing the run's files (after training). Any other stage:
# DUALIGN_FAULT=stage=<its name>:<SIGNAL> (e.g. "exact evaluation#1", inside a dual step).
FAULTS = {"SIGTERM mid-epoch": "step=13:SIGTERM", "SIGKILL mid-epoch": "step=13:SIGKILL",
          "SIGTERM in pi_ref rollouts": "stage=rollouts:SIGTERM", "SIGKILL while writing": "stage=writing:SIGKILL"}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_a_signal_in_any_stage_exits_non_zero_and_resumes_to_the_same_lambda(shared, case):
    root, store, uninterrupted = shared
    run_dir = root / case.replace(" ", "_").replace("'", "")
    stopped = _train(root, run_dir, store, fault=FAULTS[case])
    signal_name = FAULTS[case].rsplit(":", 1)[1]
    if signal_name == "SIGTERM":
        assert stopped.returncode == 143, stopped.stderr[-2000:]
        assert "stopped by SIGTERM; resume with" in stopped.stderr.strip().splitlines()[-1]
        if (run_dir / "mlflow_run_id").exists():
            status, error, metrics = _status(store, run_dir)
            assert status == "KILLED" and error == "stopped by SIGTERM"
            assert not any(key.startswith("final/") for key in metrics)  # never FINISHED without its results
    else:
        assert stopped.returncode == -9
    assert not (run_dir / "summary.json").exists() or signal_name == "SIGKILL"
    if signal_name == "SIGKILL" and "step" in FAULTS[case]:  # no cleanup ran: the run is left RUNNING until resumed
        assert _status(store, run_dir)[0] == "RUNNING"
    _resume(root, run_dir, store)
    after = _trajectory(run_dir)
    difference = max(abs(a - b) for x, y in zip(uninterrupted, after) for a, b in zip(x, y))
    status, _, metrics = _status(store, run_dir)
    print(f"\n{case}: exit {stopped.returncode}, lambda difference after resume {difference:.1e}, MLflow {status}")
    assert len(after) == len(uninterrupted) and difference < 1e-5, (uninterrupted, after)
    assert status == "FINISHED" and any(key.startswith("final/") for key in metrics)


def bad_scores(prompts, responses):
    raise RuntimeError("the scoring service is down")


def test_an_error_after_the_run_is_created_marks_it_failed_with_the_error(make_cfg, tmp_path):
    cfg = make_cfg("+scorers.flaky.kind=callable", f"+scorers.flaky._target_={__name__}.bad_scores",
                   "constraints.safety.scorer=flaky", logger=True)
    with pytest.raises(RuntimeError, match="the scoring service is down"):
        run(cfg)
    status, error, _ = _status(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run")
    assert status == "FAILED" and error == "RuntimeError: the scoring service is down"


def test_a_data_or_model_error_after_the_run_is_created_marks_it_failed(tmp_path, cache_dir):
    """Text tasks load their data and model after the MLflow run exists: a bad file must not leave it RUNNING."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dualign.errors import DataError, LoadError

    for key, value, error in (("data.path", tmp_path / "missing.jsonl", DataError),
                              ("model.name_or_path", tmp_path / "no_model", LoadError)):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                "experiment=pku_safety_tiny", f"{key}={value}", f"paths.output_dir={tmp_path / 'run'}",
                f"paths.cache_dir={cache_dir}", f"paths.fixtures_dir={ROOT / 'tests' / 'fixtures'}",
                f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "trainer.enable_progress_bar=false"])
        GlobalHydra.instance().clear()
        with pytest.raises(error):
            run(cfg)
        status, message, _ = _status(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run")
        assert status == "FAILED" and message.startswith(error.__name__), (status, message)


def test_runs_started_together_never_share_a_folder_or_break_a_fresh_mlflow_store(tmp_path):
    """Two first runs on one new sqlite store: one used to die in MLflow's schema migration ("duplicate column")."""
    store = f"sqlite:///{tmp_path / 'fresh.db'}"
    args = [sys.executable, str(ROOT / "train.py"), "debug=fast", f"paths.cache_dir={tmp_path / 'cache'}",
            "trainer.enable_progress_bar=false", "logger.enabled=true", f"logger.tracking_uri={store}",
            "data.sft_steps=5", "algorithm.iterations=1"]
    jobs = [subprocess.Popen(args + [f"seed={seed}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    folders = []
    for job in jobs:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-2000:]
        folders.append(out.strip().splitlines()[-1].removeprefix("outputs: "))
    assert folders[0] != folders[1]
    for folder, seed in zip(folders, (1, 2)):
        assert f"seed: {seed}" in (tmp_path / folder / "config.yaml").read_text()
        assert (tmp_path / folder / "summary.json").is_file()
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("dualign").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    names = sorted(r.info.run_name for r in runs)  # named from the command's overrides, so the UI tells them apart
    assert names[0].startswith("caid debug=fast") and "seed=1" in names[0] and "seed=2" in names[1]


def test_a_refused_config_leaves_no_run_folder_and_a_name_cannot_make_one_elsewhere(tmp_path):
    (tmp_path / "work").mkdir()
    for bad in ("algorithm.name=../../escaped",):  # a config error, and a name that would leave outputs/
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), bad], cwd=tmp_path / "work",
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
    runs = tmp_path / "work" / "outputs" / "runs"
    assert not runs.exists() or not list(runs.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # nothing created beside or above it


def test_resuming_with_another_config_is_a_one_line_error_naming_the_keys(shared, make_cfg):
    from dualign.config import ConfigError

    root, store, _ = shared
    common = [f"paths.output_dir={root / 'uninterrupted'}", "ckpt_path=last", "algorithm.epochs_per_iteration=1",
              "policy_step.batch_size=2"]  # as SMALL
    with pytest.raises(ConfigError) as error:  # before anything is built
        run(make_cfg(*common, "constraints.safety.threshold=0.8", "beta=2"))
    line = str(error.value)
    assert line.startswith("ckpt_path='last': the checkpoint was trained with another config: ") and "\n" not in line
    assert "beta 1.0 -> 2.0" in line and "constraints.safety.threshold 0.5 -> 0.8" in line
    assert "allow_resume_changes=[beta,constraints.safety.threshold]" in line
    with pytest.raises(ConfigError, match="constraints.humour.scorer None -> 'utility_1'"):  # another structure
        run(make_cfg(*common, "experiment=two_constraints"))


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(shared, caplog):
    """Two checkpoints are kept, each with its SHA-256: a flipped byte in the newest is found, the older is used."""
    root, store, uninterrupted = shared
    run_dir = root / "damaged"
    stopped = _train(root, run_dir, store, fault="stage=writing:SIGKILL")  # after training: both epochs saved
    assert stopped.returncode == -9
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch=*.ckpt"))
    assert kept == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt"], kept
    newest = run_dir / "checkpoints" / "epoch=1-step=16.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the tensors: torch.load alone would not notice
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dualign"):
        _resume(root, run_dir, store)
    assert "epoch=1-step=16.ckpt is damaged (its SHA-256 does not match" in caplog.text
    assert _trajectory(run_dir) == uninterrupted  # replayed from the older checkpoint: the same lambda
