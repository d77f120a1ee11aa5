"""PeCAID: implicit rewards of pre-aligned models as the scores, against a hand computation by enumeration."""
import json

import pytest
import torch

from dualign import tasks
from dualign.config import ConfigError, validate
from dualign.core.duality import composite_reward
from dualign.run import run
from dualign.training.preference import ImplicitScores, pre_align


def test_implicit_scores_and_the_composite_reward_match_a_hand_computation(make_cfg):
    context = tasks.build(validate(make_cfg("algorithm=pecaid"))).prepare()
    task, problem, beta = context.task, context.task.problem, context.cfg.beta
    models = []
    for scale in (0.3, 0.5):  # two "pre-aligned" models: pi_ref's weights moved at random
        model = task.new_policy(context)
        generator = torch.Generator().manual_seed(int(10 * scale))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        models.append(model.eval())
    implicit = ImplicitScores(models, context.reference, beta, task)
    rollouts = context.rollouts
    scores = implicit.score_rollouts(rollouts)
    # by hand: log pi(y|x) of every response by enumeration, read at each sample's (prompt, response)
    prompt = rollouts.prompt_index
    response = problem.response_indices(rollouts.responses)
    with torch.no_grad():
        reference, reward_model, safety_model = (problem.enumerate_logprobs(m).double()
                                                 for m in (context.reference, *models))
    expected = torch.stack([beta * (reward_model - reference)[prompt, response],
                            beta * (safety_model - reference)[prompt, response]])
    assert torch.allclose(scores.double(), expected, atol=2e-4)
    implicit.center_on(rollouts, scores)
    centred = implicit.score_rollouts(rollouts)
    offset = torch.stack([expected[1][prompt == p].mean() for p in range(len(task.prompts))])
    assert torch.allclose(centred[1].double(), expected[1] - offset[prompt], atol=2e-4)
    multipliers = torch.tensor([1.7])
    assert torch.allclose(composite_reward(centred[0], centred[1:], multipliers).double(),
                          expected[0] + 1.7 * (expected[1] - offset[prompt]), atol=5e-4)


def test_pecaid_run_pre_aligns_once_per_objective_and_caches_the_models(make_cfg, tmp_path, cache_dir):
    cfg = make_cfg("algorithm=pecaid", "algorithm.preference_epochs=3")
    run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    correlation = summary["details"]["implicit_correlation"]
    assert set(correlation) == {"reward", "safety"} and all(c > 0.3 for c in correlation.values())
    assert len(summary["trajectory"]) == 2 and summary["algorithm"] == "pecaid"
    implicit = summary["details"]["implicit_evaluation"]  # by enumeration here: exact, no interval
    assert implicit["samples_per_prompt"] == "all" and implicit["improvement_ci"] == [None]
    assert abs(implicit["improvement"][0]) < 10
    cached = sorted((cache_dir / "pre_aligned").iterdir())
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    context = tasks.build(validate(cfg)).prepare()  # the same config again: the models come from the cache
    model = pre_align(context, 1, "safety", tmp_path / "again")
    assert not any(p.requires_grad for p in model.parameters()) and not (tmp_path / "again").exists()
    assert [p.stat().st_mtime_ns for p in sorted((cache_dir / "pre_aligned").iterdir())] == stamps


def test_pecaid_refuses_what_it_cannot_do(make_cfg):
    with pytest.raises(ConfigError, match="dual_estimator must be rollout"):
        validate(make_cfg("algorithm=pecaid", "algorithm.dual_estimator=exact"))
    with pytest.raises(ConfigError, match="must be improvements"):
        validate(make_cfg("algorithm=pecaid", "constraints.safety.threshold_type=absolute"))


def test_text_pecaid_learns_each_objective_from_the_datasets_own_labels(tmp_path, cache_dir):
    """PKU-SafeRLHF's better_response_id trains the reward model and safer_response_id the safety model; the run
    reports the implicit improvement PeCAID constrains on the test split, beside the scorers' view."""
    from test_text_train import compose_text

    cfg = compose_text(tmp_path, cache_dir, "algorithm=pecaid", "constraints.safety.threshold=0.12",
                       "algorithm.preference_epochs=4", "algorithm.iterations=2", "algorithm.epochs_per_iteration=1",
                       "algorithm.compare_one_shot=false", "evaluation.every_iteration=false",
                       "evaluation.samples_per_prompt=4", "algorithm.dual_samples=4")
    run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    implicit = summary["details"]["implicit_evaluation"]
    assert implicit["prompts"] == 16 and implicit["improvement_ci"][0] > 0 and implicit["threshold"] == [pytest.approx(0.12)]
    assert set(summary["details"]["implicit_correlation"]) == {"reward", "safety"}
    # b is in implicit units: the one-shot lambda reported is PeCAID's own, on the implicit scores
    assert summary["one_shot_multipliers"] == summary["details"]["implicit_one_shot_multipliers"]
    assert len(summary["trajectory"]) == 2 and summary["final"]["scores"]["safety"]["improvement_ci"] > 0

    context = tasks.build(validate(cfg)).prepare()
    task, examples = context.task, context.task.train.examples
    models = []
    for objective, column in enumerate(("better_response_id", "safer_response_id")):
        stage, _ = task.preference_stage(context, objective)
        assert torch.equal(stage.pairs.tensors["label"], torch.tensor([float(e.labels[column]) for e in examples]))
        state = torch.random.get_rng_state()
        model = pre_align(context, objective, ["reward", "safety"][objective], tmp_path / "again")  # from the cache
        # on its own random stream: a cached model leaves the run where a trained one would (results do not depend
        # on what the cache held)
        assert torch.equal(torch.random.get_rng_state(), state)
        models.append(model)
    text_entries = [folder for folder in (cache_dir / "pre_aligned").iterdir()
                    if "pku_saferlhf" in (folder / "key.json").read_text()]
    assert len(text_entries) == 2
    for folder in text_entries:  # only the adapters are stored
        assert all("lora_" in name for name in torch.load(folder / "policy.pt", weights_only=True))
    assert not (tmp_path / "again").exists()
    # each pre-aligned model ranks the dataset's training pairs the way its own column labels them
    scores = ImplicitScores(models, context.reference, cfg.beta, task).raw(task.dataset_rollouts())
    for objective, column in enumerate(("better_response_id", "safer_response_id")):
        prefers_second = scores[objective, 1::2] > scores[objective, 0::2]
        labels = torch.tensor([e.labels[column] for e in examples], dtype=torch.bool)
        assert (prefers_second == labels).float().mean() > 0.75


def test_text_pecaid_refuses_data_without_a_label_per_objective(tmp_path, cache_dir):
    from test_text_train import compose_text

    cfg = compose_text(tmp_path, cache_dir, "algorithm=pecaid", "~data.preference_columns.safety")
    with pytest.raises(ConfigError, match="data.preference_columns has no column for 'safety'"):
        validate(cfg)
    cfg = compose_text(tmp_path, cache_dir, "algorithm=pecaid", "reference.prompts=8", "algorithm.dual_prompts=16")
    with pytest.raises(ConfigError, match="exceeds reference.prompts=8"):
        validate(cfg)
    cfg = compose_text(tmp_path, cache_dir, "algorithm=pecaid", "data.kind=hh_rlhf")
    with pytest.raises(ConfigError, match="hh_rlhf rows hold one"):
        validate(cfg)
