"""One training job: the task prepares the run (pi_ref, its rollouts, the one-shot dual solution, the pairs), the
algorithm trains the policy, the task's evaluator measures it, and the one writer reports it. `train.py` only
calls `run` (through cli.py)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from dualign import tasks
from dualign.config import ALGORITHMS, TrainConfig, spec, validate
from dualign.tracking import mlflow, outputs
from dualign.tracking.preflight import preflight
from dualign.tracking.summary import RunSummary
from dualign.training import checkpoints
from dualign.training.fit import initial_multipliers, train_policy
from dualign.training.preference import train_pecaid
from dualign.training.stepwise import train_stepwise
from dualign.util import distributed, lifecycle, progress, timing
from dualign.util.console import quiet_libraries

RUNNERS = {"lagrangian": train_policy, "stepwise": train_stepwise, "preference": train_pecaid}  # AlgorithmSpec.runner

log = logging.getLogger("dualign")


def run(raw_cfg: DictConfig) -> dict:
    """The whole job. Returns the metrics a sweep optimises (RunSummary.sweep_metrics); {} on ranks other than 0."""
    started = time.perf_counter()
    timing.reset()
    cfg = validate(raw_cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    quiet_libraries()
    progress.enabled = cfg.trainer.enable_progress_bar
    preflight(cfg)  # output folders writable, tracking store reachable: before anything is built
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path, changes = checkpoints.resume_point(cfg, output_dir)  # verified, and trained with this config
    # only rank 0 tracks: the other ranks of a distributed run re-run this entry point without a logger
    # a requeued attempt continues the MLflow run of the first, whose id sits beside the checkpoints
    resumed = output_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else ckpt_path
    logger = mlflow.open_logger(cfg, raw_cfg, Path(resumed) if resumed else None) if distributed.is_main() else None
    if not cfg.logger.enabled and distributed.is_main():
        log.warning("MLflow tracking is off (logger.enabled=false, as debug=fast sets it): the results are in %s only",
                    output_dir)
    if distributed.is_main():
        checkpoints.record_changes(output_dir, changes, logger)
    with lifecycle.terminations(logger):  # the MLflow run ends with the job: FINISHED, FAILED or KILLED
        return _run(cfg, raw_cfg, output_dir, ckpt_path, logger, started)


def _run(cfg: TrainConfig, raw_cfg: DictConfig, output_dir: Path, ckpt_path: str | None, logger, started: float) -> dict:
    task = tasks.build(cfg)
    context = task.prepare()
    timings = {"setup (pi_ref, rollouts, one-shot solve)": time.perf_counter() - started}
    # per-iteration evaluation where the task does it (pi_ref's evaluation runs before training starts)
    evaluator = task.evaluator(context) if task.evaluates_every_iteration else None
    algorithm = spec(cfg.algorithm.name)
    iterations, epochs = algorithm.schedule(cfg.algorithm.iterations, cfg.algorithm.epochs_per_iteration)

    tic = time.perf_counter()
    train = RUNNERS[algorithm.runner]
    trained = train(context, algorithm, initial_multipliers(context, algorithm), iterations, epochs, output_dir, logger,
                    ckpt_path, checkpoint=True, evaluator=evaluator)
    timings[f"{algorithm.name} training"] = time.perf_counter() - tic
    comparison = None
    if algorithm.compares_one_shot and cfg.algorithm.compare_one_shot:  # same instance, same epoch budget
        tic = time.perf_counter()
        comparison = train_policy(context, ALGORITHMS["one_shot"], context.one_shot.clone(), 1, iterations * epochs,
                                  output_dir / "one_shot", evaluator=evaluator)
        timings["one_shot comparison training"] = time.perf_counter() - tic

    tic = time.perf_counter()
    evaluator = evaluator or task.evaluator(context)
    final = evaluator(trained.policy)  # every rank evaluates (its share of the prompts, on a text task)
    one_shot = {"multipliers": context.one_shot.tolist(), "final": evaluator(comparison.policy)} if comparison else None
    timings["evaluation"] = time.perf_counter() - tic
    if not distributed.is_main():  # rank 0 saves and reports
        return {}
    with timing.stage("writing outputs"):
        files, details = task.save(context, trained.policy, output_dir)
        details = {**details, **trained.details}
        timings["by stage"] = timing.breakdown()
        summary = RunSummary(
            algorithm=cfg.algorithm.name, policy_step=cfg.policy_step.name, beta=cfg.beta, task=task.description,
            evaluation=evaluator.name, constraints=context.names, threshold=evaluator.threshold,
            reference_mean_estimate=context.reference_mean.tolist(),
            one_shot_multipliers=(context.one_shot if trained.one_shot is None else trained.one_shot).tolist(),
            trajectory=trained.dual.history, final=final, reference=evaluator.reference, optimum=evaluator.optimum,
            one_shot=one_shot, timings_s=timings, details=details)
        outputs.write(summary, output_dir, raw_cfg, logger, files)
    return summary.sweep_metrics()
