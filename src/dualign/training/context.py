"""What a run trains with, built once by its task (`Task.prepare`) and read-only afterwards: the config, pi_ref, the
scorers, the one sampling path, the statistics of pi_ref's rollouts (E_ref[g], thresholds b, the one-shot lambda)
and the DPO pairs. Training code reads this and nothing task-specific; what only some tasks can do (enumerate
every response) is the optional `enumeration`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dualign.core.duality import InfeasibleError, require_converged, solve_dual
from dualign.core.oracle import ExactOracle
from dualign.errors import ConfigError


@dataclass(frozen=True)
class Enumeration:
    """A task whose responses can be enumerated: exact log pi(y|x) for all of them, and the exact problem."""

    logprobs: Callable[..., torch.Tensor]  # (policy, prompt_index=None) -> [prompts, N], differentiable
    oracle: ExactOracle  # the enumerated instance (pi_ref, reward and utility tables, b) and its optimum


@dataclass(frozen=True)
class RunContext:
    cfg: object  # the validated TrainConfig
    task: object  # the Task that built this (its prompts, tokenizer, pairs and policies)
    reference: torch.nn.Module  # pi_ref, frozen
    scorers: object  # models.scorers.ScorerSet: reward first, then each constraint's utility
    sampler: object  # models.sampling.Sampler: the one rollout path
    reference_prompts: tuple[int, ...]  # the training prompts with pi_ref rollouts
    reference_mean: torch.Tensor  # E_ref[g_i] from pi_ref's rollouts
    threshold: torch.Tensor  # b_i, required improvements
    one_shot: torch.Tensor  # the plug-in lambda* on pi_ref's rollouts
    pairs: object | None  # DPO pairs with their reference log-probabilities (policy_step=dpo)
    enumeration: Enumeration | None = None
    rollouts: object | None = None  # the rollouts the pairs were built from (pi_ref's, or the dataset's responses)
    scores: torch.Tensor | None = None  # and their scores [1 + m, n]: a stepwise algorithm re-pairs them
    reference_rollouts: object | None = None  # pi_ref's own rollouts on reference_prompts, whatever the pairs come
    reference_scores: torch.Tensor | None = None  # from, and their scores: where E_ref[g] and the one-shot come from
    dual_prompts: tuple[int, ...] | None = None  # the prompts the on-policy dual step draws from (None: all of them)

    @property
    def names(self) -> list[str]:
        return list(self.cfg.constraints)

    def sample_and_score(self, model, prompt_index, samples: int, seed: int, prompt_set=None, score: bool = True):
        """Rollouts of `model` on the task's training prompts (or `prompt_set`) and their scores [1 + m, n]."""
        return self.sampler.sample(model, prompt_set or self.task, prompt_index, samples, seed, score)

    def pairs_from(self, model, seed: int):
        """DPO pairs from `model`'s rollouts on the reference prompts (pairs_from=policy)."""
        rollouts, scores = self.sample_and_score(model, self.reference_prompts, self.cfg.reference.samples_per_prompt, seed)
        return self.task.pairs(self, rollouts, scores)

    def require_enumeration(self, option: str) -> Enumeration:
        if self.enumeration is None:  # validation refuses this first; a context built by hand reaches here
            raise ConfigError(f"{option} needs a task whose responses can be enumerated (data=exact)")
        return self.enumeration


def one_shot_multipliers(cfg, reward, utility, reference_mean, threshold) -> torch.Tensor:
    """The plug-in lambda* on pi_ref's samples; an unreachable threshold is a one-line error naming the constraints."""
    try:
        solution = solve_dual(reward, utility, reference_mean, threshold, cfg.beta)
    except InfeasibleError as error:
        raise ConfigError(f"constraints ({', '.join(f'{n}.threshold' for n in cfg.constraints)}): {error}; "
                          f"`dualign-advise` prints the reachable range and the cost of each threshold") from None
    return require_converged(solution, "the one-shot lambda on pi_ref's samples").multipliers.float()
