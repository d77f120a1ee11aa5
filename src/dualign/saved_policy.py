"""The body of `python -m dualign.evaluate` (evaluate.py checks the config first): a saved policy or adapter against
pi_ref on a text task's test split, written and logged like a training run's evaluation."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from dualign.models.hf import load_causal_lm, load_trained_policy, resolve_device
from dualign.models.scorers import ScorerSet
from dualign.tasks.text import TextTask
from dualign.tasks.text_evaluation import TextEvaluator
from dualign.tracking import mlflow, outputs
from dualign.tracking.summary import RunSummary
from dualign.util import timing
from dualign.util.console import quiet_libraries
from dualign.util.lifecycle import terminations


def evaluate_policy(cfg, raw_cfg: DictConfig) -> dict:
    """The saved policy (cfg.evaluation.policy_path) against pi_ref on the test split; cfg: validated and checked."""
    started = time.perf_counter()
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    logger = mlflow.open_logger(cfg, raw_cfg, None, name=f"evaluate {Path(cfg.evaluation.policy_path).name}")
    with terminations(logger):  # the MLflow run ends FINISHED, FAILED or KILLED with the command
        task = TextTask(cfg)
        cfg = task.cfg  # with a GGUF model, the cached plain copy
        reference = load_causal_lm(cfg.model).to(resolve_device(cfg.model.device)).eval().requires_grad_(False)
        scorers = ScorerSet(cfg)
        evaluator = TextEvaluator(task, reference, task.sampler(scorers, reference))
        policy = load_trained_policy(cfg.evaluation.policy_path, cfg.model).to(resolve_device(cfg.model.device))
        final = evaluator(policy)
        summary = RunSummary(
            algorithm="evaluate", policy_step="saved", beta=cfg.beta, task=task.description, evaluation=evaluator.name,
            constraints=list(cfg.constraints), threshold=evaluator.threshold,
            reference_mean_estimate=evaluator.reference_mean.tolist(), one_shot_multipliers=[], trajectory=[],
            final=final, reference=evaluator.reference,
            timings_s={"evaluation": time.perf_counter() - started, "by stage": timing.breakdown()},
            details={"policy": cfg.evaluation.policy_path, "reference_policy": cfg.model.name_or_path})
        outputs.write(summary, output_dir, raw_cfg, logger)
        return summary.sweep_metrics()
