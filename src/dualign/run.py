"""One training run: build the task, pi_ref, the reference rollouts and the one-shot dual solution, then train the
policy with the configured algorithm, evaluate exactly and write the run's files. `train.py` only calls `run`."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dualign.config import ConfigError, TrainConfig, validate
from dualign.core.duality import InfeasibleError, require_converged, solve_dual
from dualign.core.oracle import ExactOracle, Instance
from dualign.models.rollout import sample_responses
from dualign.models.scorers import score_all
from dualign.tasks.exact import ExactTask, ExactTaskConfig, reference_policy
from dualign.tracking import report
from dualign.training import checkpoints
from dualign.training.data import loader, preference_pairs, prompt_batches, tokenized
from dualign.training.dual_callback import DualUpdate
from dualign.training.module import AlignmentModule, autocast_dtype
from dualign.training.policy_steps import DPOStep, ExactStep, PolicyGradientStep
from dualign.util import distributed, lifecycle, timing

log = logging.getLogger("dualign")


@dataclass
class Setup:
    """Everything the algorithms share on one instance: the task (exact or text), pi_ref, the scorers, and what the
    pi_ref rollouts give (E_ref[g], thresholds, the one-shot lambda, DPO pairs)."""

    cfg: TrainConfig
    task: object = None  # ExactTask or TextTask: prompts, prompt_token_ids, tokenizer, response length
    reference: torch.nn.Module | None = None
    scorers: list = field(default_factory=list)  # reward first, then one utility per constraint
    names: list[str] = field(default_factory=list)
    raw_scorers: dict = field(default_factory=dict)  # text tasks: each used scorer by name, before negation
    policy: torch.nn.Module | None = None  # text tasks: the loaded policy (with LoRA, pi_ref is a view of it)
    reference_prompts: list[int] | None = None  # prompts with pi_ref rollouts (None: all)
    # filled by build() from the reference rollouts (and, on the exact task, the enumeration)
    reference_mean: torch.Tensor | None = None  # E_ref[g_i] estimated from the reference rollouts
    threshold: torch.Tensor | None = None  # b_i, required improvements
    one_shot: torch.Tensor | None = None  # plug-in lambda* from the reference rollouts
    pairs: object = None  # preference pairs with cached reference log-probabilities
    oracle: ExactOracle | None = None  # exact task only
    task_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # exact task: every table, [P, N]
    evaluator: object = None  # text tasks: the TextEvaluator, once built
    vllm: object = None  # generation.backend=vllm: the engine, once built

    @property
    def exact(self) -> bool:
        return isinstance(self.task, ExactTask)

    def thresholds(self, reference_mean: torch.Tensor) -> torch.Tensor:
        return torch.tensor([c.threshold if c.threshold_type == "improvement" else c.threshold - reference_mean[i].item()
                             for i, c in enumerate(self.cfg.constraints.values())])

    def sample_and_score(self, model, prompt_index, samples: int, seed: int, prompt_set=None, score: bool = True):
        """The one rollout path: `samples` responses per prompt from `model`, scored by reward and constraints
        ([1 + m, n]; None when score=False). prompt_set: the task's training prompts unless given (test prompts)."""
        source = prompt_set or self.task
        chosen = [int(i) for i in prompt_index]
        with timing.stage("rollouts (generate)"):
            rollouts = self._generate(model, [source.prompts[i] for i in chosen],
                                      [source.prompt_token_ids[i] for i in chosen], samples, seed)
        rollouts.prompt_index = torch.tensor(chosen, dtype=torch.long)[rollouts.prompt_index]  # back to task indices
        if not score:
            return rollouts, None
        with timing.stage("scoring"):
            return rollouts, score_all(self.scorers, rollouts.prompts, rollouts.responses, rollouts.finished)

    def _generate(self, model, prompts, prompt_ids, samples: int, seed: int):
        task, generation = self.task, self.cfg.generation
        if generation.backend == "vllm":
            if self.vllm is None:
                from dualign.models.vllm_backend import VLLMGenerator

                self.vllm = VLLMGenerator(self.cfg)
            return self.vllm.sample(model, self.reference, task.tokenizer, prompts, prompt_ids, samples,
                                    task.max_new_tokens, seed, generation.temperature, generation.top_p,
                                    task.min_new_tokens)
        return sample_responses(
            model, task.tokenizer, prompts, prompt_ids, samples, task.max_new_tokens, seed=seed,
            temperature=generation.temperature, top_p=generation.top_p, min_new_tokens=task.min_new_tokens,
            allowed_token_ids=task.allowed_token_ids, batch_size=generation.batch_size, cache=generation.cache,
        )

    def pairs_with_reference(self, rollouts, scores, cache_key: dict | None = None):
        """DPO pairs (consecutive responses of a prompt) with reference log-probabilities computed once for them
        (text tasks: cached on disk under cache_key)."""
        ref_logps = None
        if cache_key is not None and not self.exact:
            from dualign.tasks.text import reference_logps

            ref_logps = reference_logps(self, rollouts, self.task.prompt_token_ids, cache_key)
        return preference_pairs(self.task.prompt_token_ids, rollouts, scores, self.reference,
                                self.task.tokenizer.pad_token_id, self.cfg.algorithm.iterations, self.cfg.seed,
                                self.task.allowed_token_ids, ref_logps=ref_logps,
                                batch_size=1024 if self.exact else 2 * self.cfg.policy_step.batch_size,
                                autocast_dtype=autocast_dtype(self.cfg.trainer.precision))

    def pairs_from(self, model, seed: int):
        """Preference pairs from `model`'s rollouts on the reference prompts (pairs_from=policy)."""
        prompts = self.reference_prompts if self.reference_prompts is not None else range(len(self.task.prompts))
        rollouts, scores = self.sample_and_score(model, prompts, self.cfg.reference.samples_per_prompt, seed)
        return self.pairs_with_reference(rollouts, scores)

    def new_policy(self) -> torch.nn.Module:
        """A trainable policy starting at pi_ref. Text tasks hand out the loaded policy first (with LoRA, the
        reference is that network with adapters off), then fresh loads (the one-shot comparison)."""
        if self.exact:
            policy = type(self.reference)(self.reference.config)
            policy.load_state_dict(self.reference.state_dict())
            return policy
        if self.policy is not None:
            policy, self.policy = self.policy, None
            return policy
        from dualign.models.hf import load_policy

        return load_policy(self.cfg.model)


def build(cfg: TrainConfig) -> Setup:
    setup = Setup(cfg)
    if not isinstance(cfg.data, ExactTaskConfig):
        from dualign.tasks.text import build_text

        build_text(setup)
        return setup
    task = ExactTask(cfg.data)
    reference = reference_policy(task, cfg.model, cfg.paths.cache_dir)
    from dualign.tasks.text import load_scorers

    _, scorers = load_scorers(cfg, available=task.scorers())  # the tables, and any configured scorer beside them
    names = list(cfg.constraints)
    P, samples = len(task.prompts), cfg.reference.samples_per_prompt
    setup.task, setup.reference, setup.scorers, setup.names = task, reference, scorers, names

    # pi_ref rollouts: DPO pairs, E_ref[g] and the one-shot plug-in dual all come from these samples
    rollouts, scores = setup.sample_and_score(reference, range(P), samples, seed=cfg.seed)
    reward, utility = scores[0].view(P, samples), scores[1:].view(len(names), P, samples)
    setup.reference_mean = utility.mean(dim=(1, 2))
    setup.threshold = setup.thresholds(setup.reference_mean)
    setup.one_shot = one_shot_multipliers(cfg, reward, utility, setup.reference_mean, setup.threshold)
    setup.pairs = setup.pairs_with_reference(rollouts, scores)

    # the exact instance: every response of every prompt, scored by the same scorers
    all_prompts = [p for p in task.prompts for _ in task.responses]
    all_scores = score_all(scorers, all_prompts, task.responses * P).view(-1, P, task.num_responses)
    with torch.no_grad():
        ref_logprob = task.enumerate_logprobs(reference)
    exact_reference_mean = (ref_logprob.exp() * all_scores[1:]).sum(-1).mean(-1)
    instance = Instance(ref_logprob, all_scores[0], all_scores[1:], cfg.beta, setup.thresholds(exact_reference_mean))
    setup.oracle = ExactOracle(instance)
    setup.task_scores = {name: scorer.table for name, scorer in task.scorers().items()}
    return setup


def one_shot_multipliers(cfg: TrainConfig, reward, utility, reference_mean, threshold) -> torch.Tensor:
    """The plug-in lambda* on pi_ref's samples; an unreachable threshold is a one-line error naming the constraints."""
    try:
        solution = solve_dual(reward, utility, reference_mean, threshold, cfg.beta)
    except InfeasibleError as error:
        raise ConfigError(f"constraints ({', '.join(f'{n}.threshold' for n in cfg.constraints)}): {error}") from None
    return require_converged(solution, "the one-shot lambda on pi_ref's samples").multipliers.float()


def _rollout_estimator(setup: Setup):
    """CAID's on-policy dual step: Q prompts x K responses of the current policy, the prompts sharded over ranks; the
    callback reduces the (sum, count) of every rank."""
    cfg = setup.cfg

    def estimate(policy, iteration):
        generator = torch.Generator().manual_seed(60_000 + 1_000 * cfg.seed + iteration)
        chosen = torch.randperm(len(setup.task.prompts), generator=generator)[: cfg.algorithm.dual_prompts].tolist()
        mine = distributed.shard(chosen)
        if not mine:
            return torch.zeros(len(setup.names)), 0
        seed = 70_000 + 1_000 * cfg.seed + iteration + 7_919 * distributed.rank()
        _, scores = setup.sample_and_score(policy, mine, cfg.algorithm.dual_samples, seed)
        return scores[1:].sum(-1), scores.shape[-1]

    return estimate


def _exact_estimator(setup: Setup):
    instance = setup.oracle.instance

    def estimate(policy, iteration):
        prompts = torch.tensor(distributed.shard(list(range(setup.task.cfg.num_prompts))), dtype=torch.long)
        with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
            prob = setup.task.enumerate_logprobs(policy, prompts).double().exp()
        per_prompt = (prob * instance.utility[:, prompts]).sum(-1)  # exact E_pi[g | x], [m, prompts of this rank]
        # one unit per prompt: summed and counted over ranks, the mean is the exact E_pi[g]
        return per_prompt.sum(-1).float(), len(prompts)

    return estimate


def _exact_evaluator(setup: Setup):
    def evaluate(policy):
        with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
            return setup.oracle.evaluate(setup.task.enumerate_logprobs(policy))

    return evaluate


def _text_evaluator(setup: Setup):
    if setup.evaluator is None:
        from dualign.evaluate import TextEvaluator

        setup.evaluator = TextEvaluator(setup)
    return setup.evaluator


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
            pairs = self.setup_.pairs_from(self.trainer.lightning_module.policy, seed=90_000 + 1_000 * cfg.seed + iteration)
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
                 output_dir: Path, logger=None, ckpt_path: str | None = None, checkpoint: bool = False):
    """Train a fresh copy of pi_ref for iterations * epochs epochs. caid: a dual step after every iteration;
    primal_dual: every k optimiser steps; one_shot / fixed_lambda: lambda fixed, the constraint measured at the end.
    Returns the trained policy and the DualUpdate callback (its history is the lambda trajectory)."""
    cfg = setup.cfg
    policy = setup.new_policy()
    policy.train()
    step, data = _policy_step_and_data(setup, epochs)
    if cfg.algorithm.dual_estimator == "exact":  # exact E_pi[g] against the exact E_ref[g]
        estimator, reference_mean = _exact_estimator(setup), setup.oracle.instance.reference_mean
        threshold = setup.oracle.instance.threshold
    else:
        estimator, reference_mean, threshold = _rollout_estimator(setup), setup.reference_mean, setup.threshold
    if setup.exact:
        evaluator, evaluation_name = _exact_evaluator(setup), "exact"
    else:  # test-split evaluation after every iteration only when asked (it costs rollouts of pi and pi_ref)
        evaluator, evaluation_name = (_text_evaluator(setup) if cfg.evaluation.every_iteration else None), "eval"
    dual = DualUpdate(
        estimator, setup.names, reference_mean, threshold, step_sizes(cfg), epochs,
        update=algorithm in ("caid", "primal_dual"), max_multiplier=cfg.algorithm.max_multiplier,
        evaluator=evaluator, evaluation_name=evaluation_name, rule=cfg.algorithm.dual_rule,
        every_n_steps=cfg.algorithm.dual_every_steps if algorithm == "primal_dual" else None,
    )
    module = AlignmentModule(policy, step, multipliers, cfg.optimizer, epochs)
    callbacks = [dual]
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


def _mlflow_logger(cfg: TrainConfig, raw: DictConfig, resume_from: Path | None, run_name: str | None = None):
    """MLFlowLogger on the configured store. A run resumed from a checkpoint continues the MLflow run whose id was
    saved beside it (params are immutable in MLflow, so they are logged once, by the first run)."""
    if not cfg.logger.enabled:
        return None
    uri = cfg.logger.tracking_uri
    if uri.startswith("sqlite:///"):
        uri = lifecycle.prepare_sqlite_store(uri)
    # beside the checkpoints' folder (older runs: inside it, where it made Lightning warn "exists and is not empty")
    id_files = [resume_from.parent.parent / "mlflow_run_id", resume_from.parent / "mlflow_run_id"] if resume_from else []
    run_id = next((f.read_text().strip() for f in id_files if f.is_file()), None)
    if run_id is None:  # created here, so MLFlowLogger does not warn "Experiment ... not found" while creating it
        import mlflow

        client = mlflow.MlflowClient(uri)
        if client.get_experiment_by_name(cfg.logger.experiment_name) is None:
            # model training, not MLflow 3's GenAI view; artifacts beside a sqlite store, not in ./mlruns
            location = None
            if uri.startswith("sqlite:///"):
                location = (lifecycle.sqlite_path(uri).parent / "mlartifacts").as_uri()
            client.create_experiment(cfg.logger.experiment_name, artifact_location=location,
                                     tags={"mlflow.experimentKind": "custom_model_development"})
    tags = {"algorithm": cfg.algorithm.name, "policy_step": cfg.policy_step.name, **cfg.logger.tags}
    if cfg.logger.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.logger.parent_run_id
    logger = lifecycle.JobLogger(
        experiment_name=cfg.logger.experiment_name, run_name=cfg.logger.run_name or run_name or _run_name(cfg),
        tracking_uri=uri, tags=tags, run_id=run_id,
    )
    if run_id is None:
        logger.log_hyperparams(report.flatten(OmegaConf.to_container(raw, resolve=True)))
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.output_dir) / "mlflow_run_id").write_text(logger.run_id)
    return logger


NAMELESS = ("paths.", "logger.", "hydra.", "ckpt_path", "trainer.enable_progress_bar", "allow_resume_changes")


def _run_name(cfg: TrainConfig) -> str:
    """The algorithm and the command line's overrides (where outputs and tracking go left out), as Hydra names
    override folders: `caid experiment=two_constraints beta=0.5`, so MLflow's run list tells runs apart."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside a Hydra job (tests, notebooks)
        overrides = []
    shown = [o for o in overrides if not o.lstrip("+~").startswith(NAMELESS)]
    return " ".join([cfg.algorithm.name, *shown])[:250]


def preflight(cfg: TrainConfig) -> None:
    """Fail before anything heavy is built when the run could not save its results: an output or cache folder that
    cannot be written, an MLflow store that cannot be reached."""
    for key, folder in (("paths.output_dir", cfg.paths.output_dir), ("paths.cache_dir", cfg.paths.cache_dir)):
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"{key}={folder!r} is not writable ({error.strerror or error})") from None
    if not cfg.logger.enabled or not distributed.is_main():
        return
    uri = cfg.logger.tracking_uri
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(f"logger.tracking_uri={uri!r} is not reachable ({reason}); start the server or set "
                              "logger.enabled=false") from None
    elif uri.startswith("sqlite:///"):
        database = lifecycle.sqlite_path(uri)
        if database.is_file() and not lifecycle.is_sqlite_file(database):
            raise ConfigError(f"logger.tracking_uri={uri!r}: {database} is not an SQLite database")
        folder = database.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"logger.tracking_uri={uri!r}: cannot create {folder} ({error.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"logger.tracking_uri={uri!r}: {folder} is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"logger.tracking_uri={uri!r}: MLflow 3 needs a database or server store, "
                          "e.g. sqlite:///outputs/mlflow.db or http://host:5000")


def _quiet_libraries() -> None:
    """Keep the console for progress bars and the final table."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks transformers 5 the old way


def run(raw_cfg: DictConfig) -> dict:
    """The whole job. Returns the metrics a sweep optimises: the exact objective J, E[r], KL, TV to pi*, each
    constraint's achieved improvement and `constraint_violation` (b_i - achieved_i; feasible when all <= 0)."""
    started = time.perf_counter()
    timing.reset()
    cfg = validate(raw_cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _quiet_libraries()
    preflight(cfg)  # output folders writable, tracking store reachable: before anything is built
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path, changes = checkpoints.resume_point(cfg, output_dir)  # verified, and trained with this config
    # only rank 0 tracks: the other ranks of a distributed run re-run this entry point without a logger
    # a requeued attempt continues the MLflow run of the first, whose id sits beside the checkpoints
    resumed = output_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else ckpt_path
    logger = _mlflow_logger(cfg, raw_cfg, Path(resumed) if resumed else None) if distributed.is_main() else None
    if not cfg.logger.enabled and distributed.is_main():
        log.warning("MLflow tracking is off (logger.enabled=false, as debug=fast sets it): the results are in %s only",
                    output_dir)
    if distributed.is_main():
        checkpoints.record_changes(output_dir, changes, logger)
    with lifecycle.terminations(logger):  # the MLflow run ends with the job: FINISHED, FAILED or KILLED
        return _run(cfg, raw_cfg, output_dir, ckpt_path, logger, started)


def _run(cfg: TrainConfig, raw_cfg: DictConfig, output_dir: Path, ckpt_path: str | None, logger, started: float) -> dict:
    setup = build(cfg)
    timings = {"setup (pi_ref, rollouts, one-shot solve)": time.perf_counter() - started}
    if not setup.exact and cfg.evaluation.every_iteration:
        _text_evaluator(setup)  # pi_ref's test responses, before training starts
    multipliers = initial_multipliers(setup)
    algorithm = cfg.algorithm
    if algorithm.name in ("caid", "primal_dual"):
        iterations, epochs = algorithm.iterations, algorithm.epochs_per_iteration
    else:  # trained once, same epoch budget; the callback still measures the constraint at the end
        iterations, epochs = 1, algorithm.iterations * algorithm.epochs_per_iteration
    tic = time.perf_counter()
    policy, dual, _ = train_policy(setup, multipliers, algorithm.name, iterations, epochs, output_dir, logger, ckpt_path,
                                   checkpoint=True)
    timings[f"{algorithm.name} training"] = time.perf_counter() - tic

    comparison_policy = None
    if algorithm.name == "caid" and algorithm.compare_one_shot:
        tic = time.perf_counter()
        comparison_policy, one_shot_dual, _ = train_policy(setup, setup.one_shot.clone(), "one_shot", 1,
                                                           iterations * epochs, output_dir / "one_shot", None)
        timings["one_shot comparison training"] = time.perf_counter() - tic
    if not setup.exact:
        from dualign.evaluate import finish_text_run

        return finish_text_run(setup, policy, dual, comparison_policy, timings, output_dir, logger, raw_cfg)
    if not distributed.is_main():  # rank 0 evaluates exactly and writes everything
        return {}

    comparison = None
    if comparison_policy is not None:
        with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
            one_shot_logprob = setup.task.enumerate_logprobs(comparison_policy).double()
        comparison = {"multipliers": setup.one_shot.tolist(), "exact": one_shot_dual.history[-1]["exact"],
                      "scores": report.task_score_means(setup, one_shot_logprob)}
    with torch.no_grad(), timing.stage("exact evaluation (enumeration)"):
        final_logprob = setup.task.enumerate_logprobs(policy).double()
    timings["by stage"] = timing.breakdown()
    summary = report.summarise(setup, dual.history, final_logprob, comparison, timings)
    with timing.stage("writing outputs"):
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
