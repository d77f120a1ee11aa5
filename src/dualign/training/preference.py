"""PeCAID, CAID from preference labels alone (the paper's appendix B; its one-shot form is PeCAN, arXiv 2405.19544).

No reward or cost model is read. One Bradley-Terry label per objective and pair of pi_ref's rollouts (the exact task
draws them from its tables: y1 beats y0 with probability sigmoid(k(y1) - k(y0)) for objective k) trains one
unconstrained DPO model per objective (reward, then each utility) from pi_ref with the run's own DPO step (all pairs
of a prompt's samples, hard labels). Their
implicit rewards

    k_hat(x, y) = beta * log(pi_k(y|x) / pi_ref(y|x))  =  k(x, y) - beta log Z_k(x)   at the DPO optimum

stand in for the scores everywhere CAID reads scores: the policy step's pseudo-preferences r_hat + lambda . g_hat, the
one-shot lambda_0 on pi_ref's samples and the dual step on the policy's samples. The per-prompt log-partition beta log
Z_k(x) is unknown, so each utility is measured against its pi_ref mean ON THE SAME PROMPT (from pi_ref's rollouts):
g_hat(x, y) - mean_{y' ~ pi_ref} g_hat(x, y'), whose mean over the policy's samples estimates E_pi[g] - E_ref[g]. The
trained policy is evaluated on the true tables. The pre-aligned models are cached like pi_ref.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from dualign.config import ALGORITHMS, AlgorithmSpec
from dualign.core.dual_steps import per_prompt_means
from dualign.training.context import RunContext, one_shot_multipliers
from dualign.training.data import sequence_logprobs, tokenized
from dualign.training.fit import Trained, initial_multipliers, train_policy
from dualign.util import seeds
from dualign.util.cache import cached_folder

log = logging.getLogger("dualign")


class ImplicitScores:
    """The scorer set of a PeCAID run: rollouts -> [1 + m, n] implicit rewards of the pre-aligned models (reward first),
    each utility minus its per-prompt pi_ref mean once `offsets` [m, prompts] is set."""

    def __init__(self, models: list[torch.nn.Module], reference: torch.nn.Module, beta: float, task):
        self.models, self.reference, self.beta, self.task = models, reference, beta, task
        self.offsets: torch.Tensor | None = None

    @torch.no_grad()
    def score_rollouts(self, rollouts) -> torch.Tensor:
        task = self.task
        input_ids, attention_mask, response_mask = tokenized(task.prompt_token_ids, rollouts, task.tokenizer.pad_token_id)
        logps = [sequence_logprobs(model, input_ids, attention_mask, response_mask, task.allowed_token_ids)
                 for model in (self.reference, *self.models)]
        scores = torch.stack([self.beta * (logp - logps[0]) for logp in logps[1:]]).float()
        if self.offsets is not None:
            scores[1:] -= self.offsets[:, rollouts.prompt_index]
        return scores


def pre_align(context: RunContext, objective: int, name: str, output_dir: Path) -> torch.nn.Module:
    """Unconstrained DPO from pi_ref on one Bradley-Terry label per pair of a prompt's pi_ref rollouts (every pair of
    the group: Binomial(c_i c_j, p_ij) wins between distinct responses seen c_i and c_j times), drawn from objective
    row `objective` of their scores (0: the reward); cached by what it depends on."""
    cfg, task = context.cfg, context.task
    algorithm = cfg.algorithm
    policy_step = dataclasses.replace(cfg.policy_step, pairs="all", labels="hard")
    # each objective's labels from their own seed: the reward's and a utility's label noise are independent
    stage_cfg = dataclasses.replace(cfg, policy_step=policy_step, seed=seeds.seed("preference_labels", cfg.seed, objective))

    def build(folder: Path) -> None:
        scores = context.scores.clone()
        scores[0] = context.scores[objective]
        stage = dataclasses.replace(context, cfg=stage_cfg)
        stage = dataclasses.replace(stage, pairs=task.pairs(stage, context.rollouts, scores))
        log.info("PeCAID: pre-aligning a DPO model on %s-preferences (%d epochs)", name, algorithm.preference_epochs)
        trained = train_policy(stage, ALGORITHMS["fixed_lambda"], torch.zeros(len(context.names)), 1,
                               algorithm.preference_epochs, output_dir / f"pre_aligned_{name}")
        torch.save(trained.policy.state_dict(), folder / "policy.pt")

    def load(folder: Path) -> torch.nn.Module:
        model = task.new_policy(context)
        model.load_state_dict(torch.load(folder / "policy.pt", weights_only=True))
        return model.eval().requires_grad_(False)

    key = {"task": task.description, "data": repr(cfg.data), "model": repr(cfg.model), "reference": repr(cfg.reference),
           "generation": repr(cfg.generation), "scores": torch.as_tensor(context.scores).double().sum().item(),
           "objective": objective, "policy_step": repr(policy_step), "optimizer": repr(cfg.optimizer),
           "beta": cfg.beta, "seed": cfg.seed, "epochs": algorithm.preference_epochs,
           "precision": cfg.trainer.precision}
    return cached_folder(cfg.paths.cache_dir, "pre_aligned", key, build, load)


def train_pecaid(context: RunContext, algorithm: AlgorithmSpec, multipliers: torch.Tensor, iterations: int,
                 epochs: int, output_dir: Path, logger=None, ckpt_path: str | None = None, checkpoint: bool = False,
                 evaluator=None) -> Trained:
    """Pre-align, score pi_ref's rollouts implicitly, then CAID on the implicit scores (multipliers: ignored unless
    configured, lambda_0 is the one-shot solution on the implicit scores)."""
    cfg, task = context.cfg, context.task
    objectives = ["reward", *context.names]
    models = [pre_align(context, k, name, output_dir) for k, name in enumerate(objectives)]
    implicit = ImplicitScores(models, context.reference, cfg.beta, task)
    rollouts = context.rollouts
    scores = implicit.score_rollouts(rollouts)
    prompts_total, index = len(task.prompts), rollouts.prompt_index
    centred = lambda s: s - per_prompt_means(s, index, prompts_total)[:, index]  # noqa: E731  (per-prompt constants
    # are what implicit rewards cannot know and what no comparison between responses of a prompt sees)
    implicit_centred, true_centred = centred(scores), centred(context.scores.float())
    correlation = {name: torch.corrcoef(torch.stack([implicit_centred[k], true_centred[k]]))[0, 1].item()
                   for k, name in enumerate(objectives)}
    log.info("PeCAID: implicit rewards against the true scores on pi_ref's samples (each centred on its prompt's "
             "mean), correlation %s", {k: round(v, 3) for k, v in correlation.items()})
    implicit.offsets = per_prompt_means(scores[1:], index, prompts_total)
    scores[1:] -= implicit.offsets[:, index]
    prompts, samples = len(context.reference_prompts), scores.shape[1] // len(context.reference_prompts)
    reward, utility = scores[0].view(prompts, samples), scores[1:].view(-1, prompts, samples)
    reference_mean = utility.mean(dim=(1, 2))  # 0 up to rounding: each utility is centred on its prompt's pi_ref mean
    one_shot = one_shot_multipliers(cfg, reward, utility, reference_mean, context.threshold)
    sampler = copy.copy(context.sampler)
    sampler.scorers = implicit  # the dual step's on-policy samples are scored implicitly too
    implicit_context = dataclasses.replace(context, sampler=sampler, scores=scores, reference_mean=reference_mean,
                                           one_shot=one_shot)
    implicit_context = dataclasses.replace(implicit_context, pairs=task.pairs(implicit_context, rollouts, scores))
    start = initial_multipliers(implicit_context, algorithm)
    log.info("PeCAID: lambda_0 = %s (one-shot on the implicit scores; on the true scores %s)",
             [round(v, 4) for v in start.tolist()], [round(v, 4) for v in context.one_shot.tolist()])
    trained = train_policy(implicit_context, algorithm, start, iterations, epochs, output_dir, logger, ckpt_path,
                           checkpoint, evaluator)
    return dataclasses.replace(trained, details={"implicit_correlation": correlation,
                                                 "implicit_one_shot_multipliers": one_shot.tolist()})
