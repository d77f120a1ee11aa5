"""The dual-variable callback: it owns when and how the module's multipliers change, the update index and the
history, and checkpoints them with the reference statistics.

Two triggers share one update: after every E epochs (a CAID iteration) from a fresh on-policy estimate, or every k
optimiser steps (primal-dual) from the running constraint statistics the policy step reports for its own samples.
Three rules (core/dual_steps.py): the projected step of docs/method.md (caid), Safe RLHF's log-space step, and a
trust-region Newton step whose curvature Cov(g) / beta comes from the same on-policy samples as the slack."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import lightning as L
import torch

from dualign.core.dual_steps import DUAL_STEPS, curvature_step_sizes
from dualign.util.metrics import flatten_metrics

log = logging.getLogger("dualign")


@dataclass
class ConstraintSample:
    """What one on-policy measurement of the constraints holds, as sums (so ranks add theirs): the mean of g is
    total / count; the within-prompt covariance of g, scatter / dof, is the dual's curvature times beta."""

    total: torch.Tensor  # [m] sum of each utility over the measured responses (or prompts, measured exactly)
    count: float
    scatter: torch.Tensor | None = None  # [m, m] sum of within-prompt centred outer products of g
    dof: float = 0.0  # its degrees of freedom


class ConstraintEstimator(Protocol):
    def __call__(self, policy, iteration: int) -> ConstraintSample: ...


class DualUpdate(L.Callback):
    def __init__(
        self,
        estimator: ConstraintEstimator | None,
        names: list[str],
        reference_mean: torch.Tensor,
        threshold: torch.Tensor,
        step_size: torch.Tensor,
        epochs_per_iteration: int,
        update: bool = True,
        max_multiplier: float | None = None,
        evaluator: Callable[[torch.nn.Module], dict] | None = None,
        rule: str = "projected",
        every_n_steps: int | None = None,
        beta: float = 1.0,
        trust_radius: float | None = None,
    ):
        self.estimator, self.names, self.update = estimator, names, update
        self.reference_mean = torch.as_tensor(reference_mean, dtype=torch.float32)
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32)
        self.step_size = torch.as_tensor(step_size, dtype=torch.float32)
        self.epochs_per_iteration, self.max_multiplier, self.evaluator = epochs_per_iteration, max_multiplier, evaluator
        self.rule, self.every_n_steps, self.beta = DUAL_STEPS[rule], every_n_steps, beta
        # step_size None (NaN here): the projected rule sizes eta from the curvature at every dual step
        self.sizes_steps = rule == "projected" and bool(torch.isnan(self.step_size).any())
        self.uses_curvature = rule == "newton" or self.sizes_steps
        self.trust_radius = trust_radius  # Newton's and half Newton's (None: core/dual_steps.trust_radii's default)
        if rule == "newton":
            self.rule = functools.partial(self.rule, trust_radius=trust_radius)
        self.iteration = 0
        self.history: list[dict] = []
        self._running = None  # (sum [m], count) since the last step-triggered update
        self._updated_at = 0  # the optimiser step of the last step-triggered update
        self._warned: set[str] = set()  # constraints already reported out of reach

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # rank 0's one-shot lambda, E_ref[g] and thresholds are every rank's
            module.multipliers.copy_(trainer.strategy.broadcast(module.multipliers.detach().clone(), src=0))
            self.reference_mean = trainer.strategy.broadcast(self.reference_mean, src=0)
            self.threshold = trainer.strategy.broadcast(self.threshold, src=0)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.iteration == 0:  # lambda_0 at step 0, so the trajectory in MLflow starts where training did
            initial = module.multipliers.detach().cpu().tolist()
            for logger in trainer.loggers:
                logger.log_metrics({f"dual/lambda_{n}": initial[i] for i, n in enumerate(self.names)}, step=0)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # the progress bar says which iteration runs and at which lambda, not only "Epoch k/n"
            shown = {"iteration": float(self.iteration + 1)} if self.every_n_steps is None else {}
            shown.update({f"lambda_{n}": module.multipliers[i] for i, n in enumerate(self.names)})
            module.log_dict(shown, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.epochs_per_iteration == 0:
            self._dual_step(trainer, module, self.estimator(module.policy, self.iteration))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps is None:
            return
        stats = outputs.get("constraint_stats") if isinstance(outputs, dict) else None
        if stats is None:
            raise RuntimeError("dual_every_steps needs a policy step that reports constraint statistics (policy_gradient)")
        total, count = stats[0].detach().cpu(), stats[1]
        if self._running is None:
            self._running = (total, count)
        else:
            self._running = (self._running[0] + total, self._running[1] + count)
        # once per k optimiser steps: with gradient accumulation several micro-batches end on the same global step
        step = trainer.global_step
        if step > self._updated_at and step % self.every_n_steps == 0:
            self._dual_step(trainer, module, ConstraintSample(*self._running))
            self._running, self._updated_at = None, step

    def _dual_step(self, trainer: L.Trainer, module: L.LightningModule, sample: ConstraintSample) -> None:
        # sums and counts, reduced across ranks, so every rank takes the same step
        def total_of(value):
            value = torch.as_tensor(value, dtype=torch.float32)
            return trainer.strategy.reduce(value.to(module.device), reduce_op="sum").cpu()

        utility_mean = total_of(sample.total) / total_of(float(sample.count))
        improvement = utility_mean - self.reference_mean
        slack = improvement - self.threshold
        hessian = None
        if self.uses_curvature:
            if sample.scatter is None:
                raise RuntimeError("the Newton dual step and a step size of None need an estimator that measures the "
                                   "covariance of g")
            hessian = total_of(sample.scatter) / total_of(float(sample.dof)).clamp(min=1.0) / self.beta
        used = module.multipliers.detach().cpu().clone()
        step_size = self.step_size
        if self.sizes_steps:
            step_size = curvature_step_sizes(self.step_size, hessian, slack, used, trust_radius=self.trust_radius)
        if self.update:
            updated = self.rule(used, slack, step_size, self.max_multiplier, hessian=hessian)
            if not torch.isfinite(updated).all():
                raise FloatingPointError(f"multipliers became {updated.tolist()} at iteration {self.iteration + 1}")
            module.multipliers.copy_(updated.to(module.multipliers))
        ranks = trainer.world_size
        if ranks > 1:  # a rank that drifted would train on another Lagrangian: stop instead
            every = trainer.strategy.all_gather(module.multipliers.detach()).reshape(ranks, -1)
            if not torch.equal(every.min(0).values, every.max(0).values):
                raise RuntimeError(f"ranks disagree on the multipliers at iteration {self.iteration + 1}: {every.tolist()}")
        record = {
            "iteration": self.iteration + 1,
            "multipliers_used": used.tolist(),
            "estimated_improvement": improvement.tolist(),
            "estimated_slack": slack.tolist(),
            "multipliers": module.multipliers.detach().cpu().tolist(),
            "ranks": ranks,
        }
        if hessian is not None:
            record["hessian"] = hessian.tolist()
        if self.sizes_steps:
            record["step_size"] = step_size.tolist()
        if self.evaluator is not None:  # the policy of this iteration, measured by the task (exact/*, eval/*)
            record["evaluation"] = compact(self.evaluator(module.policy))
        self.history.append(record)
        self.iteration += 1
        self._warn_if_out_of_reach()
        metrics = {}
        for i, name in enumerate(self.names):
            metrics[f"dual/lambda_{name}"] = record["multipliers"][i]
            metrics[f"dual/improvement_{name}"] = record["estimated_improvement"][i]
            metrics[f"dual/slack_{name}"] = record["estimated_slack"][i]
            if self.sizes_steps:
                metrics[f"dual/step_size_{name}"] = record["step_size"][i]
        if "evaluation" in record:
            metrics.update(flatten_metrics(record["evaluation"], self.evaluator.name, self.names))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self.iteration)

    def _warn_if_out_of_reach(self, steps: int = 3) -> None:
        """Once per constraint: its multiplier rose at each of the last `steps` dual steps and the constraint is
        still short every time, by more than 10% of b (a run converging onto b from below rises by small steps and is
        short by little): b may be beyond what the policy can reach."""
        if not self.update or len(self.history) < steps:
            return
        recent = self.history[-steps:]
        for i, name in enumerate(self.names):
            rising = all(r["multipliers"][i] > r["multipliers_used"][i] for r in recent)
            margin = 0.1 * max(abs(float(self.threshold[i])), 1e-3)
            short = all(r["estimated_slack"][i] < -margin for r in recent)
            if rising and short and name not in self._warned:
                self._warned.add(name)
                trail = " -> ".join(f"{r['multipliers'][i]:.3g}" for r in recent)
                log.warning("lambda_%s has risen for %d dual steps (%s) while the constraint stays short of b (last "
                            "slack %.3g): b may be beyond this policy's reach; more iterations or a lower threshold",
                            name, steps, trail, recent[-1]["estimated_slack"][i])

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "history": self.history,
            "reference_mean": self.reference_mean,
            "threshold": self.threshold,
            "running": self._running,
            "updated_at": self._updated_at,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.history = state["iteration"], list(state["history"])
        self.reference_mean, self.threshold = state["reference_mean"], state["threshold"]
        self._running = state.get("running")
        self._updated_at = state.get("updated_at", 0)
        if "rng" in state:
            set_rng_state(state["rng"])


def compact(evaluation: dict) -> dict:
    """An evaluation without its bulky parts (sample rows, raw score arrays): what a history record keeps."""
    return {key: value for key, value in evaluation.items() if not key.startswith("_") and key != "samples"}


def rng_state() -> dict:
    """Every random generator a run draws from (sampling seeds are derived per iteration, but dropout and anything
    unseeded draws from these), saved in checkpoints so a resumed run continues the same streams."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    # plain tensors, ints and tuples only: checkpoints load with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
