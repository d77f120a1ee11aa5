"""One training run of a policy: the policy step and its data, the dual callback with its estimator, the
LightningModule and the Trainer. `train_policy` is called once per algorithm run (and once more for the one-shot
comparison); what differs between algorithms comes from their spec (config/algorithms.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from dualign.config import AlgorithmSpec, Trigger
from dualign.core.dual_steps import within_prompt_scatter
from dualign.training import checkpoints
from dualign.training.context import RunContext
from dualign.training.data import loader, prompt_batches, tokenized
from dualign.training.dual_callback import ConstraintSample, DualUpdate
from dualign.training.module import AlignmentModule
from dualign.training.policy_steps import DPOStep, ExactStep, GroupDPOStep, PolicyGradientStep
from dualign.util import distributed, lifecycle, seeds, timing

log = logging.getLogger("dualign")

extra_callbacks: list[L.Callback] = []  # given to every Trainer of the process (tools/faults.py installs one)


@dataclass
class Trained:
    policy: torch.nn.Module
    dual: DualUpdate  # its history is the lambda trajectory
    module: AlignmentModule
    details: dict = field(default_factory=dict)  # what the summary should say besides (e.g. PeCAID's implicit rewards)
    one_shot: torch.Tensor | None = None  # the one-shot lambda where it is not the context's (PeCAID: implicit scores)


class PairData(L.LightningDataModule):
    """DPO pairs: drawn from pi_ref once (the paper), or from the current policy at the start of every iteration
    (`pairs_from: policy`; Lightning reloads the dataloader every E epochs)."""

    def __init__(self, context: RunContext, epochs_per_iteration: int):
        super().__init__()
        self.context, self.epochs = context, epochs_per_iteration

    def train_dataloader(self):
        cfg, pairs = self.context.cfg, self.context.pairs
        iteration = self.trainer.current_epoch // self.epochs if self.trainer else 0
        if cfg.policy_step.pairs_from == "policy" and iteration > 0:  # iteration 0: the policy is pi_ref
            pairs = self.context.pairs_from(self.trainer.lightning_module.policy,
                                            seed=seeds.seed("policy_pairs", cfg.seed, iteration))
        return loader(pairs, cfg.policy_step.batch_size, cfg.seed)


def _prompts(context: RunContext):
    cfg, count = context.cfg, len(context.task.prompts)
    return loader(prompt_batches(count, cfg.policy_step.steps_per_epoch), min(cfg.policy_step.batch_size, count), cfg.seed)


def _dpo(context: RunContext, epochs: int):
    cfg, allowed = context.cfg, context.task.allowed_token_ids
    if cfg.policy_step.pairs == "consecutive":
        step = DPOStep(cfg.beta, cfg.policy_step.labels, allowed)
    else:
        step = GroupDPOStep(cfg.beta, cfg.policy_step.pairs, cfg.policy_step.labels, allowed, cfg.seed,
                            context.task.group_logprobs)
    return step, PairData(context, epochs)


def _exact(context: RunContext, epochs: int):
    enumeration = context.require_enumeration("policy_step.name=exact")
    instance = enumeration.oracle.instance
    step = ExactStep(enumeration.logprobs, context.cfg.beta, instance.reward, instance.utility, instance.ref_logprob)
    return step, _prompts(context)


def _policy_gradient(context: RunContext, epochs: int):
    cfg, task = context.cfg, context.task

    def sample_and_score(policy, prompt_index, samples, seed):
        rollouts, scores = context.sample_and_score(policy, prompt_index, samples, seed)
        return (scores, *tokenized(task.prompt_token_ids, rollouts, task.tokenizer.pad_token_id))

    step = PolicyGradientStep(cfg.beta, context.reference, sample_and_score, cfg.policy_step.samples_per_prompt,
                              context.reference_mean, context.threshold, cfg.seed, task.allowed_token_ids)
    return step, _prompts(context)


POLICY_STEPS = {"dpo": _dpo, "exact": _exact, "policy_gradient": _policy_gradient}


def rollout_estimator(context: RunContext):
    """CAID's on-policy dual step: Q prompts x K responses of the current policy, the prompts sharded over ranks; the
    callback reduces the sums of every rank (the mean of g, and its within-prompt covariance for the Newton step)."""
    cfg = context.cfg

    def estimate(policy, iteration):
        pool = context.dual_prompts or range(len(context.task.prompts))
        generator = torch.Generator().manual_seed(seeds.seed("dual_prompts", cfg.seed, iteration))
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=generator)[: cfg.algorithm.dual_prompts].tolist()]
        mine = distributed.shard(chosen)
        m = len(context.names)
        if not mine:
            return ConstraintSample(torch.zeros(m), 0, torch.zeros(m, m), 0)
        seed = seeds.seed("dual_rollouts", cfg.seed, iteration, rank=distributed.rank())
        rollouts, scores = context.sample_and_score(policy, mine, cfg.algorithm.dual_samples, seed)
        scatter, dof = within_prompt_scatter(scores[1:], rollouts.prompt_index)
        return ConstraintSample(scores[1:].sum(-1), scores.shape[-1], scatter.float(), dof)

    return estimate, context.reference_mean, context.threshold


def exact_estimator(context: RunContext):
    """The exact E_pi[g] against the exact E_ref[g] (dual_estimator=exact)."""
    enumeration = context.require_enumeration("algorithm.dual_estimator=exact")
    instance = enumeration.oracle.instance

    def estimate(policy, iteration):
        prompts = torch.tensor(distributed.shard(list(range(instance.reward.shape[0]))), dtype=torch.long)
        with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
            prob = enumeration.logprobs(policy, prompts).double().exp()
        utility = instance.utility[:, prompts]
        per_prompt = (prob * utility).sum(-1)  # exact E_pi[g | x], [m, prompts of this rank]
        centred = utility - per_prompt.unsqueeze(-1)
        covariance = torch.einsum("ipn,jpn,pn->ij", centred, centred, prob)  # sum over prompts of Cov_pi(g | x)
        # one unit per prompt: summed and counted over ranks, the means are the exact E_pi[g] and E_x Cov_pi(g | x)
        return ConstraintSample(per_prompt.sum(-1).float(), len(prompts), covariance.float(), len(prompts))

    return estimate, instance.reference_mean, instance.threshold


ESTIMATORS = {"rollout": rollout_estimator, "exact": exact_estimator}


def step_sizes(cfg) -> torch.Tensor:
    """Each constraint's eta (or alpha): its own, else algorithm.step_size, else NaN: sized from the curvature at
    every dual step (core/dual_steps.curvature_step_sizes)."""
    chosen = [c.step_size if c.step_size is not None else cfg.algorithm.step_size for c in cfg.constraints.values()]
    return torch.tensor([float("nan") if value is None else value for value in chosen])


def initial_multipliers(context: RunContext, algorithm: AlgorithmSpec) -> torch.Tensor:
    """A constraint's own initial_multiplier, else algorithm.initial_multiplier, else the one-shot lambda* where the
    algorithm warm-starts, else 0."""
    cfg, values, cold = context.cfg, [], []
    curvature_sized = torch.isnan(step_sizes(cfg)).tolist()
    for i, (name, constraint) in enumerate(cfg.constraints.items()):
        chosen = constraint.initial_multiplier
        chosen = cfg.algorithm.initial_multiplier if chosen is None else chosen
        if chosen is None:
            chosen = context.one_shot[i].item() if algorithm.warm_start else 0.0
            by_hand = not algorithm.warm_start  # a warm start's 0 is the one-shot lambda of an inactive constraint
        else:
            by_hand = True
        values.append(chosen)
        if chosen == 0.0 and by_hand and curvature_sized[i]:
            cold.append(name)
    if cold and algorithm.updates_multipliers and cfg.algorithm.dual_rule == "projected":
        # docs/dual_rules.md, cold start: 5-6 iterations to 10% of b against Newton's 2-3
        log.warning("lambda_%s starts at 0 with half-Newton dual steps (algorithm.step_size null), which are damped "
                    "for a warm start and take several iterations to climb from 0; algorithm.dual_rule=newton gets "
                    "there in 2-3", "/lambda_".join(cold))
    return torch.tensor(values, dtype=torch.float32)


def train_policy(context: RunContext, algorithm: AlgorithmSpec, multipliers: torch.Tensor, iterations: int, epochs: int,
                 output_dir: Path, logger=None, ckpt_path: str | None = None, checkpoint: bool = False,
                 evaluator=None, callbacks: list | None = None, policy: torch.nn.Module | None = None) -> Trained:
    """Train a fresh copy of pi_ref for iterations x epochs epochs at `multipliers`, which the algorithm's trigger
    updates (after every iteration, every k optimiser steps, or never: the constraint is then measured at the end).
    `policy`: start from this one instead of a fresh copy of pi_ref (a stepwise algorithm's later stages)."""
    cfg = context.cfg
    policy = policy if policy is not None else context.task.new_policy(context)
    policy.train()
    step, data = POLICY_STEPS[cfg.policy_step.name](context, epochs)
    estimator, reference_mean, threshold = ESTIMATORS[cfg.algorithm.dual_estimator](context)
    dual = DualUpdate(
        estimator, context.names, reference_mean, threshold, step_sizes(cfg), epochs,
        update=algorithm.updates_multipliers, max_multiplier=cfg.algorithm.max_multiplier, evaluator=evaluator,
        rule=cfg.algorithm.dual_rule,
        every_n_steps=cfg.algorithm.dual_every_steps if algorithm.trigger == Trigger.steps else None,
        beta=cfg.beta, trust_radius=cfg.algorithm.trust_radius,
    )
    module = AlignmentModule(policy, step, multipliers, cfg.optimizer, epochs)
    callbacks = [dual, *(callbacks or []), *extra_callbacks]
    if checkpoint:  # every rank holds the callback (ranks must agree on it); Lightning writes on rank 0
        module.config_fingerprint = checkpoints.fingerprint(cfg)
        callbacks.append(checkpoints.callback(output_dir / "checkpoints"))
    trainer = L.Trainer(
        max_epochs=iterations * epochs, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes, strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision, log_every_n_steps=cfg.trainer.log_every_n_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val, enable_progress_bar=cfg.trainer.enable_progress_bar,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        logger=logger if logger is not None else False, callbacks=callbacks, enable_checkpointing=checkpoint,
        enable_model_summary=False, default_root_dir=output_dir, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # EpochShuffle shards by rank itself (same batches as one process)
        reload_dataloaders_every_n_epochs=epochs if cfg.policy_step.pairs_from == "policy" else 0,
    )
    with timing.stage(f"{step.__class__.__name__} policy steps (Lightning fit)"), lifecycle.fitting():
        if isinstance(data, L.LightningDataModule):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        else:
            trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
    policy.eval()
    return Trained(policy, dual, module)
