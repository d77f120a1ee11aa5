"""What each algorithm is, in one table (docs/method.md section 3). The run, the dual callback and validation read
these specs; adding an algorithm is one row here plus its conf/algorithm/<name>.yaml."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dualign.config.checks import choice
from dualign.errors import ConfigError


class Trigger(StrEnum):
    iteration = "iteration"  # a dual step after every E epochs, from a fresh on-policy estimate
    steps = "steps"  # a dual step every k optimiser steps, from the policy step's own samples
    never = "never"  # lambda stays where it started (measured once at the end)


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    summary: str
    trigger: Trigger
    warm_start: bool  # lambda_0 = the one-shot plug-in solution on pi_ref's samples (else algorithm.initial_multiplier or 0)
    iterative: bool  # trained in T iterations of E epochs (else once, for T x E epochs: the same budget)
    needs_constraints: bool
    compares_one_shot: bool = False  # algorithm.compare_one_shot trains one_shot beside it
    policy_steps: tuple[str, ...] | None = None  # the policy steps it works with (None: any)
    runner: str = "lagrangian"  # lagrangian: one run on the Lagrangian (training/fit.py); stepwise: one DPO run per
    # objective in turn (training/stepwise.py); preference: pre-aligned DPO models' implicit rewards (training/preference.py)
    preference_labels: bool = False  # learns each objective from preference labels (the task supplies them)

    @property
    def updates_multipliers(self) -> bool:
        return self.trigger != Trigger.never

    def schedule(self, iterations: int, epochs_per_iteration: int) -> tuple[int, int]:
        """(iterations, epochs per iteration) of the training run."""
        return (iterations, epochs_per_iteration) if self.iterative else (1, iterations * epochs_per_iteration)

    def check(self, cfg) -> None:
        if self.needs_constraints and not cfg.constraints:
            raise ConfigError(f"constraints is empty; algorithm.name={self.name} needs at least one constraint")
        if self.policy_steps is not None and cfg.policy_step.name not in self.policy_steps:
            raise ConfigError(f"algorithm.name={self.name} needs policy_step={' or '.join(self.policy_steps)} (its dual "
                              f"step uses the policy step's own samples), not policy_step.name={cfg.policy_step.name!r}")
        if self.runner == "preference" and cfg.algorithm.dual_estimator != "rollout":
            raise ConfigError(f"algorithm.name={self.name} measures the constraints with implicit rewards on the "
                              "policy's samples: algorithm.dual_estimator must be rollout")
        if self.runner == "preference" and any(c.threshold_type != "improvement" for c in cfg.constraints.values()):
            raise ConfigError(f"algorithm.name={self.name} knows utilities only up to a per-prompt constant: thresholds "
                              "must be improvements (threshold_type=improvement)")
        if self.runner != "lagrangian" and cfg.ckpt_path is not None:
            raise ConfigError(f"ckpt_path is set; algorithm.name={self.name} trains in stages and does not resume")
        if cfg.algorithm.merge_weight is not None and self.runner != "stepwise":
            raise ConfigError(f"algorithm.merge_weight is P-SACPO's; algorithm.name={self.name} has no stages to merge")
        if cfg.algorithm.merge_weight is not None and len(cfg.constraints) != 1:
            raise ConfigError("algorithm.merge_weight merges the reward-aligned and the final policy of ONE constraint; "
                              f"this config has {len(cfg.constraints)}")
        if self.trigger == Trigger.steps and cfg.algorithm.dual_rule == "newton":
            raise ConfigError(f"algorithm.dual_rule=newton needs a dual step per iteration (its curvature comes from a "
                              f"fresh on-policy sample); algorithm.name={self.name} updates lambda every k steps")
        unsized = [n for n, c in cfg.constraints.items() if c.step_size is None and cfg.algorithm.step_size is None]
        if self.trigger == Trigger.steps and unsized:
            raise ConfigError(f"algorithm.step_size is null: algorithm.name={self.name} measures no covariance of g to "
                              f"size a step from (its dual step reads the policy step's own samples); set it (or "
                              f"constraints.{unsized[0]}.step_size)")
        if self.trigger == Trigger.steps and cfg.algorithm.dual_every_steps is None:
            raise ConfigError(f"algorithm.dual_every_steps is null; algorithm.name={self.name} updates lambda every k steps")


ALGORITHMS = {spec.name: spec for spec in (
    AlgorithmSpec("caid", "iterative dualization: policy step at lambda_t, then an on-policy dual step",
                  Trigger.iteration, warm_start=True, iterative=True, needs_constraints=True, compares_one_shot=True),
    AlgorithmSpec("one_shot", "the plug-in dual on pi_ref's samples, one policy step at its lambda* (MoCAN)",
                  Trigger.never, warm_start=True, iterative=False, needs_constraints=True),
    AlgorithmSpec("fixed_lambda", "a policy step at given multipliers (default 0: reward-only DPO)",
                  Trigger.never, warm_start=False, iterative=False, needs_constraints=False),
    AlgorithmSpec("primal_dual", "Safe RLHF-style: policy gradient with a dual step every k optimiser steps",
                  Trigger.steps, warm_start=False, iterative=True, needs_constraints=True,
                  policy_steps=("policy_gradient",)),
    AlgorithmSpec("sacpo", "stepwise (SACPO): reward DPO from pi_ref, then each utility's DPO from and referenced to the "
                  "last stage at temperature beta / lambda_i; lambda given, never updated",
                  Trigger.never, warm_start=True, iterative=False, needs_constraints=True, policy_steps=("dpo",),
                  runner="stepwise"),
    AlgorithmSpec("pecaid", "CAID from preference labels alone: one pre-aligned DPO model per objective, their implicit "
                  "rewards beta log(pi_k / pi_ref) as the scores (PeCAID)",
                  Trigger.iteration, warm_start=True, iterative=True, needs_constraints=True, policy_steps=("dpo",),
                  runner="preference", preference_labels=True),
)}


def spec(name: str) -> AlgorithmSpec:
    choice("algorithm.name", name, tuple(ALGORITHMS))
    return ALGORITHMS[name]
