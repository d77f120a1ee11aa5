"""PeCAID, CAID from preference labels alone (the paper's appendix B; its one-shot form is PeCAN, arXiv 2405.19544).

No reward or cost model is read in training. One preference label per objective and pair trains one unconstrained DPO
model per objective (reward, then each utility) from pi_ref with the run's own DPO step. The task supplies the
labels (`Task.preference_stage`): a text dataset's own (PKU-SafeRLHF: better_response_id for the reward,
safer_response_id for safety, on its two responses a prompt); the exact task draws Bradley-Terry labels from its
tables on every pair of a prompt's pi_ref rollouts. Their implicit rewards

    k_hat(x, y) = beta * log(pi_k(y|x) / pi_ref(y|x))  =  k(x, y) - beta log Z_k(x)   at the DPO optimum

stand in for the scores everywhere CAID reads scores: the policy step's pseudo-preferences r_hat + lambda . g_hat, the
one-shot lambda_0 on pi_ref's samples and the dual step on the policy's samples. The per-prompt log-partition beta log
Z_k(x) is unknown, so each utility is measured against its pi_ref mean ON THE SAME PROMPT (from pi_ref's rollouts):
g_hat(x, y) - mean_{y' ~ pi_ref} g_hat(x, y'), whose mean over the policy's samples estimates E_pi[g] - E_ref[g]. The
policy step compares responses to one prompt, so per-prompt constants cancel there. The trained policy is evaluated
with the task's own measure (the exact tables; a text task's scorers on the test split). The pre-aligned models are
cached like pi_ref.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from dualign.config import ALGORITHMS, AlgorithmSpec, ConfigError
from dualign.core.advice import edge_warning, edges
from dualign.core.dual_steps import per_prompt_means
from dualign.training.context import RunContext, one_shot_multipliers
from dualign.training.data import sequence_logprobs, tokenized
from dualign.training.fit import Trained, initial_multipliers, train_policy
from dualign.training.module import autocast_dtype
from dualign.util import seeds
from dualign.util.cache import cached_folder
from dualign.util.metrics import mean_ci

log = logging.getLogger("dualign")


class ImplicitScores:
    """The scorer set of a PeCAID run: rollouts -> [1 + m, n] implicit rewards of the pre-aligned models (reward first),
    each utility minus its per-prompt pi_ref mean once `center_on` has measured those means."""

    def __init__(self, models: list[torch.nn.Module], reference: torch.nn.Module, beta: float, task,
                 precision: str = "32-true"):
        self.models, self.reference, self.beta, self.task = models, reference, beta, task
        self.autocast_dtype = autocast_dtype(precision)  # log-probs as training takes them
        self.offsets: torch.Tensor | None = None  # [m, prompts]
        self.centred_prompts: torch.Tensor | None = None  # [prompts] bool: prompts whose offsets were measured

    @torch.no_grad()
    def raw(self, rollouts, prompt_set=None) -> torch.Tensor:
        """beta log(pi_k / pi_ref) of each rollout, [1 + m, n]: right up to a constant per prompt and objective.
        prompt_set: what rollouts.prompt_index indexes (default: the training prompts)."""
        task = self.task
        prompt_ids = (prompt_set or task).prompt_token_ids
        input_ids, attention_mask, response_mask = tokenized(prompt_ids, rollouts, task.tokenizer.pad_token_id)
        logps = [sequence_logprobs(model, input_ids, attention_mask, response_mask, task.allowed_token_ids,
                                   task.logprob_batch_size, self.autocast_dtype)
                 for model in (self.reference, *self.models)]
        return torch.stack([self.beta * (logp - logps[0]) for logp in logps[1:]]).float()

    def center_on(self, reference_rollouts, reference_scores: torch.Tensor) -> None:
        """Measure each utility's per-prompt mean on pi_ref's rollouts (their raw implicit scores)."""
        index, prompts = reference_rollouts.prompt_index, len(self.task.prompts)
        self.offsets = per_prompt_means(reference_scores[1:], index, prompts)
        self.centred_prompts = torch.bincount(index, minlength=prompts) > 0

    def score_rollouts(self, rollouts) -> torch.Tensor:
        scores = self.raw(rollouts)
        if self.offsets is not None:
            index = rollouts.prompt_index
            if not self.centred_prompts[index].all():  # the dual step draws from context.dual_prompts: never here
                raise RuntimeError("implicit utilities asked for on prompts without pi_ref rollouts (no offset)")
            scores[1:] -= self.offsets[:, index]
        return scores


def implicit_evaluation(context: RunContext, implicit: ImplicitScores, policy: torch.nn.Module) -> dict:
    """What PeCAID constrains, measured on the task's evaluation prompts (a text task's test split): each utility's
    implicit improvement, the policy's samples against pi_ref's on the same prompts (the evaluator's seeds), with 95%
    CIs over prompts; exact (no CI) where the task enumerates its responses. Per-prompt constants cancel in that
    difference, so prompts need no offsets."""
    cfg = context.cfg
    if context.enumeration is not None:  # sum over every response of (pi - pi_ref) g_hat, per prompt
        with torch.no_grad():
            reference, current, *models = (context.enumeration.logprobs(model).double()
                                           for model in (context.reference, policy, *implicit.models[1:]))
        improvement = [((current.exp() - reference.exp()) * implicit.beta * (model - reference)).sum(-1).mean().item()
                       for model in models]
        return {"prompts": reference.shape[0], "samples_per_prompt": "all", "threshold": context.threshold.tolist(),
                "improvement": improvement, "improvement_ci": [None] * len(improvement)}
    prompt_set = context.task.evaluation_prompts
    prompts, samples = len(prompt_set.prompts), cfg.evaluation.samples_per_prompt
    means = []
    for step, model in enumerate((context.reference, policy)):
        rollouts, _ = context.sampler.sample(model, prompt_set, range(prompts), samples,
                                             seeds.seed("evaluation", cfg.seed, step=step), score=False)
        means.append(implicit.raw(rollouts, prompt_set)[1:].double().view(-1, prompts, samples).mean(-1))
    estimates = [mean_ci(row.unsqueeze(-1)) for row in means[1] - means[0]]  # per utility, over prompts
    return {"prompts": prompts, "samples_per_prompt": samples, "threshold": context.threshold.tolist(),
            "improvement": [mean for mean, _ in estimates], "improvement_ci": [ci for _, ci in estimates]}


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def trainable_state(model: torch.nn.Module) -> dict:
    """The parameters training changes (LoRA adapters; every weight of a fully trained model)."""
    names = _trainable(model)
    return {name: value for name, value in model.state_dict().items() if name in names}


def load_trainable_state(model: torch.nn.Module, state: dict) -> None:
    """Put a `trainable_state` into a fresh policy; anything else the fresh one lacks or has beyond it is an error."""
    trainable = _trainable(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or trainable - set(state):
        raise ValueError(f"saved weights do not fit the policy (unexpected {unexpected[:3]}, missing "
                         f"{sorted(trainable - set(state))[:3]})")


def pre_align(context: RunContext, objective: int, name: str, output_dir: Path) -> torch.nn.Module:
    """Unconstrained DPO from pi_ref on objective `objective`'s labels (0: the reward; the task supplies them), for
    algorithm.preference_epochs epochs; cached by what it depends on."""
    cfg, task = context.cfg, context.task
    epochs = cfg.algorithm.preference_epochs
    stage, labels = task.preference_stage(context, objective)

    def build(folder: Path) -> None:
        log.info("PeCAID: pre-aligning a DPO model on %s-preferences (%d epochs)", name, epochs)
        trained = train_policy(stage, ALGORITHMS["fixed_lambda"], torch.zeros(len(context.names)), 1, epochs,
                               output_dir / f"pre_aligned_{name}")
        torch.save(trainable_state(trained.policy), folder / "policy.pt")

    def load(folder: Path) -> torch.nn.Module:
        model = task.new_policy(context)
        load_trainable_state(model, torch.load(folder / "policy.pt", weights_only=True))
        return model.eval().requires_grad_(False)

    key = {"task": task.description, "data": repr(cfg.data), "model": repr(cfg.model), "reference": repr(cfg.reference),
           "generation": repr(cfg.generation), "labels": labels, "objective": objective,
           "optimizer": repr(cfg.optimizer), "beta": cfg.beta, "seed": cfg.seed, "epochs": epochs,
           "precision": cfg.trainer.precision, "random_stream": "pre_alignment"}
    # its own random stream (LoRA's initialisation and dropout): the model is the same whatever ran before, and a run
    # that finds it cached goes on with the same global random state as the run that trained it
    with torch.random.fork_rng():
        torch.manual_seed(seeds.seed("pre_alignment", cfg.seed, objective))
        return cached_folder(cfg.paths.cache_dir, "pre_aligned", key, build, load)


def train_pecaid(context: RunContext, algorithm: AlgorithmSpec, multipliers: torch.Tensor, iterations: int,
                 epochs: int, output_dir: Path, logger=None, ckpt_path: str | None = None, checkpoint: bool = False,
                 evaluator=None) -> Trained:
    """Pre-align, score pi_ref's rollouts implicitly, then CAID on the implicit scores (multipliers: ignored unless
    configured, lambda_0 is the one-shot solution on the implicit scores)."""
    cfg, task = context.cfg, context.task
    objectives = ["reward", *context.names]
    models = [pre_align(context, k, name, output_dir) for k, name in enumerate(objectives)]
    implicit = ImplicitScores(models, context.reference, cfg.beta, task, cfg.trainer.precision)
    reference_rollouts = context.reference_rollouts
    reference_scores = implicit.raw(reference_rollouts)
    index, prompts_total = reference_rollouts.prompt_index, len(task.prompts)
    centred = lambda s: s - per_prompt_means(s, index, prompts_total)[:, index]  # noqa: E731  (per-prompt constants
    # are what implicit rewards cannot know and what no comparison between responses of a prompt sees)
    implicit_centred, true_centred = centred(reference_scores), centred(context.reference_scores.float())
    correlation = {name: torch.corrcoef(torch.stack([implicit_centred[k], true_centred[k]]))[0, 1].item()
                   for k, name in enumerate(objectives)}
    log.info("PeCAID: implicit rewards against the scorers' scores on pi_ref's samples (each centred on its prompt's "
             "mean), correlation %s", {k: round(v, 3) for k, v in correlation.items()})
    implicit.center_on(reference_rollouts, reference_scores)
    reference_scores[1:] -= implicit.offsets[:, index]
    prompts = len(context.reference_prompts)
    reward, utility = reference_scores[0].view(prompts, -1), reference_scores[1:].view(len(objectives) - 1, prompts, -1)
    reference_mean = utility.mean(dim=(1, 2))  # 0 up to rounding: each utility is centred on its prompt's pi_ref mean
    # b is in the implicit utility's units (beta log-ratios of the pre-aligned models), not in any scorer's
    edge = edges(utility.double())
    log.info("PeCAID: thresholds %s against the largest improvements the implicit utilities reach on pi_ref's samples "
             "%s", [round(v, 4) for v in context.threshold.tolist()], [round(v, 4) for v in edge])
    try:
        one_shot = one_shot_multipliers(cfg, reward, utility, reference_mean, context.threshold)
    except ConfigError:
        thresholds, reachable = [round(v, 4) for v in context.threshold.tolist()], [round(e, 4) for e in edge]
        raise ConfigError(f"constraints ({', '.join(f'{n}.threshold' for n in context.names)}): {thresholds} is "
                          f"beyond the largest improvement {reachable} of the implicit utilities on pi_ref's samples; "
                          "PeCAID measures b in their units (beta log pi_k/pi_ref), so pick b below that") from None
    warning = edge_warning(context.names, context.threshold, utility)
    if warning:
        log.warning("PeCAID, implicit utilities: %s", warning)
    sampler = copy.copy(context.sampler)
    sampler.scorers = implicit  # the dual step's on-policy samples (and pairs_from=policy's) are scored implicitly too
    # the pairs: pi_ref's rollouts, or the dataset's responses (pairs_from=dataset) on prompts pi_ref may not have
    # sampled; the policy step compares responses to one prompt, so the raw scores serve
    pair_scores = reference_scores if context.rollouts is reference_rollouts else implicit.raw(context.rollouts)
    every_prompt_centred = bool(implicit.centred_prompts.all())
    implicit_context = dataclasses.replace(
        context, sampler=sampler, scores=pair_scores, reference_scores=reference_scores, reference_mean=reference_mean,
        one_shot=one_shot, dual_prompts=None if every_prompt_centred else context.reference_prompts)
    implicit_context = dataclasses.replace(implicit_context,
                                           pairs=task.pairs(implicit_context, context.rollouts, pair_scores))
    start = initial_multipliers(implicit_context, algorithm)
    log.info("PeCAID: lambda_0 = %s (one-shot on the implicit scores: %s)", [round(v, 4) for v in start.tolist()],
             [round(v, 4) for v in one_shot.tolist()])
    trained = train_policy(implicit_context, algorithm, start, iterations, epochs, output_dir, logger, ckpt_path,
                           checkpoint, evaluator)
    return dataclasses.replace(trained, one_shot=one_shot, details={
        "implicit_correlation": correlation, "implicit_one_shot_multipliers": one_shot.tolist(), "implicit_edge": edge,
        "implicit_evaluation": implicit_evaluation(implicit_context, implicit, trained.policy)})
