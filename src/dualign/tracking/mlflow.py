"""MLflow for a run: the store prepared (a sqlite store created by one process at a time), the experiment created as
a model-training experiment with its artifacts beside the store, a logger whose run the job ends (`JobLogger`), runs
named after their overrides, and a check before anything is built that the store can be reached."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import OmegaConf

from dualign.tracking.preflight import sqlite_path
from dualign.util.metrics import flatten_params

log = logging.getLogger("dualign")


class JobLogger(MLFlowLogger):
    """MLFlowLogger whose run is ended by the job (`end`), not by Lightning when a fit ends, and whose tracking
    trouble never costs the run: a failed call is retried with back-off, then reported in one line and tracking
    stops for the rest of the job (the run's files are written locally either way)."""

    RETRIES = (1.0, 4.0, 16.0)  # seconds between attempts
    disabled = False

    def finalize(self, status: str = "success") -> None:  # Lightning calls this at the end of every fit
        pass

    def _guarded(self, what: str, call) -> None:
        if self.disabled:
            return
        for attempt, pause in enumerate((*self.RETRIES, None)):
            try:
                call()
                return
            except Exception as problem:
                if pause is None:
                    self.disabled = True
                    log.warning("MLflow: %s failed %d times (%s); tracking stops for this job, results are in the run "
                                "folder", what, attempt + 1, str(problem).strip().splitlines()[0][:200])
                    return
                time.sleep(pause)

    def log_metrics(self, metrics, step=None) -> None:
        self._guarded("logging metrics", lambda: super(JobLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params) -> None:
        self._guarded("logging parameters", lambda: super(JobLogger, self).log_hyperparams(params))

    def log_artifact(self, path) -> None:
        self._guarded(f"logging {Path(path).name}", lambda: self.experiment.log_artifact(self.run_id, str(path)))

    def set_tag(self, key: str, value: str) -> None:
        self._guarded(f"tagging {key}", lambda: self.experiment.set_tag(self.run_id, key, value))

    def log_table(self, data: dict, artifact_file: str) -> None:
        self._guarded(f"logging {artifact_file}",
                      lambda: self.experiment.log_table(self.run_id, data=data, artifact_file=artifact_file))

    def end(self, status: str, error: str | None = None) -> None:
        if self.disabled:
            return
        try:
            if error:
                self.experiment.set_tag(self.run_id, "error", error[:4000])
            self.experiment.set_terminated(self.run_id, status)
        except Exception as problem:  # tracking trouble never costs the run's results, which are on disk already
            log.warning("MLflow: could not mark run %s %s (%s)", self.run_id, status, str(problem).splitlines()[0])


def prepare_sqlite_store(uri: str) -> str:
    """A sqlite store created (or migrated) by one process at a time, under a file lock: two first runs on a fresh
    store raced in MLflow's schema migration ("duplicate column name"). The returned URI waits up to 60 s for a
    write lock instead of sqlite's 5 s."""
    path = sqlite_path(uri)
    with FileLock(f"{path}.lock", timeout=600):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates or migrates the schema
    return uri if "timeout=" in uri else f"{uri}{'&' if '?' in uri else '?'}timeout=60"


NAMELESS = ("paths.", "logger.", "hydra.", "ckpt_path", "trainer.enable_progress_bar", "allow_resume_changes")


def run_name(cfg) -> str:
    """The algorithm and the command line's overrides (where outputs and tracking go left out), as Hydra names
    override folders: `caid experiment=two_constraints beta=0.5`, so MLflow's run list tells runs apart."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside a Hydra job (tests, notebooks)
        overrides = []
    shown = [o for o in overrides if not o.lstrip("+~").startswith(NAMELESS)]
    return " ".join([cfg.algorithm.name, *shown])[:250]


def open_logger(cfg, raw_cfg, resume_from: Path | None, name: str | None = None) -> JobLogger | None:
    """A JobLogger on the configured store (None when tracking is off). A run resumed from a checkpoint continues the
    MLflow run whose id was saved beside it (params are immutable in MLflow, so they are logged once, by the first run)."""
    if not cfg.logger.enabled:
        return None
    uri = cfg.logger.tracking_uri
    if uri.startswith("sqlite:///"):
        uri = prepare_sqlite_store(uri)
    # beside the checkpoints' folder (older runs: inside it, where it made Lightning warn "exists and is not empty")
    id_files = [resume_from.parent.parent / "mlflow_run_id", resume_from.parent / "mlflow_run_id"] if resume_from else []
    run_id = next((f.read_text().strip() for f in id_files if f.is_file()), None)
    if run_id is None:  # created here, so MLFlowLogger does not warn "Experiment ... not found" while creating it
        client = mlflow.MlflowClient(uri)
        if client.get_experiment_by_name(cfg.logger.experiment_name) is None:
            # model training, not MLflow 3's GenAI view; artifacts beside a sqlite store, not in ./mlruns
            location = (sqlite_path(uri).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
            client.create_experiment(cfg.logger.experiment_name, artifact_location=location,
                                     tags={"mlflow.experimentKind": "custom_model_development"})
    tags = {"algorithm": cfg.algorithm.name, "policy_step": cfg.policy_step.name, **cfg.logger.tags}
    if cfg.logger.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.logger.parent_run_id
    logger = JobLogger(experiment_name=cfg.logger.experiment_name, run_name=cfg.logger.run_name or name or run_name(cfg),
                       tracking_uri=uri, tags=tags, run_id=run_id)
    if run_id is None:
        logger.log_hyperparams(flatten_params(OmegaConf.to_container(raw_cfg, resolve=True)))
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.output_dir) / "mlflow_run_id").write_text(logger.run_id)
    return logger
