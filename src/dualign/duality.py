"""Lagrangian duality for constrained alignment (../shared/method.md, sections 1-3).

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
    logits = (reward + torch.einsum("m,m...->...", multipliers.to(slack), slack)) / beta
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
    """min_{lambda >= 0} D(lambda) by projected Newton with Armijo backtracking (D is convex and smooth).

    Constraints at the bound with a positive gradient are held at 0 and take a gradient step; the rest take
    a Newton step on their block of the Hessian. Runs in float64.
    """
    as64 = lambda t: None if t is None else torch.as_tensor(t, dtype=torch.float64)  # noqa: E731
    reward, utility, log_base = as64(reward), as64(utility), as64(log_base)
    reference_mean, threshold = as64(reference_mean).reshape(-1), as64(threshold).reshape(-1)
    num_constraints = utility.shape[0]
    multipliers = torch.zeros(num_constraints, dtype=torch.float64) if initial is None else as64(initial).clamp(min=0)

    def terms(lam):
        return dual_terms(reward, utility, reference_mean, threshold, lam, beta, log_base)

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
        step = 1.0
        while True:
            candidate = (multipliers - step * direction).clamp(min=0)
            trial = terms(candidate)
            decrease = (gradient * (multipliers - candidate)).sum()
            if trial.value <= current.value - 1e-4 * decrease or step < 1e-12:
                break
            step *= 0.5
        multipliers, current = candidate, trial
        if multipliers.max() > max_multiplier:
            raise InfeasibleError(
                f"dual solve diverged (lambda > {max_multiplier:g}): threshold(s) {threshold.tolist()} are not "
                f"achievable on these candidates (slack at lambda: {current.gradient.tolist()})"
            )
    return DualSolution(multipliers, current.value.item(), current.gradient, max_iterations, False)


def projected_dual_step(
    multipliers: torch.Tensor, slack: torch.Tensor, step_size: torch.Tensor | float, max_multiplier: float | None = None
) -> torch.Tensor:
    """CAID's dual step: lambda <- max(0, lambda - eta * u), u the measured slack (mean g - E_ref[g] - b).

    A constraint the policy over-satisfies (u > 0) gets a smaller multiplier, one it misses a larger one.
    """
    updated = (multipliers - torch.as_tensor(step_size, dtype=multipliers.dtype) * slack).clamp(min=0)
    return updated if max_multiplier is None else updated.clamp(max=max_multiplier)


def log_space_dual_step(
    multipliers: torch.Tensor, slack: torch.Tensor, step_size: torch.Tensor | float, max_multiplier: float | None = None
) -> torch.Tensor:
    """Safe RLHF's dual step: ln lambda <- ln lambda + alpha * lambda * violation, violation = -u, lambda capped.

    Multiplicative, so lambda stays positive (and a lambda of 0 stays 0: start it above 0).
    """
    violation = -slack
    updated = multipliers * torch.exp(torch.as_tensor(step_size, dtype=multipliers.dtype) * multipliers * violation)
    return updated if max_multiplier is None else updated.clamp(max=max_multiplier)


DUAL_STEPS = {"projected": projected_dual_step, "log": log_space_dual_step}
