"""The exact task as a run sees it: pi_ref (a tiny GPT-2 after SFT, cached), the seeded tables as scorers, pi_ref's
rollouts, and the enumerated instance whose optimum is known exactly (tasks/exact_problem.py builds the problem).
Every policy is evaluated exactly, by enumerating all responses of all prompts."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dualign.core.oracle import ExactOracle, Instance
from dualign.models.sampling import Sampler
from dualign.models.scorers import ScorerSet
from dualign.tasks.base import ReferenceStage, interpolated_weights, reference_statistics, thresholds
from dualign.tasks.exact_problem import ExactProblem, reference_policy
from dualign.training.context import Enumeration, RunContext
from dualign.training.data import policy_step_data
from dualign.training.module import autocast_dtype
from dualign.util import seeds, timing


class ExactTask:
    description = "the exact task"
    evaluates_every_iteration = True  # enumeration takes milliseconds
    logprob_batch_size = 1024  # sequences a forward pass when log-probabilities are taken without gradients

    def __init__(self, cfg):
        self.cfg = cfg
        self.problem = ExactProblem(cfg.data)
        self.prompts, self.prompt_token_ids = self.problem.prompts, self.problem.prompt_token_ids
        self.tokenizer, self.allowed_token_ids = self.problem.tokenizer, self.problem.allowed_token_ids
        self.max_new_tokens = self.min_new_tokens = cfg.data.response_length  # every response has this length
        self.evaluation_prompts = self  # evaluated on its own prompts (by enumeration; sampled where a step samples)
        self.group_logprobs = self.problem.sequence_logprobs  # a group's responses share the response tree

    def reference_stage(self) -> ReferenceStage:
        cfg, problem = self.cfg, self.problem
        reference = reference_policy(problem, cfg.model, cfg.paths.cache_dir)
        scorers = ScorerSet(cfg, available=problem.scorers())  # the tables, and any configured scorer beside them
        sampler = Sampler(cfg.generation, self.tokenizer, self.max_new_tokens, self.min_new_tokens,
                          self.allowed_token_ids, scorers, enumerator=problem.sample)
        P, samples = len(self.prompts), cfg.reference.samples_per_prompt
        # pi_ref rollouts: DPO pairs, E_ref[g] and the one-shot plug-in dual all come from these samples
        rollouts, scores = sampler.sample(reference, self, range(P), samples, seed=cfg.seed)
        return ReferenceStage(reference, scorers, sampler, tuple(range(P)), samples, rollouts, scores)

    def enumeration(self, stage: ReferenceStage) -> Enumeration:
        return Enumeration(self.problem.enumerate_logprobs, self._oracle(stage.reference, stage.scorers))

    def prepare(self) -> RunContext:
        cfg, stage = self.cfg, self.reference_stage()
        reference_mean, threshold, one_shot = reference_statistics(cfg, stage)
        context = RunContext(cfg, self, stage.reference, stage.scorers, stage.sampler, stage.prompts, reference_mean,
                             threshold, one_shot, pairs=None, rollouts=stage.rollouts, scores=stage.scores,
                             reference_rollouts=stage.rollouts, reference_scores=stage.scores)
        pairs = self.pairs(context, stage.rollouts, stage.scores) if cfg.policy_step.name == "dpo" else None
        return replace(context, pairs=pairs, enumeration=self.enumeration(stage))

    def _oracle(self, reference, scorers: ScorerSet) -> ExactOracle:
        """The exact instance: every response of every prompt, scored by the run's scorers."""
        problem, P = self.problem, len(self.prompts)
        all_prompts = [p for p in problem.prompts for _ in problem.responses]
        all_scores = scorers(all_prompts, problem.responses * P).view(-1, P, problem.num_responses)
        with torch.no_grad():
            ref_logprob = problem.enumerate_logprobs(reference)
        exact_reference_mean = (ref_logprob.exp() * all_scores[1:]).sum(-1).mean(-1)
        return ExactOracle(Instance(ref_logprob, all_scores[0], all_scores[1:], self.cfg.beta,
                                    thresholds(self.cfg, exact_reference_mean)))

    def new_policy(self, context: RunContext) -> torch.nn.Module:
        """A trainable copy of pi_ref."""
        return _copy(context.reference)

    def continue_from(self, context: RunContext, policy: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        return _copy(policy).train(), _copy(policy).eval().requires_grad_(False)

    def interpolate(self, start: torch.nn.Module, end: torch.nn.Module, weight: float) -> torch.nn.Module:
        merged = _copy(end)
        merged.load_state_dict(interpolated_weights(start, end, weight))
        return merged.eval()

    def pairs(self, context: RunContext, rollouts, scores: torch.Tensor, cache_key: dict | None = None):
        cfg = context.cfg  # a stage of a stepwise or preference run pairs with its own policy-step settings
        return policy_step_data(cfg.policy_step, self.prompt_token_ids, rollouts, scores, context.reference,
                                self.tokenizer.pad_token_id, cfg.algorithm.iterations, cfg.seed, self.allowed_token_ids,
                                batch_size=self.logprob_batch_size, autocast_dtype=autocast_dtype(cfg.trainer.precision),
                                group_logprobs=self.group_logprobs)

    def preference_stage(self, context: RunContext, objective: int) -> tuple[RunContext, dict]:
        """PeCAID's pre-alignment of objective row `objective` (0: the reward): one Bradley-Terry label per pair of a
        prompt's pi_ref rollouts, drawn from that objective's table (every pair of the group: Binomial(c_i c_j, p_ij)
        wins between distinct responses seen c_i and c_j times), each objective from its own seed so that their label
        noises are independent."""
        cfg = context.cfg
        policy_step = replace(cfg.policy_step, pairs="all", labels="hard", pairs_from="reference")
        stage = replace(context, cfg=replace(cfg, policy_step=policy_step,
                                             seed=seeds.seed("preference_labels", cfg.seed, objective)))
        scores = context.reference_scores.clone()
        scores[0] = context.reference_scores[objective]
        stage = replace(stage, pairs=self.pairs(stage, context.reference_rollouts, scores))
        key = {"labels": "Bradley-Terry from the tables", "scores": scores.double().sum().item(),
               "policy_step": repr(policy_step), "label_seed": stage.cfg.seed}
        return stage, key

    def evaluator(self, context: RunContext) -> "ExactEvaluator":
        return ExactEvaluator(context.enumeration, self.problem)

    def save(self, context: RunContext, policy: torch.nn.Module, output_dir: Path) -> tuple[list[Path], dict]:
        """The instance (pi_ref's log-probs and the tables) and the trained policy's log-probs over every response."""
        files = [output_dir / "instance.npz", output_dir / "policy_final.npz"]
        context.enumeration.oracle.instance.save(files[0])
        with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
            np.savez(files[1], logprob=self.problem.enumerate_logprobs(policy).double().numpy())
        return files, {}


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


class ExactEvaluator:
    """Exact E[r], improvements, KL, J and TV to pi* by enumeration, and the mean of every table the task offers
    (not only the optimised ones: a safety-only run is judged on helpfulness too)."""

    name = "exact"

    def __init__(self, enumeration: Enumeration, problem: ExactProblem):
        self.logprobs, self.oracle = enumeration.logprobs, enumeration.oracle
        instance = self.oracle.instance
        self.tables = {name: scorer.table.double() for name, scorer in problem.scorers().items()}
        self.threshold = instance.threshold.tolist()
        self.reference = self._evaluate(instance.ref_logprob)
        ref_prob = instance.ref_logprob.exp()
        reward_std = ((ref_prob * instance.reward**2).sum(-1) - (ref_prob * instance.reward).sum(-1) ** 2).clamp(min=0)
        optimum = self.oracle.optimum()
        self.optimum = {"multipliers": optimum.multipliers.tolist(), "value": optimum.value,
                        "reference_reward_std": reward_std.mean().sqrt().item(),
                        "reference_mean": instance.reference_mean.tolist()}

    def __call__(self, policy: torch.nn.Module) -> dict:
        with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
            logprob = self.logprobs(policy).double()
        return self._evaluate(logprob)

    def _evaluate(self, logprob: torch.Tensor) -> dict:
        result = self.oracle.evaluate(logprob)
        prob, ref_prob = torch.as_tensor(logprob, dtype=torch.float64).exp(), self.oracle.instance.ref_logprob.exp()
        result["scores"] = {}
        for name, table in self.tables.items():
            mean, reference = (prob * table).sum(-1).mean().item(), (ref_prob * table).sum(-1).mean().item()
            result["scores"][name] = {"reference": reference, "policy": mean, "improvement": mean - reference}
        return result
