"""Guards: damaged caches are rebuilt, non-finite values stop the run naming where, and a run that could not save its
results fails before building anything."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from dualign.config import ExactTaskConfig, OptimizerConfig, TinyModelConfig
from dualign.models.scorers import CallableScorer, ScorerConfig, score_all
from dualign.tasks.exact_problem import ExactProblem, reference_policy
from dualign.training.module import AlignmentModule


def test_truncated_reference_cache_is_rebuilt_not_used(tmp_path, caplog):
    task = ExactProblem(ExactTaskConfig(num_prompts=2, sft_steps=3, sft_samples_per_prompt=8, sft_batch_size=8))
    model = reference_policy(task, TinyModelConfig(n_layer=1, n_embd=16, n_head=2), tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}  # the loaded weights are mmapped from the file
    del model
    (entry,) = (tmp_path / "exact_reference").iterdir()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a write cut short
    rebuilt = reference_policy(task, TinyModelConfig(n_layer=1, n_embd=16, n_head=2), tmp_path)
    assert "unusable" in caplog.text
    for a, b in zip(original.values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)  # the SFT is seeded: the rebuilt pi_ref is the same model
    assert weights.stat().st_size > 1000


def test_nan_loss_names_step_batch_and_term():
    def nan_step(policy, batch, multipliers, iteration, global_step):
        return torch.tensor(float("nan")), {"rewards/chosen": torch.tensor(float("nan")), "kl": torch.tensor(0.1)}

    module = AlignmentModule(torch.nn.Linear(2, 2), nan_step, torch.tensor([1.0]), OptimizerConfig(), 1)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0, batch 3; non-finite terms: rewards/chosen"):
        module.training_step({"x": torch.zeros(2)}, 3)


def nan_scores(prompts, responses):
    return [0.0] * (len(responses) - 1) + [float("nan")]


def test_nan_score_names_the_scorer_and_the_response():
    scorer = CallableScorer("toxicity", ScorerConfig(kind="callable", _target_=f"{__name__}.nan_scores"))
    with pytest.raises(FloatingPointError, match="scorer 'toxicity' returned nan for response 2"):
        score_all([scorer], ["a", "b", "c"], ["x", "y", "z"])


def _cli(tmp_path, *overrides):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unreachable_tracking_server_fails_before_building(tmp_path):
    result = _cli(tmp_path, "logger.tracking_uri=http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "dualign: config error: logger.tracking_uri='http://127.0.0.1:9' is not reachable")
    assert not (tmp_path / "cache" / "exact_reference").exists()  # nothing was built


def test_unwritable_output_folder_fails_before_building(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _cli(tmp_path, f"paths.output_dir={blocker / 'run'}", "logger.enabled=false")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"dualign: config error: paths.output_dir='{blocker / 'run'}' is not writable")
    assert not (tmp_path / "cache" / "exact_reference").exists()


def test_a_flipped_bit_in_cached_weights_is_found_and_the_entry_rebuilt(tmp_path, caplog):
    task = ExactProblem(ExactTaskConfig(num_prompts=2, sft_steps=3, sft_samples_per_prompt=8, sft_batch_size=8))
    model = reference_policy(task, TinyModelConfig(n_layer=1, n_embd=16, n_head=2), tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    (entry,) = (tmp_path / "exact_reference").iterdir()
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # inside a tensor: the file still loads, with one wrong weight
    weights.write_bytes(bytes(data))
    rebuilt = reference_policy(task, TinyModelConfig(n_layer=1, n_embd=16, n_head=2), tmp_path)
    assert "model.safetensors changed since it was written" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(original.values(), rebuilt.state_dict().values()))


def test_killed_attempts_staging_folders_are_removed_by_the_next(tmp_path):
    import socket

    from dualign.util.cache import cached_folder

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / "kind" / f".tmp-{host}-{int(dead.stdout)}-abc"
    alive = tmp_path / "kind" / f".tmp-{host}-{os.getpid()}-def"  # a running process's: left alone
    for folder in (abandoned, alive):
        folder.mkdir(parents=True)

    def build(folder):
        (folder / "value.txt").write_text("1")

    assert cached_folder(tmp_path, "kind", {"k": 1}, build, lambda f: (f / "value.txt").read_text()) == "1"
    assert not abandoned.exists() and alive.exists()


def test_cache_keys_follow_the_data_and_the_scorer_code_not_their_paths(tmp_path):
    """A JSONL file rewritten in place with the same row count, and a callable scorer whose code changed, used to
    reuse the old rollouts and scores (and so wrong preference labels)."""
    import json
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dualign.config import validate
    from dualign.tasks.text import TextTask
    from dualign.tasks.text_cache import scorer_key

    data = tmp_path / "pku"
    shutil.copytree(ROOT / "tests" / "fixtures" / "pku_saferlhf", data)
    (tmp_path / "my_scorer.py").write_text("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = validate(compose(config_name="train", overrides=[
                "experiment=pku_safety_tiny", f"data.path={data}", "+scorers.mine.kind=callable",
                "+scorers.mine._target_=my_scorer.score", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}",
                f"paths.fixtures_dir={ROOT / 'tests' / 'fixtures'}", f"logger.tracking_uri=sqlite:///{tmp_path}/m.db"]))
        GlobalHydra.instance().clear()
        before = (TextTask(cfg).cache_key(), scorer_key(cfg, ["mine"]))
        assert TextTask(cfg).cache_key() == before[0]  # stable while nothing changes
        rows = [json.loads(line) for line in open(data / "train.jsonl")]
        rows[5]["response_1"] = rows[5]["response_1"] + " Really."
        (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))  # same row count
        (tmp_path / "my_scorer.py").write_text("def score(prompts, responses):\n    return [2.0] * len(responses)\n")
        after = (TextTask(cfg).cache_key(), scorer_key(cfg, ["mine"]))
    finally:
        sys.path.remove(str(tmp_path))
    assert before[0]["data"] == after[0]["data"]  # same path and settings...
    assert before[0]["data_digest"] != after[0]["data_digest"]  # ...other content
    assert before[1]["mine"]["code"] != after[1]["mine"]["code"]


def test_a_tracking_file_that_is_not_a_database_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.db").write_text("my notes, not MLflow's")
    result = _cli(tmp_path, f"logger.tracking_uri=sqlite:///{tmp_path / 'notes.db'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"dualign: config error: logger.tracking_uri='sqlite:///{tmp_path / 'notes.db'}': {tmp_path / 'notes.db'} is "
        "not an SQLite database")


def test_tracking_trouble_is_retried_then_stops_tracking_without_failing_the_run(tmp_path, caplog):
    from dualign.tracking.mlflow import JobLogger

    logger = JobLogger(experiment_name="x", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    logger.RETRIES = (0.0, 0.0, 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("database is locked")

    logger._guarded("logging metrics", flaky)
    assert len(calls) == 3 and not logger.disabled  # the third attempt went through

    def down():
        raise OSError("disk I/O error")

    logger._guarded("logging metrics", down)
    assert logger.disabled and "logging metrics failed 4 times (disk I/O error); tracking stops" in caplog.text
    logger.log_metrics({"a": 1.0})  # no-op from now on, never an exception
    logger.end("FINISHED")


def paired_scores(prompts, responses):
    return [[0.0, 1.0]] * (len(responses) // 2)  # the right count, the wrong shape


def test_a_scorer_returning_the_wrong_shape_is_refused():
    scorer = CallableScorer("pairs", ScorerConfig(kind="callable", _target_=f"{__name__}.paired_scores"))
    with pytest.raises(ValueError, match=r"scorer 'pairs' returned scores of shape \(2, 2\) for 4 responses"):
        score_all([scorer], ["a"] * 4, ["w", "x", "y", "z"])


def test_a_multiplier_that_keeps_rising_while_its_constraint_stays_short_is_reported_once(caplog):
    from dualign.training.dual_callback import DualUpdate

    dual = DualUpdate(None, ["safety", "humour"], torch.zeros(2), torch.ones(2), torch.ones(2), 1)
    steps = [([1.0, 0.5], [1.5, 0.4], [-0.5, 0.1]), ([1.5, 0.4], [2.0, 0.3], [-0.4, 0.1]),
             ([2.0, 0.3], [2.4, 0.2], [-0.3, 0.1]), ([2.4, 0.2], [2.7, 0.1], [-0.3, 0.1])]
    with caplog.at_level("WARNING", logger="dualign"):
        for used, updated, slack in steps:
            dual.history.append({"multipliers_used": used, "multipliers": updated, "estimated_slack": slack})
            dual._warn_if_out_of_reach()
    warnings = [r.getMessage() for r in caplog.records if "beyond this policy's reach" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("lambda_safety has risen for 3 dual steps (1.5 -> 2 -> 2.4)")
    near = DualUpdate(None, ["safety"], torch.zeros(1), torch.tensor([0.5]), torch.ones(1), 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dualign"):  # converging onto b = 0.5 from below: not a warning
        for used, updated, slack in [(1.21, 1.23, -0.01), (1.23, 1.24, -0.004), (1.24, 1.241, -0.0016)]:
            near.history.append({"multipliers_used": [used], "multipliers": [updated], "estimated_slack": [slack]})
            near._warn_if_out_of_reach()
    assert "beyond this policy's reach" not in caplog.text


def test_a_met_inactive_constraint_is_reported_met_not_as_a_miss(make_cfg, capsys):
    from dualign.run import run

    run(make_cfg("constraints.safety.threshold=-1", "algorithm.iterations=1"))
    out = capsys.readouterr().out
    assert "safety: inactive at the optimum (lambda* = 0): achieved" in out and "vs b = -1: met" in out
    assert "% of b" not in out
