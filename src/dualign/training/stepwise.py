"""SACPO, stepwise alignment (Wachi et al., NeurIPS 2024): no dual update, one DPO run per objective in turn.

Stage 1 aligns pi_ref for the reward (DPO at temperature beta on r-preferences). Each later stage re-aligns the last
stage's policy for one utility g_i: DPO on g_i-preferences, started from AND referenced to the last stage's policy, at
temperature beta / lambda_i. Its optimum is the last stage's times exp(lambda_i g_i / beta), so after every stage the
optimum is pi_ref exp((r + lambda . g) / beta) / Z = pi_lambda (docs/method.md section 2): the same policy CAID
reaches at lambda, without ever mixing the objectives in one label. P-SACPO (algorithm.merge_weight = q) returns
start + q (end - start) in weights, start the reward-aligned policy and end the last stage's.

Every stage reuses the one training run (fit.train_policy: the DPO step, the dual callback measuring the constraints,
the task's evaluator); only its reference, its pairs' scores and its temperature differ.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from dualign.config import AlgorithmSpec
from dualign.training.context import RunContext
from dualign.training.dual_callback import compact
from dualign.training.fit import ESTIMATORS, Trained, train_policy

log = logging.getLogger("dualign")


def stages(context: RunContext, multipliers: torch.Tensor) -> list[tuple[str, torch.Tensor, float]]:
    """(name, the scores whose first row the stage's pairs are labelled by, temperature) of every stage."""
    cfg, scores = context.cfg, context.scores
    plan = [("reward", scores, cfg.beta)]
    for i, name in enumerate(context.names):
        if multipliers[i] > 0:  # lambda_i = 0: that utility does not enter pi_lambda, and beta / 0 is no temperature
            relabelled = scores.clone()
            relabelled[0] = scores[1 + i]
            plan.append((name, relabelled, cfg.beta / float(multipliers[i])))
    return plan


def train_stepwise(context: RunContext, algorithm: AlgorithmSpec, multipliers: torch.Tensor, iterations: int,
                   epochs: int, output_dir: Path, logger=None, ckpt_path: str | None = None, checkpoint: bool = False,
                   evaluator=None) -> Trained:
    """Every stage for iterations x epochs epochs (as one DPO run); the history holds one record per stage."""
    cfg, task = context.cfg, context.task
    plan, zeros = stages(context, multipliers), torch.zeros(len(context.names))
    history, trained, reward_aligned = [], None, None
    for k, (name, scores, beta) in enumerate(plan):
        stage_context, policy = context, None
        if trained is not None:  # from and referenced to the last stage's policy, at temperature beta / lambda_i
            policy, reference = task.continue_from(context, trained.policy)
            reward_aligned = reward_aligned if reward_aligned is not None else reference
            stage_context = dataclasses.replace(context, cfg=dataclasses.replace(cfg, beta=beta), reference=reference)
            stage_context = dataclasses.replace(stage_context, pairs=task.pairs(stage_context, context.rollouts, scores))
        log.info("SACPO stage %d of %d: %s-preferences at temperature %.4g", k + 1, len(plan), name, beta)
        last = k == len(plan) - 1
        trained = train_policy(stage_context, algorithm, zeros, iterations, epochs, output_dir / f"stage_{k + 1}_{name}",
                               logger if last else None, evaluator=evaluator, policy=policy)
        record = dict(trained.dual.history[-1], iteration=k + 1, stage=name, temperature=beta,
                      multipliers_used=multipliers.tolist(), multipliers=multipliers.tolist())
        history.append(record)
    if cfg.algorithm.merge_weight is not None and reward_aligned is not None:
        merged = task.interpolate(reward_aligned, trained.policy, cfg.algorithm.merge_weight)
        estimate, reference_mean, threshold = ESTIMATORS[cfg.algorithm.dual_estimator](context)
        sample = estimate(merged, len(plan))  # measured as every stage is, by the dual callback's estimator
        improvement = (sample.total / sample.count).float() - torch.as_tensor(reference_mean).float()
        record = {"iteration": len(plan) + 1, "stage": f"merge (q = {cfg.algorithm.merge_weight:g})",
                  "multipliers_used": multipliers.tolist(), "multipliers": multipliers.tolist(),
                  "estimated_improvement": improvement.tolist(),
                  "estimated_slack": (improvement - torch.as_tensor(threshold).float()).tolist()}
        if evaluator is not None:
            record["evaluation"] = compact(evaluator(merged))
        history.append(record)
        trained = dataclasses.replace(trained, policy=merged)
    trained.dual.history = history
    return trained
