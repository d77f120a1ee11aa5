"""One run summary for every task kind: what the run trained and where it ended, the evaluations of the trained
policy, of pi_ref and (where the task knows it) of the optimum, and the gaps between them. summary.json is it;
the table, the plots, the MLflow metrics and the metrics returned to sweeps all read it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunSummary:
    algorithm: str
    policy_step: str
    beta: float
    task: str  # what the evaluations measured on: "the exact task", "pku_saferlhf (16 test prompts)"
    evaluation: str  # how: "exact" (enumeration) or "eval" (sampled on the test split)
    constraints: list[str]
    threshold: list[float]  # b, as the evaluations measure against it
    reference_mean_estimate: list[float]  # E_ref[g] from pi_ref's rollouts
    one_shot_multipliers: list[float]
    trajectory: list[dict]  # one record per dual step (lambda before and after, estimates, evaluation)
    final: dict  # the trained policy's evaluation: objective, reward, kl, improvement [m] (+ CIs, TV, scores...)
    reference: dict  # pi_ref's evaluation
    optimum: dict | None = None  # multipliers, value (P*), ... where the task knows the optimum exactly
    one_shot: dict | None = None  # the one-shot comparison: {"multipliers", "final"}
    initial_multipliers: list[float] = field(default_factory=list)
    final_multipliers: list[float] = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # the task's own (the saved policy's folder)

    def __post_init__(self):
        if self.trajectory:
            self.initial_multipliers = self.initial_multipliers or self.trajectory[0]["multipliers_used"]
            self.final_multipliers = self.final_multipliers or self.trajectory[-1]["multipliers"]

    @property
    def gaps(self) -> dict:
        """|achieved - b| per constraint; with the optimum known: P* - J, |lambda - lambda*| and TV to pi*."""
        gaps = {"improvement_error": [abs(a - b) for a, b in zip(self.final["improvement"], self.threshold)]}
        if self.optimum is not None:
            gaps["objective"] = self.optimum["value"] - self.final["objective"]
            gaps["multiplier_error"] = [abs(a - b) for a, b in zip(self.final_multipliers, self.optimum["multipliers"])]
        if "tv_to_optimum" in self.final:
            gaps["tv_to_optimum"] = self.final["tv_to_optimum"]
        return gaps

    def to_json(self) -> dict:
        """summary.json: every field, the gaps, and evaluations without their raw arrays (keys starting with _)."""
        out = asdict(self)
        out["gaps"] = self.gaps
        for holder, key in ((out, "final"), (out.get("one_shot") or {}, "final")):
            if holder.get(key):
                holder[key] = {k: v for k, v in holder[key].items() if not k.startswith("_")}
        return out

    def sweep_metrics(self) -> dict:
        """What a sweep optimises: J, E[r], KL (and TV to pi* where known), each constraint's achieved improvement
        and `constraint_violation` (b_i - achieved_i; feasible when all <= 0)."""
        final = self.final
        metrics = {key: final[key] for key in ("objective", "reward", "kl", "tv_to_optimum") if key in final}
        metrics["constraint_violation"] = [b - a for a, b in zip(final["improvement"], self.threshold)]
        metrics.update({f"improvement_{name}": final["improvement"][i] for i, name in enumerate(self.constraints)})
        return metrics
