"""What a threshold will cost, predicted from pi_ref's samples before training (the threshold advisor). Pure torch.

For required improvements b, the plug-in dual on the samples (docs/method.md section 2) gives lambda*(b) and the
tilted policy pi_lambda* over the samples, hence the improvement it reaches, its change in E[r] and its KL to pi_ref:
what CAID converges to when the policy step reaches the Lagrangian optimum. With log_base = log pi_ref over every
response (an enumerated task) the same functions give the exact values. Uncertainty: a bootstrap over prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dualign.core.duality import InfeasibleError, largest_improvements, solve_dual, tilted_log_weights

NEAR_EDGE = 0.8  # beyond this fraction of the largest improvement the samples support, lambda* rests on a few samples


@dataclass
class Prediction:
    multipliers: list[float]  # lambda*(b)
    improvement: list[float]  # of pi_lambda* (= b for an active constraint, more for an inactive one)
    reward_change: float  # E_pi*[r] - E_ref[r]
    kl: float  # KL(pi* || pi_ref)
    objective_change: float  # J(pi*) - J(pi_ref) = reward_change - beta KL: what the constraint costs is its fall


def _base(log_base: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
    """log-weights [P, N] of the base measure: log_base, or uniform over the N samples of each prompt."""
    if log_base is not None:
        return log_base
    return torch.full(scores.shape[-2:], -math.log(scores.shape[-1]), dtype=scores.dtype, device=scores.device)


def reference_means(utility: torch.Tensor, log_base: torch.Tensor | None = None) -> torch.Tensor:
    """E_ref[g_i] under the base measure, [m]."""
    return (_base(log_base, utility).exp() * utility).sum(-1).mean(-1)


def edges(utility: torch.Tensor, log_base: torch.Tensor | None = None) -> list[float]:
    """Per constraint, the largest improvement any policy on these responses reaches (each prompt's best response)."""
    return largest_improvements(utility, reference_means(utility, log_base), log_base)


def predict(reward: torch.Tensor, utility: torch.Tensor, threshold: torch.Tensor, beta: float,
            log_base: torch.Tensor | None = None, initial: list[float] | None = None) -> Prediction | None:
    """The tilted policy at the plug-in lambda*(b) over the given responses; None where b is out of their reach."""
    reward, utility = reward.double(), utility.double()
    log_base = None if log_base is None else log_base.double()
    reference_mean = reference_means(utility, log_base)
    reach = largest_improvements(utility, reference_mean, log_base)
    if any(float(b) >= e for b, e in zip(torch.as_tensor(threshold).reshape(-1), reach)):
        return None  # beyond one constraint's own reach: no need for the solver to chase lambda to infinity
    try:
        solution = solve_dual(reward, utility, reference_mean, torch.as_tensor(threshold, dtype=torch.float64), beta,
                              log_base=log_base, initial=None if initial is None else torch.tensor(initial))
    except InfeasibleError:
        return None
    if not solution.converged:
        return None
    log_weights = tilted_log_weights(reward, utility, solution.multipliers, beta, log_base)
    weights, base = log_weights.exp(), _base(log_base, reward)
    reward_change = ((weights - base.exp()) * reward).sum(-1).mean().item()
    improvement = (weights * utility).sum(-1).mean(-1) - reference_mean
    kl = torch.where(weights > 0, weights * (log_weights - base), 0.0).sum(-1).mean().item()  # padded slots: 0
    return Prediction(solution.multipliers.tolist(), improvement.tolist(), reward_change, kl, reward_change - beta * kl)


def merge_repeats(reward: torch.Tensor, utility: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples of a prompt with the same scores are interchangeable for every quantity here: keep each distinct
    (r, g) once, weighted by its share of the samples (log_base = log(count / N); padded slots get -inf). Exact, and
    on a task with a small response space far fewer columns (4096 samples of an exact-task prompt hold ~280)."""
    samples = reward.shape[-1]
    rows = []
    for p in range(reward.shape[0]):
        scores = torch.cat([reward[p].unsqueeze(0), utility[:, p]]).T  # [N, 1 + m]
        distinct, counts = torch.unique(scores, dim=0, return_counts=True)
        rows.append((distinct, counts))
    width = max(d.shape[0] for d, _ in rows)
    merged = torch.zeros(reward.shape[0], width, 1 + utility.shape[0], dtype=torch.float64)
    log_base = torch.full((reward.shape[0], width), -math.inf, dtype=torch.float64)
    for p, (distinct, counts) in enumerate(rows):
        merged[p, : len(counts)] = distinct
        log_base[p, : len(counts)] = (counts.double() / samples).log()
    return merged[..., 0], merged[..., 1:].permute(2, 0, 1), log_base


@dataclass
class Advice:
    threshold: list[float]  # b
    estimate: Prediction | None  # on all prompts' samples (None: b is beyond what they support)
    low: dict = field(default_factory=dict)  # 2.5% bootstrap quantile of each quantity
    high: dict = field(default_factory=dict)  # 97.5%
    infeasible_share: float = 0.0  # of the bootstrap resamples in which b was out of reach
    edge_fraction: list[float] = field(default_factory=list)  # b_i over the largest supported improvement

    @property
    def near_edge(self) -> bool:
        return self.estimate is None or self.infeasible_share > 0 or any(f >= NEAR_EDGE for f in self.edge_fraction)


QUANTITIES = ("multipliers", "reward_change", "kl", "objective_change")


def advise(reward: torch.Tensor, utility: torch.Tensor, thresholds: torch.Tensor, beta: float, resamples: int = 200,
           seed: int = 0) -> tuple[list[Advice], dict]:
    """Predictions at each row of thresholds [G, m] from pi_ref's samples (reward [P, N], utility [m, P, N]), with
    bootstrap quantiles over prompts, and the supported edge per constraint with its bootstrap quantiles.

    Thousands of small solves: run on one thread (on two busy cores, two threads make each solve ~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _advise(reward, utility, thresholds, beta, resamples, seed)
    finally:
        torch.set_num_threads(threads)


def _advise(reward, utility, thresholds, beta, resamples, seed):
    reward, utility, base = merge_repeats(reward.double(), utility.double())
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    edge = edges(utility, base)
    generator = torch.Generator().manual_seed(seed)
    prompts = reward.shape[0]
    draws = [torch.randint(prompts, (prompts,), generator=generator) for _ in range(resamples)]
    edge_draws = torch.tensor([edges(utility[:, d], base[d]) for d in draws]).reshape(resamples, -1)
    result = []
    for b in thresholds:
        advice = Advice(b.tolist(), predict(reward, utility, b, beta, base),
                        edge_fraction=[float(x) / e if e > 0 else math.inf for x, e in zip(b, edge)])
        start = advice.estimate.multipliers if advice.estimate else None  # resamples start at the full-sample lambda*
        samples = [predict(reward[d], utility[:, d], b, beta, base[d], start) for d in draws]
        feasible = [s for s in samples if s is not None]
        advice.infeasible_share = 1 - len(feasible) / max(resamples, 1)
        for name in QUANTITIES if feasible else ():
            values = torch.tensor([getattr(s, name) for s in feasible], dtype=torch.float64)  # [resamples(, m)]
            advice.low[name] = torch.quantile(values, 0.025, dim=0).tolist()
            advice.high[name] = torch.quantile(values, 0.975, dim=0).tolist()
        result.append(advice)
    edge_summary = {"edge": edge, "edge_low": torch.quantile(edge_draws, 0.025, dim=0).tolist(),
                    "edge_high": torch.quantile(edge_draws, 0.975, dim=0).tolist()}
    return result, edge_summary


def edge_warning(names: list[str], threshold: torch.Tensor, utility: torch.Tensor) -> str | None:
    """One line when a configured b is at or beyond NEAR_EDGE of the largest improvement pi_ref's samples support
    (utility [m, P, N]); None when every b is comfortably inside."""
    edge = edges(utility.double())
    close = [(n, float(b), e) for n, b, e in zip(names, threshold.tolist(), edge) if e <= 0 or float(b) >= NEAR_EDGE * e]
    if not close:
        return None
    parts = ", ".join(f"constraints.{n}.threshold={b:g} is {b / e:.0%} of the largest improvement pi_ref's samples "
                      f"support ({e:.4g})" if e > 0 else f"constraints.{n}: pi_ref's samples support no improvement"
                      for n, b, e in close)
    return (f"{parts}: lambda* rests on each prompt's few best samples there and the policy step may not reach b; "
            f"see `dualign-advise` for the predicted cost of lower thresholds")
