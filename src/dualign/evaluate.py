"""`python -m dualign.evaluate` (also `dualign-evaluate`): a saved policy or adapter against pi_ref on a text task's
test split, with the configured scorers and constraints, written and logged like a training run's evaluation:

    python -m dualign.evaluate experiment=pku_safety_tiny evaluation.policy_path=outputs/runs/<run>/policy

The checks answer in a second; the evaluation itself (saved_policy.py) loads torch, transformers and MLflow.
"""
from __future__ import annotations

from omegaconf import DictConfig

from dualign import cli
from dualign.config import ConfigError, validate
from dualign.tracking.preflight import preflight


def evaluate_saved(raw_cfg: DictConfig) -> dict:
    cfg = validate(raw_cfg)
    if cfg.data.enumerable:
        raise ConfigError("python -m dualign.evaluate evaluates on a test split: it needs a text task "
                          "(data=pku_saferlhf | hh_rlhf | jsonl); exact-task runs are evaluated exactly by train.py")
    if not cfg.evaluation.policy_path:
        raise ConfigError("evaluation.policy_path is null; give the folder of a saved policy or adapter")
    preflight(cfg)
    # deferred on purpose: the evaluation imports torch, transformers and MLflow (seconds); the checks above do not
    from dualign.saved_policy import evaluate_policy

    return evaluate_policy(cfg, raw_cfg)


def main() -> None:
    cli.hydra_entry(evaluate_saved)


if __name__ == "__main__":
    main()
