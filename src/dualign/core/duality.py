"""Lagrangian duality for constrained alignment (docs/method.md, sections 1-3).

Pure torch on scored candidates: no Lightning, no Hydra. Shapes used throughout:
    reward    [P, N]      r(x, y) for P prompts and N candidate responses each
    utility   [m, P, N]   g_i(x, y) for m constrained utilities
    log_base  [P, N]      log-weights of the base measure the candidates stand for: log pi_ref(y|x) when the
                          responses are enumerated, -log N (the default) when they are N samples from pi_ref
The constraint function is h_i = g_i - E_ref[g_i] - b_i; the composite reward is r + lambda . h.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class InfeasibleError(ValueError):
    """The thresholds ask for more improvement than any policy on these candidates can achieve."""


def constraint_slack(utility: torch.Tensor, reference_mean: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """h_i(x, y) = g_i(x, y) - E_ref[g_i] - b_i, shape [m, P, N]."""
    offset = (reference_mean + threshold).to(utility)
    return utility - offset.view(-1, *([1] * (utility.dim() - 1)))


def composite_reward(reward: torch.Tensor, utility: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """r + lambda . g (any utility offset is a per-prompt constant that pairwise comparisons ignore)."""
    return reward + torch.einsum("m,m...->...", multipliers.to(utility), utility)


def _tilted_logits(reward, slack, multipliers, beta, log_base):
    logits = composite_reward(reward, slack, multipliers) / beta
    if log_base is None:
        return logits - math.log(reward.shape[-1])
    return logits + log_base


def tilted_log_weights(
    reward: torch.Tensor,
    utility: torch.Tensor,
    multipliers: torch.Tensor,
    beta: float,
    log_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi_lambda(y|x) over the candidates: log-softmax_y(log_base + (r + lambda . g) / beta), shape [P, N]."""
    logits = _tilted_logits(reward, utility, multipliers, beta, log_base)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


@dataclass
class DualTerms:
    value: torch.Tensor  # D(lambda), scalar
    gradient: torch.Tensor  # [m]: E_x E_{pi_lambda}[h], the constraint slack of pi_lambda
    hessian: torch.Tensor  # [m, m]: E_x Cov_{pi_lambda}[h] / beta


def dual_terms(
    reward: torch.Tensor,
    utility: torch.Tensor,
    reference_mean: torch.Tensor,
    threshold: torch.Tensor,
    multipliers: torch.Tensor,
    beta: float,
    log_base: torch.Tensor | None = None,
) -> DualTerms:
    """Plug-in dual function D(lambda) = beta * E_x log Z(x, lambda), its gradient and Hessian."""
    slack = constraint_slack(utility, reference_mean, threshold)
    logits = _tilted_logits(reward, slack, multipliers, beta, log_base)
    log_partition = torch.logsumexp(logits, dim=-1)  # [P]
    weights = torch.softmax(logits, dim=-1)  # [P, N]
    mean_slack = (weights * slack).sum(-1)  # [m, P]
    centered = slack - mean_slack.unsqueeze(-1)
    covariance = torch.einsum("ipn,jpn,pn->ij", centered, centered, weights) / reward.shape[0]
    return DualTerms(
        value=beta * log_partition.mean(),
        gradient=mean_slack.mean(-1),
        hessian=covariance / beta,
    )


@dataclass
class DualSolution:
    multipliers: torch.Tensor  # lambda*, [m]
    value: float  # D(lambda*)
    gradient: torch.Tensor  # slack of pi_lambda* (0 for an active constraint, >= 0 for an inactive one)
    iterations: int
    converged: bool


def solve_dual(
    reward: torch.Tensor,
    utility: torch.Tensor,
    reference_mean: torch.Tensor,
    threshold: torch.Tensor,
    beta: float,
    log_base: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
    tolerance: float = 1e-9,
    max_iterations: int = 200,
    max_multiplier: float = 1e6,
) -> DualSolution:
    """min_{lambda >= 0} D(lambda), in float64, by projected Newton with Armijo backtracking (D is convex and smooth).

    For small beta the tilted policy is nearly deterministic away from lambda*, its covariance (beta x the Hessian)
    underflows and Newton cannot move from a cold start; at lambda*(beta) the policy mixes (the slack is 0 there), so
    the curvature is there near the optimum. So a stalled solve continues in beta: solved at 2^k beta down to beta,
    each warm-started at the last (a factor 2 apart: lambda*(beta) drifts by O(beta), about the width of Newton's
    basin there). Bisection on each partial derivative (monotone in its own multiplier) is the last
    resort. An unconverged solve comes back with converged=False; `require_converged` makes it an error.
    """
    as64 = lambda t: None if t is None else torch.as_tensor(t, dtype=torch.float64)  # noqa: E731
    reward, utility, log_base = as64(reward), as64(utility), as64(log_base)
    reference_mean, threshold = as64(reference_mean).reshape(-1), as64(threshold).reshape(-1)
    start = torch.zeros(utility.shape[0], dtype=torch.float64) if initial is None else as64(initial).clamp(min=0)

    def terms_at(b):
        return lambda lam: dual_terms(reward, utility, reference_mean, threshold, lam, b, log_base)

    def infeasible(lam, slack):
        best = largest_improvements(utility, reference_mean, log_base)
        return InfeasibleError(
            f"threshold(s) {[round(b, 6) for b in threshold.tolist()]} are not achievable on these candidates: the "
            f"largest improvements they allow are {[round(b, 6) for b in best]} (lambda > {max_multiplier:g}, "
            f"slack {[round(x, 6) for x in slack.tolist()]})")

    solution = _newton(terms_at(beta), start, tolerance, max_iterations, max_multiplier, infeasible)
    if solution.converged:
        return solution
    spread = (reward.max() - reward.min()).item() + 1e-12
    levels, level = [], beta
    while level < spread:
        level *= 2
        levels.append(level)
    warm = start
    for level in reversed(levels):
        warm = _newton(terms_at(level), warm, tolerance, max_iterations, max_multiplier, infeasible).multipliers
    solution = _newton(terms_at(beta), warm, tolerance, max_iterations, max_multiplier, infeasible)
    if solution.converged:
        return solution
    return _coordinate_bisection(terms_at(beta), solution.multipliers, tolerance, max_multiplier, max_iterations,
                                 infeasible)


def _newton(terms, multipliers, tolerance, max_iterations, max_multiplier, infeasible) -> DualSolution:
    """Projected Newton: constraints at the bound with a positive gradient are held at 0 and take a gradient step,
    the rest a Newton step on their block of the Hessian; stops unconverged when no step along it descends."""
    current = terms(multipliers)
    for iteration in range(1, max_iterations + 1):
        gradient = current.gradient
        projected = torch.where(multipliers > 0, gradient, gradient.clamp(max=0))
        if projected.numel() == 0 or projected.abs().max() <= tolerance:  # no constraint: D is beta E log Z
            return DualSolution(multipliers, current.value.item(), gradient, iteration - 1, True)
        at_bound = (multipliers <= 1e-12) & (gradient > 0)
        free = ~at_bound
        direction = gradient.clone()
        if free.any():
            block = current.hessian[free][:, free]
            block = block + 1e-12 * (1 + block.diagonal().abs().max()) * torch.eye(int(free.sum()), dtype=torch.float64)
            direction[free] = torch.linalg.solve(block, gradient[free])
        step, accepted = 1.0, False
        while step >= 1e-12:
            candidate = (multipliers - step * direction).clamp(min=0)
            trial = terms(candidate)
            decrease = (gradient * (multipliers - candidate)).sum()
            if trial.value <= current.value - 1e-4 * decrease:
                accepted = True
                break
            step *= 0.5
        if not accepted:  # no descent along the Newton direction: the curvature is not there to use
            return DualSolution(multipliers, current.value.item(), gradient, iteration, False)
        multipliers, current = candidate, trial
        if multipliers.max() > max_multiplier:
            raise infeasible(multipliers, current.gradient)
    return DualSolution(multipliers, current.value.item(), current.gradient, max_iterations, False)


def largest_improvements(utility, reference_mean, log_base) -> list[float]:
    """Per constraint, the largest E[g] - E_ref[g] any policy on the candidates reaches (the best candidate of every
    prompt, among those the base measure gives weight)."""
    if log_base is None:
        best = utility.max(dim=-1).values
    else:
        best = utility.masked_fill(~torch.isfinite(log_base).unsqueeze(0), float("-inf")).max(dim=-1).values
    return (best.mean(-1) - reference_mean).tolist()


def _coordinate_bisection(terms, multipliers, tolerance, max_multiplier, sweeps, infeasible) -> DualSolution:
    """Cyclic exact minimisation over one multiplier at a time: the root of its partial derivative, by bisection."""
    multipliers = multipliers.clone()
    for sweep in range(1, sweeps + 1):
        before = multipliers.clone()
        for i in range(multipliers.numel()):

            def partial(x, i=i):
                trial = multipliers.clone()
                trial[i] = x
                return terms(trial).gradient[i].item()

            if partial(0.0) >= 0:
                multipliers[i] = 0.0
                continue
            low, high = 0.0, max(1.0, 2 * multipliers[i].item())
            while partial(high) < 0:
                low, high = high, 2 * high
                if high > max_multiplier:
                    trial = multipliers.clone()
                    trial[i] = high
                    raise infeasible(trial, terms(trial).gradient)
            while high - low > 1e-12 * (1 + high):
                middle = 0.5 * (low + high)
                low, high = (middle, high) if partial(middle) < 0 else (low, middle)
            multipliers[i] = 0.5 * (low + high)
        current = terms(multipliers)
        projected = torch.where(multipliers > 0, current.gradient, current.gradient.clamp(max=0))
        moved = (multipliers - before).abs().max().item()
        if projected.abs().max() <= tolerance or moved <= 1e-10 * (1 + multipliers.abs().max().item()):
            return DualSolution(multipliers, current.value.item(), current.gradient, sweep, True)
    return DualSolution(multipliers, current.value.item(), current.gradient, sweeps, False)


def require_converged(solution: DualSolution, what: str) -> DualSolution:
    if not solution.converged:
        raise ArithmeticError(f"{what}: the dual solve did not converge after {solution.iterations} iterations "
                              f"(lambda {solution.multipliers.tolist()}, slack {solution.gradient.tolist()})")
    return solution
