"""An Optuna (>= 4) sweeper for Hydra: search space from Hydra's sweep syntax, single or several objectives,
constraint-aware trials, persistent and resumable studies, failed trials recorded, MLflow grouping, and several
workers on one study (a SLURM array, two terminals): trials carry Optuna heartbeats, so a worker that died has its
trials marked interrupted and asked again while live workers' trials are left alone; n_trials counts every worker's.

The task returns a float, a tuple, or a dict of metrics from which `objective` (key or keys) and `constraints` (key
of a list of violations, feasible when every one is <= 0) are read; dualign's `train.py` returns such a dict.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

log = logging.getLogger(__name__)
CONSTRAINTS_ATTR = "constraints"
# Optuna 5 samplers read constraints set on the trial (constraints_func is deprecated there); Optuna 4 needs the func
SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial this process runs


def distribution(override: Override) -> BaseDistribution | Any:
    """interval(a, b), int(interval(a, b)), tag(log, ...), choice(...), range(...) -> an Optuna distribution;
    a plain value stays a fixed value."""
    value = override.value()
    if not override.is_sweep_override():
        return value
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if value.shuffle or not all(isinstance(v, int) for v in values):
            return CategoricalDistribution(values)
        return IntDistribution(values[0], values[-1], step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line}: this sweep is not supported by the optuna sweeper")


def read_constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    # trials that failed before reporting count as infeasible
    return trial.user_attrs.get(CONSTRAINTS_ATTR, [1.0])


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in read_constraints(trial))


class OptunaSweeperImpl:
    def __init__(self, sampler, direction, objective, constraints, study_name, storage, n_trials, n_jobs, params,
                 mlflow_parent, heartbeat_interval=10, grace_period=30):
        self.sampler_cfg, self.objective, self.constraints = sampler, objective, constraints
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.directions = list(direction) if isinstance(direction, Sequence) and not isinstance(direction, str) else [direction]
        self.study_name, self.storage, self.n_trials, self.n_jobs = study_name, storage, n_trials, n_jobs
        self.params = dict(params or {})
        self.mlflow_parent = mlflow_parent

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # --- study -------------------------------------------------------------------------------------------------
    def _study(self) -> optuna.Study:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{(self.sweep_dir / 'optuna.db').resolve()}"
        kwargs = {}
        if self.constraints and not SET_CONSTRAINT:
            accepts = "constraints_func" in inspect.signature(get_class(self.sampler_cfg["_target_"])).parameters
            if accepts:
                kwargs["constraints_func"] = read_constraints
            else:  # e.g. GridSampler: it samples blindly, but the best trial is still chosen among feasible ones
                log.warning(f"{self.sampler_cfg['_target_']} takes no constraints_func; constraints apply to the results only")
        storage = optuna.storages.RDBStorage(storage, heartbeat_interval=self.heartbeat_interval,
                                             grace_period=self.grace_period)
        try:
            existing = len(optuna.load_study(study_name=self.study_name, storage=storage).trials)
        except KeyError:
            existing = 0
        enumerating = str(self.sampler_cfg["_target_"]).endswith(("GridSampler", "BruteForceSampler"))
        if self.sampler_cfg.get("seed") is not None and not enumerating:
            # every worker and every resume draws its own points: a fixed seed would repeat the same start-up points
            # (grid and brute-force samplers share one visiting order through the study instead: their seed stays)
            kwargs["seed"] = int(self.sampler_cfg["seed"]) + 7919 * existing + os.getpid()
        sampler = instantiate(self.sampler_cfg, **kwargs)
        return optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                   directions=self.directions, load_if_exists=True)

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
        parser = OverridesParser.create()
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        space, fixed = {}, {}
        for override in parser.parse_overrides(lines):
            value = distribution(override)
            key = override.get_key_element()
            if isinstance(value, BaseDistribution):
                space[key] = value
                fixed.pop(key, None)
            else:
                fixed[key] = override.get_value_element_as_str()
                space.pop(key, None)
        return space, fixed

    def _values(self, result: Any) -> tuple[list[float], list[float] | None]:
        """Objective values and constraint violations from what the task returned."""
        constraints = None
        if isinstance(result, dict):
            if self.constraints:
                constraints = [float(v) for v in (result[self.constraints] if isinstance(result[self.constraints], (list, tuple)) else [result[self.constraints]])]
            keys = self.objective if self.objective is not None else "objective"
            keys = [keys] if isinstance(keys, str) else list(keys)
            values = [float(result[k]) for k in keys]
        elif isinstance(result, (list, tuple)):
            values = [float(v) for v in result]
        else:
            values = [float(result)]
        if len(values) != len(self.directions):
            raise ValueError(f"the task returned {len(values)} objective values for {len(self.directions)} directions")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"the task returned a non-finite objective {values}")
        return values, constraints

    # --- MLflow grouping -----------------------------------------------------------------------------------------
    def _parent_run(self, study: optuna.Study) -> str | None:
        logger_cfg = self.config.get("logger")
        if not (self.mlflow_parent and logger_cfg is not None and logger_cfg.get("enabled", False)):
            return None
        if "mlflow_parent_run_id" in study.user_attrs:  # a resumed sweep keeps its parent run
            return study.user_attrs["mlflow_parent_run_id"]
        import mlflow
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(self.config)  # the logger's paths use ${hydra:runtime.cwd}
        client = mlflow.MlflowClient(OmegaConf.select(self.config, "logger.tracking_uri"))
        name = OmegaConf.select(self.config, "logger.experiment_name")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=f"sweep {self.study_name}",
                                tags={"sweep_id": self.study_name, "sweep_dir": str(self.sweep_dir)})
        study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
        return run.info.run_id

    def _finish_parent(self, parent: str | None, summary: dict) -> None:
        if parent is None:
            return
        import mlflow

        client = mlflow.MlflowClient(OmegaConf.select(self.config, "logger.tracking_uri"))
        for key, value in summary.items():
            client.log_metric(parent, key, value)
        client.set_terminated(parent)

    # --- the loop ------------------------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        space, fixed = self._search_space(arguments)
        study = self._study()
        finished, running = self._counts(study)
        log.info(f"study {study.study_name}: {finished} finished trials, {running} running in other workers, "
                 f"{max(0, self.n_trials - finished - running)} to go; directions {self.directions}; "
                 f"search space {sorted(space)}")
        parent = self._parent_run(study)
        while True:
            finished, running = self._counts(study)
            free = self.n_trials - finished - running
            if free <= 0:
                if running == 0:
                    break
                time.sleep(self.heartbeat_interval)  # others' live trials: one may die and free its place
                continue
            trials = [study.ask() for _ in range(min(self.n_jobs, free))]
            trials = [t for t in trials if not self._surplus(study, t)]
            if not trials:
                continue
            batch = []
            for trial in trials:
                trial.set_user_attr("worker", WORKER)
                for key, dist in space.items():
                    trial._suggest(key, dist)
                overrides = [f"{key}={value}" for key, value in {**trial.params, **fixed}.items()]
                if parent is not None:
                    overrides += [f"++logger.parent_run_id={parent}", f"++logger.tags.sweep_id={self.study_name}",
                                  f"++logger.tags.optuna_trial={trial.number}"]
                batch.append(overrides)
            with _heartbeats(study, trials, self.heartbeat_interval):
                returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            exhausted = False
            for trial, job in zip(trials, returns):
                try:
                    if job.status != JobStatus.COMPLETED:
                        raise RuntimeError(f"the job failed: {job._return_value!r}")
                    values, constraints = self._values(job.return_value)
                except Exception as error:  # a failed trial is recorded and the study goes on
                    trial.set_user_attr("error", str(error)[:500])
                    exhausted |= self._tell(study, trial, state=TrialState.FAIL)
                    log.warning(f"trial {trial.number} failed: {error}")
                    continue
                if constraints is not None:
                    trial.set_user_attr(CONSTRAINTS_ATTR, constraints)
                    if SET_CONSTRAINT:
                        for index, violation in enumerate(constraints):
                            trial.set_constraint(str(index), violation)
                exhausted |= self._tell(study, trial, values=values)
            if exhausted:
                log.info("the sampler has exhausted its search space; stopping")
                break
        self._write_results(study, parent)

    @staticmethod
    def _counts(study: optuna.Study) -> tuple[int, int]:
        """(finished, running) trials that count toward n_trials, over every worker; trials of a worker that died
        (no heartbeat for grace_period) are failed here and, interrupted, not counted."""
        with warnings.catch_warnings():  # "experimental" and "supposed to be used with Study.optimize": we do its job
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        counted = [t for t in study.get_trials(deepcopy=False) if not _excluded(t)]
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in counted)
        running = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in counted)
        return finished, running

    def _surplus(self, study: optuna.Study, trial) -> bool:
        """Two workers that counted at once may both have asked for the last place: the later trial is closed."""
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number <= trial.number and not _excluded(t)]
        if len(earlier) <= self.n_trials:
            return False
        study._storage.set_trial_user_attr(trial._trial_id, "surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return True

    @staticmethod
    def _tell(study: optuna.Study, trial, **kwargs) -> bool:
        """study.tell; True when the sampler asked the study to stop (GridSampler, BruteForceSampler: space exhausted).
        Outside Study.optimize that request arrives as a RuntimeError after the trial has been recorded."""
        try:
            study.tell(trial, **kwargs)
        except RuntimeError as error:
            if "Study.stop" not in str(error):
                raise
            return True
        return False

    def _write_results(self, study: optuna.Study, parent: str | None) -> None:
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        feasible = [t for t in complete if not self.constraints or is_feasible(t)]
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "n_complete": len(complete),
                                   "n_feasible": len(feasible),
                                   "n_failed": sum(t.state == TrialState.FAIL and not _excluded(t) for t in study.trials),
                                   "n_interrupted": sum(_interrupted(t) for t in study.trials)}
        summary = {}
        if len(self.directions) == 1 and feasible:
            pick = max if self.directions[0] == "maximize" else min
            best = pick(feasible, key=lambda t: t.value)
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            summary = {"best_value": best.value, "best_trial": float(best.number)}
            log.info(f"best trial {best.number}: value {best.value}, params {best.params}")
        elif feasible:
            front = _pareto(feasible, self.directions)
            results["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values} for t in front]
            log.info(f"{len(front)} Pareto solutions")
        else:
            log.warning("no feasible completed trial")
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        self._finish_parent(parent, summary)


def _interrupted(trial) -> bool:
    """Failed without an error of its own: its worker died and Optuna failed it for a stale heartbeat (a trial that
    really failed carries the `error` attribute this sweeper sets)."""
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs and not trial.user_attrs.get("surplus")


def _excluded(trial) -> bool:
    """Interrupted (its worker died) or surplus (a counting race): closed, not counted, not a result."""
    return _interrupted(trial) or bool(trial.user_attrs.get("surplus"))


class _heartbeats:
    """While a batch runs: a heartbeat for each of its trials every `interval` seconds, from a background thread."""

    def __init__(self, study, trials, interval):
        self.storage, self.ids, self.interval = study._storage, [t._trial_id for t in trials], interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.is_set():
            for trial_id in self.ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as error:  # a busy database: the next beat will do
                    log.debug(f"heartbeat of trial {trial_id}: {error}")
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _pareto(trials, directions) -> list:
    sign = [1 if d == "maximize" else -1 for d in directions]

    def dominates(a, b):
        pa, pb = [s * v for s, v in zip(sign, a.values)], [s * v for s, v in zip(sign, b.values)]
        return all(x >= y for x, y in zip(pa, pb)) and any(x > y for x, y in zip(pa, pb))

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]
