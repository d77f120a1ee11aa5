"""Primal-dual's update rule and machinery, and the online pair sampler."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from dualign import tasks
from dualign.config import ConfigError, validate
from dualign.core.dual_steps import log_space_dual_step, projected_dual_step
from dualign.run import run
from dualign.training.fit import PairData


def test_log_space_step_follows_safe_rlhf():
    lam = torch.tensor([1.0, 2.0, 4.9, 0.0])
    slack = torch.tensor([-0.5, 0.3, -10.0, -1.0])  # violated, satisfied, badly violated, lambda at 0
    updated = log_space_dual_step(lam, slack, 0.1, max_multiplier=5.0)
    assert math.isclose(updated[0].item(), math.exp(math.log(1.0) + 0.1 * 1.0 * 0.5), rel_tol=1e-6)
    assert math.isclose(updated[1].item(), 2.0 * math.exp(-0.1 * 2.0 * 0.3), rel_tol=1e-6)
    assert updated[2].item() == 5.0  # capped
    assert updated[3].item() == 0.0  # multiplicative: 0 stays 0 (hence lambda_init 1)
    assert (log_space_dual_step(torch.tensor([1.0]), torch.tensor([50.0]), 0.1) > 0).all()  # never negative


def test_primal_dual_updates_once_per_k_optimiser_steps_under_gradient_accumulation(make_cfg, tmp_path):
    """6 micro-batches, 2 per optimiser step: 3 optimiser steps and, with k = 1, 3 dual steps.
    (Every micro-batch that ended on a multiple of k used to fire one: 6 dual steps, the first at step 0.)"""
    run(make_cfg("experiment=primal_dual", "algorithm.iterations=1", "policy_step.steps_per_epoch=6",
                 "policy_step.samples_per_prompt=2", "algorithm.dual_every_steps=1", "trainer.accumulate_grad_batches=2"))
    history = json.loads((tmp_path / "run" / "summary.json").read_text())["trajectory"]
    assert len(history) == 3


def test_projected_option_for_primal_dual_projects_and_caps():
    assert torch.equal(projected_dual_step(torch.tensor([0.2, 4.0]), torch.tensor([1.0, -3.0]), 0.5, 5.0),
                       torch.tensor([0.0, 5.0]))


def test_primal_dual_updates_every_k_steps_with_the_configured_rule(make_cfg, tmp_path):
    run(make_cfg("experiment=primal_dual", "algorithm.iterations=1", "policy_step.steps_per_epoch=6",
                 "policy_step.samples_per_prompt=4", "algorithm.dual_every_steps=2"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    history = summary["trajectory"]
    assert len(history) == 3  # 6 steps, an update every 2
    assert summary["initial_multipliers"] == [1.0]
    for record in history:  # each update is the log-space rule on the running estimate since the previous one
        lam, slack = record["multipliers_used"][0], record["estimated_slack"][0]
        assert math.isclose(record["multipliers"][0], min(5.0, lam * math.exp(0.1 * lam * -slack)), rel_tol=1e-5)
    assert history[1]["multipliers_used"] == history[0]["multipliers"]


def test_online_pairs_come_from_the_current_policy_with_reference_log_probs(make_cfg):
    setup = tasks.build(validate(make_cfg("policy_step.pairs_from=policy"))).prepare()
    task = setup.task.problem
    # a policy that always answers t0 t0 t0: pi_ref with +100 on t0's logit
    policy = type(setup.reference)(setup.reference.config)
    policy.load_state_dict(setup.reference.state_dict())
    boost = 100.0 * torch.nn.functional.one_hot(task.allowed_token_ids[0], len(task.tokenizer)).float()
    policy.lm_head.register_forward_hook(lambda module, inputs, out: out + boost)
    data = PairData(setup, epochs_per_iteration=1)
    data.trainer = SimpleNamespace(current_epoch=0, lightning_module=SimpleNamespace(policy=policy))
    assert data.train_dataloader().dataset is setup.pairs  # iteration 0: the pi_ref pairs (the policy is pi_ref)
    data.trainer.current_epoch = 1  # iteration 1: fresh pairs from the policy
    batch = next(iter(data.train_dataloader()))
    responses = batch["input_ids"][:, :, 2:]
    assert (responses == task.allowed_token_ids[0]).all()
    # reference log-probabilities are pi_ref's, not the policy's
    t0_index = task.response_indices(["t0 t0 t0"])[0]
    ref = task.enumerate_logprobs(setup.reference).detach()
    prompt = batch["input_ids"][:, 0, 1] - task.tokenizer.convert_tokens_to_ids("p0")
    assert torch.allclose(batch["ref_logps"][:, 0], ref[prompt, t0_index], atol=1e-5)


def test_safety_only_run_has_no_constraint_and_raises_the_utility(make_cfg, tmp_path):
    run(make_cfg("algorithm=fixed_lambda", "constraints=none", "reward.scorer=utility_0", "algorithm.iterations=1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["constraints"] == [] and summary["final_multipliers"] == []
    assert summary["final"]["scores"]["utility_0"]["improvement"] > 0.05  # DPO_s optimises the utility itself
    assert summary["final"]["scores"]["reward"]["improvement"] < 0  # ... at helpfulness' expense (negatively correlated)


@pytest.mark.parametrize("pairs, labels", [("all", "hard"), ("listwise", "soft")])
def test_grouped_policy_steps_train_on_groups_of_a_prompts_responses(make_cfg, tmp_path, pairs, labels):
    """policy_step.pairs=all | listwise: groups of 8 of a prompt's 64 pi_ref responses, reference log-probs once per
    response; a CAID run with them moves lambda and ends near b."""
    overrides = (f"policy_step.pairs={pairs}", f"policy_step.labels={labels}", "policy_step.group_size=8",
                 "policy_step.batch_size=16")
    context = tasks.build(validate(make_cfg(*overrides))).prepare()
    groups = context.pairs.tensors
    assert groups["input_ids"].shape[0] == 16 * 64 // 8 and groups["input_ids"].shape[1] <= 8
    assert groups["utility"].shape == (128, 1, groups["input_ids"].shape[1])
    # identical samples of a group are one response with a count; the counts are the group's 8 samples
    count = groups["count"]
    assert count.sum(1).eq(8).all() and count.gt(1).any()
    for g in range(0, 128, 17):
        rows = groups["input_ids"][g][count[g] > 0]
        assert len({tuple(r.tolist()) for r in rows}) == len(rows)
    run(make_cfg(*overrides))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["trajectory"]) == 2 and summary["final_multipliers"] != summary["initial_multipliers"]


def test_a_group_size_that_does_not_divide_the_responses_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"policy_step.group_size=48: prompts hold \[64\] responses, not a multiple"):
        tasks.build(validate(make_cfg("policy_step.pairs=all", "policy_step.group_size=48"))).prepare()


def test_response_groups_merge_repeated_samples_and_score_each_response_once(make_cfg):
    """A prompt's samples become its distinct responses with counts; reference log-probs are computed once per
    distinct response and equal the per-sample ones; scores stay with their response."""
    from dualign.training.data import response_groups, tokenized
    from dualign.training.data import sequence_logprobs as per_sample

    cfg = validate(make_cfg())
    task = tasks.build(cfg)
    context = task.prepare()
    rollouts, scores = context.sample_and_score(context.reference, [0, 1, 2], 64, seed=5)
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            calls.append(input_ids.shape[0])
            return self.model(input_ids=input_ids, attention_mask=attention_mask)

    groups = response_groups(task.prompt_token_ids, rollouts, scores, Counting(context.reference),
                             task.tokenizer.pad_token_id, allowed_token_ids=task.allowed_token_ids).tensors
    count = groups["count"]
    distinct = [len({tuple(r) for r in rollouts.response_ids[64 * p: 64 * (p + 1)]}) for p in range(3)]
    assert count.gt(0).sum(1).tolist() == distinct and count.sum(1).tolist() == [64, 64, 64]
    assert sum(calls) == sum(distinct) < 3 * 64
    ids, mask, response_mask = tokenized(task.prompt_token_ids, rollouts, task.tokenizer.pad_token_id)
    expected = per_sample(context.reference, ids, mask, response_mask, task.allowed_token_ids)
    for p in range(3):
        for slot in range(int(count[p].gt(0).sum())):
            row = groups["input_ids"][p, slot]
            samples = [i for i in range(64 * p, 64 * (p + 1)) if torch.equal(ids[i], row)]
            assert len(samples) == count[p, slot]
            assert torch.allclose(groups["ref_logps"][p, slot], expected[samples], atol=1e-5)
            assert torch.equal(groups["reward"][p, slot].expand(len(samples)), scores[0, samples])


def test_a_cold_start_with_half_newton_steps_points_at_the_newton_rule(make_cfg, caplog):
    """lambda_0 = 0 with the default damped step is slow from a cold start (docs/dual_rules.md): the run says so."""
    with caplog.at_level("WARNING", logger="dualign"):
        run(make_cfg("algorithm.initial_multiplier=0", "algorithm.iterations=1"))
    assert any("starts at 0 with half-Newton" in r.getMessage() and "dual_rule=newton" in r.getMessage()
               for r in caplog.records)


def test_newton_rule_steps_by_the_on_policy_curvature(make_cfg, tmp_path):
    """algorithm.dual_rule=newton through the entry point: each step is lambda - u / H with H the within-prompt
    variance of g over beta from the same samples (one constraint, inside the trust region)."""
    run(make_cfg("algorithm.dual_rule=newton", "beta=0.5"))
    trajectory = json.loads((tmp_path / "run" / "summary.json").read_text())["trajectory"]
    assert len(trajectory) == 2
    for record in trajectory:
        (hessian,), (slack,), (used,) = record["hessian"], record["estimated_slack"], record["multipliers_used"]
        assert 0 < hessian[0] < 10  # Var(g | x) / beta: the exact task's utilities have variance about 1
        step = max(-used, min(max(2.0, 2.0 * used), -slack / hessian[0]))
        assert record["multipliers"][0] == pytest.approx(used + step, rel=1e-4, abs=1e-5)
