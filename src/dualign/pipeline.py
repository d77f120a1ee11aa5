"""One training run: build the task, pi_ref, the reference rollouts and the one-shot dual solution, then train the
policy with the configured algorithm, evaluate exactly and write the run's files. `train.py` only calls `run`."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from . import report
from .config import ConfigError, TrainConfig, validate
from .data import loader, preference_pairs, prompt_batches, tokenized
from .dual_callback import DualUpdate
from .duality import solve_dual
from .exact_task import ExactTask, reference_policy
from .module import AlignmentModule
from .oracle import ExactOracle, Instance
from .policy_steps import DPOStep, ExactStep, PolicyGradientStep
from .rollout import sample_responses
from .scorers import Negated, score_all

log = logging.getLogger("dualign")


@dataclass
class Setup:
    """Everything the algorithms share on one instance."""

    cfg: TrainConfig
    task: ExactTask
    reference: torch.nn.Module
    scorers: list  # reward first, then one per constraint
    names: list[str]
    # filled by build() from the reference rollouts and the enumeration
    reference_mean: torch.Tensor | None = None  # E_ref[g_i] estimated from the reference rollouts
    threshold: torch.Tensor | None = None  # b_i, required improvements
    one_shot: torch.Tensor | None = None  # plug-in lambda* from the reference rollouts
    pairs: object = None  # preference pairs from pi_ref with cached reference log-probabilities
    oracle: ExactOracle | None = None
    task_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # every task scorer over every (x, y), [P, N]

    def sample_and_score(self, model, prompt_index, samples: int, seed: int):
        """The one rollout path: `samples` responses per prompt from `model`, scored by reward and constraints."""
        task, cfg = self.task, self.cfg
        chosen = [int(i) for i in prompt_index]
        rollouts = sample_responses(
            model, task.tokenizer, [task.prompts[i] for i in chosen], [task.prompt_token_ids[i] for i in chosen],
            samples, task.cfg.response_length, seed=seed, temperature=cfg.reference.temperature,
            top_p=cfg.reference.top_p, min_new_tokens=task.cfg.response_length, allowed_token_ids=task.allowed_token_ids,
        )
        rollouts.prompt_index = torch.tensor(chosen)[rollouts.prompt_index]  # back to task prompt indices
        return rollouts, score_all(self.scorers, rollouts.prompts, rollouts.responses)

    def pairs_from(self, model, num_iterations: int, seed: int):
        """Preference pairs from `model`'s rollouts, with reference log-probabilities computed once for them."""
        rollouts, scores = self.sample_and_score(model, range(len(self.task.prompts)),
                                                 self.cfg.reference.samples_per_prompt, seed)
        return preference_pairs(self.task.prompt_token_ids, rollouts, scores, self.reference,
                                self.task.tokenizer.pad_token_id, num_iterations, seed, self.task.allowed_token_ids)


def _thresholds(cfg: TrainConfig, reference_mean: torch.Tensor) -> torch.Tensor:
    return torch.tensor([c.threshold if c.threshold_type == "improvement" else c.threshold - reference_mean[i].item()
                         for i, c in enumerate(cfg.constraints.values())])


def build(cfg: TrainConfig) -> Setup:
    task = ExactTask(cfg.data)
    reference = reference_policy(task, cfg.model, cfg.paths.cache_dir)
    available = task.scorers()
    names = list(cfg.constraints)
    scorers = [available[cfg.reward.scorer]] + [
        Negated(available[c.scorer]) if c.negate else available[c.scorer] for c in cfg.constraints.values()
    ]
    P, samples = len(task.prompts), cfg.reference.samples_per_prompt
    setup = Setup(cfg, task, reference, scorers, names)

    # pi_ref rollouts: DPO pairs, E_ref[g] and the one-shot plug-in dual all come from these samples
    rollouts, scores = setup.sample_and_score(reference, range(P), samples, seed=cfg.seed)
    reward, utility = scores[0].view(P, samples), scores[1:].view(len(names), P, samples)
    setup.reference_mean = utility.mean(dim=(1, 2))
    setup.threshold = _thresholds(cfg, setup.reference_mean)
    setup.one_shot = solve_dual(reward, utility, setup.reference_mean, setup.threshold, cfg.beta).multipliers.float()
    setup.pairs = preference_pairs(task.prompt_token_ids, rollouts, scores, reference, task.tokenizer.pad_token_id,
                                   cfg.algorithm.iterations, cfg.seed, task.allowed_token_ids)

    # the exact instance: every response of every prompt, scored by the same scorers
    all_prompts = [p for p in task.prompts for _ in task.responses]
    all_scores = score_all(scorers, all_prompts, task.responses * P).view(-1, P, task.num_responses)
    with torch.no_grad():
        ref_logprob = task.enumerate_logprobs(reference)
    exact_reference_mean = (ref_logprob.exp() * all_scores[1:]).sum(-1).mean(-1)
    instance = Instance(ref_logprob, all_scores[0], all_scores[1:], cfg.beta, _thresholds(cfg, exact_reference_mean))
    setup.oracle = ExactOracle(instance)
    setup.task_scores = {name: scorer.table for name, scorer in available.items()}
    return setup


def _rollout_estimator(setup: Setup):
    cfg = setup.cfg

    def estimate(policy, iteration):
        generator = torch.Generator().manual_seed(60_000 + 1_000 * cfg.seed + iteration)
        chosen = torch.randperm(len(setup.task.prompts), generator=generator)[: cfg.algorithm.dual_prompts]
        _, scores = setup.sample_and_score(policy, chosen, cfg.algorithm.dual_samples, 70_000 + 1_000 * cfg.seed + iteration)
        return scores[1:].sum(-1), scores.shape[-1]

    return estimate


def _exact_estimator(setup: Setup):
    instance = setup.oracle.instance

    def estimate(policy, iteration):
        with torch.no_grad():
            prob = setup.task.enumerate_logprobs(policy).double().exp()
        mean = (prob * instance.utility).sum(-1).mean(-1)  # exact E_pi[g], weight 1 per prompt
        # reported as the sample-mean of an equivalent count so ranks can still reduce sums and counts
        return (mean * prob.shape[0]).float(), prob.shape[0]

    return estimate


def _exact_evaluator(setup: Setup):
    def evaluate(policy):
        with torch.no_grad():
            return setup.oracle.evaluate(setup.task.enumerate_logprobs(policy))

    return evaluate


class PairData(L.LightningDataModule):
    """DPO pairs: drawn from pi_ref once (the paper), or from the current policy at the start of every iteration
    (`pairs_from: policy`; Lightning reloads the dataloader every E epochs)."""

    def __init__(self, setup: Setup, epochs_per_iteration: int):
        super().__init__()
        self.setup_, self.epochs = setup, epochs_per_iteration

    def train_dataloader(self):
        cfg = self.setup_.cfg
        pairs = self.setup_.pairs
        iteration = self.trainer.current_epoch // self.epochs if self.trainer else 0
        if cfg.policy_step.pairs_from == "policy" and iteration > 0:  # iteration 0: the policy is pi_ref
            pairs = self.setup_.pairs_from(self.trainer.lightning_module.policy, cfg.algorithm.iterations,
                                           seed=90_000 + 1_000 * cfg.seed + iteration)
        return loader(pairs, cfg.policy_step.batch_size, cfg.seed)


def _policy_step_and_data(setup: Setup, epochs: int):
    cfg, task = setup.cfg, setup.task
    name = cfg.policy_step.name
    if name == "dpo":
        return DPOStep(cfg.beta, cfg.policy_step.labels, task.allowed_token_ids), PairData(setup, epochs)
    prompts = loader(prompt_batches(len(task.prompts), cfg.policy_step.steps_per_epoch),
                     min(cfg.policy_step.batch_size, len(task.prompts)), cfg.seed)
    if name == "exact":
        instance = setup.oracle.instance
        return ExactStep(task, cfg.beta, instance.reward, instance.utility, instance.ref_logprob), prompts

    def sample_and_score(policy, prompt_index, samples, seed):
        rollouts, scores = setup.sample_and_score(policy, prompt_index, samples, seed)
        return (scores, *tokenized(task.prompt_token_ids, rollouts, task.tokenizer.pad_token_id))

    step = PolicyGradientStep(cfg.beta, setup.reference, sample_and_score, cfg.policy_step.samples_per_prompt,
                              setup.reference_mean, setup.threshold, cfg.seed, task.allowed_token_ids)
    return step, prompts


def train_policy(setup: Setup, multipliers: torch.Tensor, algorithm: str, iterations: int, epochs: int,
                 output_dir: Path, logger=None, ckpt_path: str | None = None):
    """Train a fresh copy of pi_ref for iterations * epochs epochs. caid: a dual step after every iteration;
    primal_dual: every k optimiser steps; one_shot / fixed_lambda: lambda fixed, the constraint measured at the end.
    Returns the trained policy and the DualUpdate callback (its history is the lambda trajectory)."""
    cfg = setup.cfg
    policy = type(setup.reference)(setup.reference.config)
    policy.load_state_dict(setup.reference.state_dict())
    policy.train()
    step, data = _policy_step_and_data(setup, epochs)
    if cfg.algorithm.dual_estimator == "exact":  # exact E_pi[g] against the exact E_ref[g]
        estimator, reference_mean = _exact_estimator(setup), setup.oracle.instance.reference_mean
        threshold = setup.oracle.instance.threshold
    else:
        estimator, reference_mean, threshold = _rollout_estimator(setup), setup.reference_mean, setup.threshold
    dual = DualUpdate(
        estimator, setup.names, reference_mean, threshold, step_sizes(cfg), epochs,
        update=algorithm in ("caid", "primal_dual"), max_multiplier=cfg.algorithm.max_multiplier,
        evaluator=_exact_evaluator(setup), rule=cfg.algorithm.dual_rule,
        every_n_steps=cfg.algorithm.dual_every_steps if algorithm == "primal_dual" else None,
    )
    module = AlignmentModule(policy, step, multipliers, cfg.optimizer, epochs)
    callbacks = [dual]
    if logger is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1,
            save_on_train_epoch_end=True,
        ))
    trainer = L.Trainer(
        max_epochs=iterations * epochs, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        precision=cfg.trainer.precision, log_every_n_steps=cfg.trainer.log_every_n_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val, enable_progress_bar=cfg.trainer.enable_progress_bar,
        logger=logger if logger is not None else False, callbacks=callbacks, enable_checkpointing=logger is not None,
        enable_model_summary=False, default_root_dir=output_dir, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=epochs if cfg.policy_step.pairs_from == "policy" else 0,
    )
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
    policy.eval()
    return policy, dual, module


def step_sizes(cfg: TrainConfig) -> torch.Tensor:
    return torch.tensor([c.step_size if c.step_size is not None else cfg.algorithm.step_size
                         for c in cfg.constraints.values()])


def initial_multipliers(setup: Setup) -> torch.Tensor:
    cfg = setup.cfg
    values = []
    for i, constraint in enumerate(cfg.constraints.values()):
        if constraint.initial_multiplier is not None:
            values.append(constraint.initial_multiplier)
        elif cfg.algorithm.initial_multiplier is not None:
            values.append(cfg.algorithm.initial_multiplier)
        elif cfg.algorithm.name in ("caid", "one_shot"):  # caid warm-starts at the one-shot solution
            values.append(setup.one_shot[i].item())
        else:
            values.append(0.0)
    return torch.tensor(values, dtype=torch.float32)


def _mlflow_logger(cfg: TrainConfig, raw: DictConfig, resume_from: Path | None):
    """MLFlowLogger on the configured store. A run resumed from a checkpoint continues the MLflow run whose id was
    saved beside it (params are immutable in MLflow, so they are logged once, by the first run)."""
    if not cfg.logger.enabled:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    uri = cfg.logger.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    id_file = resume_from.parent / "mlflow_run_id" if resume_from else None
    run_id = id_file.read_text().strip() if id_file and id_file.exists() else None
    tags = {"algorithm": cfg.algorithm.name, "policy_step": cfg.policy_step.name, **cfg.logger.tags}
    if cfg.logger.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.logger.parent_run_id
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment_name, run_name=cfg.logger.run_name or cfg.algorithm.name,
        tracking_uri=uri, tags=tags, run_id=run_id,
    )
    if run_id is None:
        logger.log_hyperparams(report.flatten(OmegaConf.to_container(raw, resolve=True)))
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "mlflow_run_id").write_text(logger.run_id)
    return logger


def _quiet_libraries() -> None:
    """Keep the console for progress bars and the final table."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def run(raw_cfg: DictConfig) -> dict:
    """The whole job. Returns the metrics a sweep optimises: the exact objective J, E[r], KL, TV to pi*, each
    constraint's achieved improvement and `constraint_violation` (b_i - achieved_i; feasible when all <= 0)."""
    started = time.perf_counter()
    cfg = validate(raw_cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _quiet_libraries()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    logger = _mlflow_logger(cfg, raw_cfg, Path(ckpt_path) if ckpt_path else None)

    setup = build(cfg)
    timings = {"setup (pi_ref, rollouts, one-shot solve)": time.perf_counter() - started}
    multipliers = initial_multipliers(setup)
    algorithm = cfg.algorithm
    if algorithm.name in ("caid", "primal_dual"):
        iterations, epochs = algorithm.iterations, algorithm.epochs_per_iteration
    else:  # trained once, same epoch budget; the callback still measures the constraint at the end
        iterations, epochs = 1, algorithm.iterations * algorithm.epochs_per_iteration
    tic = time.perf_counter()
    policy, dual, _ = train_policy(setup, multipliers, algorithm.name, iterations, epochs, output_dir, logger, ckpt_path)
    timings[f"{algorithm.name} training"] = time.perf_counter() - tic

    comparison = None
    if algorithm.name == "caid" and algorithm.compare_one_shot:
        tic = time.perf_counter()
        one_shot_policy, one_shot_dual, _ = train_policy(setup, setup.one_shot.clone(), "one_shot", 1,
                                                         iterations * epochs, output_dir / "one_shot", None)
        with torch.no_grad():
            one_shot_logprob = setup.task.enumerate_logprobs(one_shot_policy).double()
        comparison = {"multipliers": setup.one_shot.tolist(), "exact": one_shot_dual.history[-1]["exact"],
                      "scores": report.task_score_means(setup, one_shot_logprob)}
        timings["one_shot comparison training"] = time.perf_counter() - tic

    with torch.no_grad():
        final_logprob = setup.task.enumerate_logprobs(policy).double()
    summary = report.summarise(setup, dual.history, final_logprob, comparison, timings)
    files = report.write_outputs(output_dir, setup, final_logprob, summary, raw_cfg)
    if logger is not None:
        report.log_to_mlflow(logger, summary, files)
    print(report.table(summary))
    print(f"outputs: {output_dir.resolve()}")
    final = summary["final"]
    metrics = {"objective": final["objective"], "reward": final["reward"], "kl": final["kl"],
               "tv_to_optimum": final["tv_to_optimum"],
               "constraint_violation": [-slack for slack in final["slack"]]}
    metrics.update({f"improvement_{name}": final["improvement"][i] for i, name in enumerate(setup.names)})
    return metrics
