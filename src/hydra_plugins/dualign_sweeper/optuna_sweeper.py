"""Hydra discovers this module (the `hydra_plugins` namespace package) and registers `hydra/sweeper=optuna`.

The implementation lives in hydra_plugins.dualign_sweeper._optuna_impl and is imported only when the sweeper is used, so every other
Hydra start stays fast.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.dualign_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler is built by the sweeper, which may add constraints_func
    # any Optuna sampler by _target_; constraints_func is added when `constraints` is set
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: Any = "maximize"  # or a list for several objectives
    objective: Any = None  # key(s) of the dict the task returns (None: the return value is the float or tuple)
    constraints: Optional[str] = None  # key of the returned dict holding violations (feasible when all <= 0)
    study_name: str = "dualign"
    storage: Optional[str] = None  # any RDB URL; None: sqlite:///<sweep dir>/optuna.db
    n_trials: int = 20  # total, counting the finished trials of a resumed study
    n_jobs: int = 1  # trials per batch handed to the launcher
    params: Optional[Dict[str, str]] = None  # search space, e.g. {beta: "tag(log, interval(0.1, 10))"}
    mlflow_parent: bool = True  # group the trials' MLflow runs under a parent run of the sweep
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats (several workers on one study)
    grace_period: int = 30  # a trial without a heartbeat this long belongs to a dead worker: interrupted, asked again


class OptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from hydra_plugins.dualign_sweeper._optuna_impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(**kwargs)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="dualign")
