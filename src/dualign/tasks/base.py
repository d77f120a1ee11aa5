"""The Task interface: everything a run asks of its task kind, and the pieces both kinds share.

A run builds its task once (`tasks.build`), then asks it to prepare the run context (pi_ref, scorers, pi_ref's
rollouts and their statistics, the DPO pairs), for a new trainable policy, for DPO pairs from rollouts, for the
evaluator that measures a policy, and to save the trained policy. Nothing outside the task implementations asks
which kind of task it runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dualign.config import spec
from dualign.core.advice import edge_warning
from dualign.training.context import Enumeration, RunContext, one_shot_multipliers

log = logging.getLogger("dualign")


@dataclass(frozen=True)
class ReferenceStage:
    """pi_ref and its scored rollouts: what a run's statistics and pairs come from, and what `dualign-advise` reads."""

    reference: torch.nn.Module
    scorers: object  # models.scorers.ScorerSet
    sampler: object  # models.sampling.Sampler
    prompts: tuple[int, ...]  # the training prompts with rollouts
    samples: int  # responses per prompt
    rollouts: object
    scores: torch.Tensor  # [1 + m, prompts * samples], prompt-major
    cache_key: dict | None = None  # what the rollouts were cached under (their reference log-probs are cached under it)

    @property
    def reward(self) -> torch.Tensor:
        return self.scores[0].view(len(self.prompts), self.samples)

    @property
    def utility(self) -> torch.Tensor:
        return self.scores[1:].view(-1, len(self.prompts), self.samples)


class Evaluator(Protocol):
    """Measures a policy: `evaluator(policy)` -> {"objective", "reward", "kl", "improvement": [m], ...} (optional
    extras: `<key>_ci` 95% half-widths, "tv_to_optimum", "scores" per scorer, "samples" rows)."""

    name: str  # the metric prefix of per-iteration evaluations: exact/* (enumeration) or eval/* (test split)
    threshold: list[float]  # the b each constraint's improvement is measured against
    reference: dict  # pi_ref's own evaluation (its objective and reward; improvement 0)
    optimum: dict | None  # the exact optimum where the task knows it: multipliers, value, ...

    def __call__(self, policy: torch.nn.Module) -> dict: ...


class Task(Protocol):
    # the training prompts as scorers read them and as the policy reads them, and how responses are generated
    prompts: list[str]
    prompt_token_ids: list[list[int]]
    tokenizer: object
    allowed_token_ids: torch.Tensor | None
    max_new_tokens: int
    min_new_tokens: int
    description: str  # "the exact task", "pku_saferlhf (16 test prompts)": for titles
    evaluates_every_iteration: bool  # the evaluator runs after every iteration (cheap, or asked for)
    logprob_batch_size: int  # sequences a forward pass when log-probabilities are taken without gradients
    evaluation_prompts: object  # the prompts policies are evaluated on (prompts, prompt_token_ids): a test split
    # log pi(y|x) of full token rows [R, T] with gradients, for a group of responses to one prompt, where the task
    # computes it cheaper than a forward pass over every row (shared prefixes); None: that forward pass
    group_logprobs: object

    def reference_stage(self) -> ReferenceStage:
        """pi_ref, the scorers, the sampler and pi_ref's scored rollouts (cached on disk where the task caches)."""

    def enumeration(self, stage: ReferenceStage) -> Enumeration | None:
        """Exact log-probabilities and the enumerated problem, where the task's responses can be enumerated."""

    def prepare(self) -> RunContext: ...

    def new_policy(self, context: RunContext) -> torch.nn.Module: ...

    def continue_from(self, context: RunContext, policy: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(a trainable policy that starts at `policy`, a frozen reference equal to `policy`): a stepwise algorithm's
        next stage, trained from and referenced to the last (`policy` itself may be consumed)."""

    def interpolate(self, start: torch.nn.Module, end: torch.nn.Module, weight: float) -> torch.nn.Module:
        """The policy with weights start + weight (end - start), where end continued from start (P-SACPO's merge)."""

    def pairs(self, context: RunContext, rollouts, scores: torch.Tensor, cache_key: dict | None = None): ...

    def preference_stage(self, context: RunContext, objective: int) -> tuple[RunContext, dict]:
        """(the context of PeCAID's pre-alignment of objective `objective` (0: the reward; its policy-step settings
        and its labelled pairs), what those labels depend on, for the cache key): the exact task draws labels from
        its tables, a text task reads the dataset's own."""

    def evaluator(self, context: RunContext) -> Evaluator: ...

    def save(self, context: RunContext, policy: torch.nn.Module, output_dir: Path) -> tuple[list[Path], dict]:
        """The trained policy's files (and what the summary should say about them)."""


def interpolated_weights(start: torch.nn.Module, end: torch.nn.Module, weight: float) -> dict:
    """start + weight (end - start), parameter by parameter (integer buffers are end's): P-SACPO's merge."""
    first = start.state_dict()
    return {k: first[k] + weight * (v - first[k]) if v.is_floating_point() else v for k, v in end.state_dict().items()}


def thresholds(cfg, reference_mean: torch.Tensor) -> torch.Tensor:
    """b_i: the configured improvement, or an absolute level tau_i minus E_ref[g_i]."""
    return torch.tensor([c.threshold if c.threshold_type == "improvement" else c.threshold - reference_mean[i].item()
                         for i, c in enumerate(cfg.constraints.values())])


def reference_statistics(cfg, stage: ReferenceStage):
    """From pi_ref's scored rollouts: E_ref[g], the thresholds b and the one-shot lambda*; a warning first when a b is
    near the edge of what the samples support (an unreachable one is a one-line error)."""
    reward, utility = stage.reward, stage.utility
    reference_mean = utility.mean(dim=(1, 2))
    threshold = thresholds(cfg, reference_mean)
    if spec(cfg.algorithm.name).preference_labels:  # b is in the implicit utilities' units, not the scorers': the
        return reference_mean, threshold, torch.zeros(len(threshold))  # algorithm checks it and solves lambda_0 there
    warning = edge_warning(list(cfg.constraints), threshold, utility)
    if warning:
        log.warning(warning)
    return reference_mean, threshold, one_shot_multipliers(cfg, reward, utility, reference_mean, threshold)
