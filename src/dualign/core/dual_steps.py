"""Dual steps: how lambda moves after a measurement of the constraint slack (docs/method.md section 3).

Pure torch. Every rule has the signature rule(multipliers, slack, step_size, max_multiplier, hessian) -> multipliers,
with slack u = mean g - E_ref[g] - b measured on the current policy (the gradient of the dual at lambda when the
policy is pi_lambda) and hessian the dual's curvature Cov(g) / beta estimated from the same samples (only `newton`
reads it; only the projected and log rules read the step size).
"""
from __future__ import annotations

import torch

NEWTON_FRACTION = 0.5  # the step size None gives: this fraction of a Newton step (see curvature_step_sizes)


def trust_radii(multipliers: torch.Tensor, configured: float | None = None) -> torch.Tensor:
    """The largest move of each multiplier in one curvature-sized step (Newton, half Newton): `configured`
    (algorithm.trust_radius), else max(2, 2 lambda_i), so a step at most triples lambda_i or moves it by 2 from 0.
    It keeps a noisy or nearly singular curvature (a constraint the samples hardly vary on) from throwing lambda far.
    On the exact task's plant from lambda_0 = 0 (benchmarks/dual_controllers.py) the earlier max(1, lambda_i) cost
    Newton an iteration at b >= 1.35; no region at all gains little more and leaves a noisy curvature unguarded."""
    if configured is not None:
        return torch.full_like(multipliers, float(configured))
    return (2.0 * multipliers).clamp(min=2.0)


def curvature_step_sizes(step_size: torch.Tensor, hessian: torch.Tensor, slack: torch.Tensor,
                         multipliers: torch.Tensor, fraction: float = NEWTON_FRACTION,
                         trust_radius: float | None = None) -> torch.Tensor:
    """The projected rule's eta where it is not set (NaN entries): eta_i = fraction / H_ii, H = Cov(g) / beta the dual's
    curvature measured with the slack. Near lambda*, u_i ~ H_ii (lambda_i - lambda*_i), so a step of eta leaves
    (1 - eta H_ii) of the error: a fixed eta that suits one beta overshoots at a smaller one (eta H = 1.45 at beta 0.5
    on the default exact task with eta 1). Half a Newton step halves the error per step and passes on the slack's
    sampling noise as sd(u) / sqrt(3) in the improvement, against sd(u) for a full Newton step. The move stays inside
    the Newton rule's trust region (`trust_radii`)."""
    curvature = hessian.reshape(slack.numel(), slack.numel()).diagonal().to(slack.dtype)
    auto = fraction / curvature.clamp(min=1e-12)
    radius = trust_radii(multipliers.to(slack.dtype), trust_radius)
    auto = torch.minimum(auto, radius / slack.abs().clamp(min=1e-12))
    step_size = torch.as_tensor(step_size, dtype=slack.dtype)
    return torch.where(torch.isnan(step_size), auto, step_size)


def projected_dual_step(
    multipliers: torch.Tensor, slack: torch.Tensor, step_size: torch.Tensor | float, max_multiplier: float | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """CAID's dual step: lambda <- max(0, lambda - eta * u), u the measured slack (mean g - E_ref[g] - b).

    A constraint the policy over-satisfies (u > 0) gets a smaller multiplier, one it misses a larger one.
    """
    updated = (multipliers - torch.as_tensor(step_size, dtype=multipliers.dtype) * slack).clamp(min=0)
    return updated if max_multiplier is None else updated.clamp(max=max_multiplier)


def log_space_dual_step(
    multipliers: torch.Tensor, slack: torch.Tensor, step_size: torch.Tensor | float, max_multiplier: float | None = None,
    hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Safe RLHF's dual step: ln lambda <- ln lambda + alpha * lambda * violation, violation = -u, lambda capped.

    Multiplicative, so lambda stays positive (and a lambda of 0 stays 0: start it above 0).
    """
    violation = -slack
    updated = multipliers * torch.exp(torch.as_tensor(step_size, dtype=multipliers.dtype) * multipliers * violation)
    return updated if max_multiplier is None else updated.clamp(max=max_multiplier)


def newton_dual_step(
    multipliers: torch.Tensor, slack: torch.Tensor, step_size: torch.Tensor | float | None = None,
    max_multiplier: float | None = None, hessian: torch.Tensor | None = None, trust_radius: float | None = None,
) -> torch.Tensor:
    """A Newton step on the dual, projected onto lambda >= 0 as a QP and limited to a trust region:

        lambda' = lambda + d,  d = argmin { u . d + d' H d / 2 : lambda + d >= 0, |d_i| <= radius }

    Inside the bounds this is lambda - H^-1 u, the step that would zero the slack if the dual were quadratic; at the
    bound lambda_i = 0 the other multipliers re-solve with that constraint held inactive (a per-coordinate clip of
    the unconstrained step would keep the part of their step that only made sense with lambda_i < 0). The trust
    region (default: max(1, largest multiplier), so a step at most doubles lambda) keeps a noisy or nearly singular H
    from throwing lambda far. step_size is not used: the curvature sets the step.
    """
    if hessian is None:
        raise ValueError("the Newton dual step needs the dual's Hessian Cov(g) / beta from the on-policy samples")
    lam, gradient = multipliers.double(), slack.double()
    curvature = hessian.double().reshape(lam.numel(), lam.numel())
    curvature = 0.5 * (curvature + curvature.T)
    # a ridge of 1e-9 of the mean variance: an exactly singular estimate (a constraint the samples never vary on)
    # stays solvable, and the trust region bounds the step it allows
    ridge = 1e-9 * (1.0 + curvature.diagonal().abs().mean())
    curvature = curvature + ridge * torch.eye(lam.numel(), dtype=torch.float64)
    radius = trust_radii(lam, trust_radius)
    lower = torch.maximum(-lam, -radius)
    upper = radius
    if max_multiplier is not None:
        upper = torch.minimum(upper, max_multiplier - lam)
    step = box_qp(curvature, gradient, lower, upper)
    return (lam + step).clamp(min=0).to(multipliers.dtype)


def box_qp(hessian: torch.Tensor, linear: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
           tolerance: float = 1e-12, max_sweeps: int = 10_000) -> torch.Tensor:
    """argmin_d  linear . d + d' hessian d / 2  over lower <= d <= upper, for a positive definite hessian: cyclic
    exact minimisation over one coordinate at a time (converges to the unique minimiser; m is the number of
    constraints, a handful)."""
    step = torch.zeros_like(linear).clamp(lower, upper)
    for _ in range(max_sweeps):
        moved = 0.0
        for i in range(step.numel()):
            partial = linear[i] + hessian[i] @ step
            new = (step[i] - partial / hessian[i, i]).clamp(lower[i], upper[i])
            moved = max(moved, abs(float(new - step[i])))
            step[i] = new
        if moved <= tolerance * (1.0 + float(step.abs().max())):
            break
    return step


def per_prompt_means(values: torch.Tensor, prompt_index: torch.Tensor, prompts: int) -> torch.Tensor:
    """[rows, prompts]: the mean of each row of values [rows, n] over each prompt's samples (0 where a prompt has none)."""
    sums = torch.zeros(values.shape[0], prompts, dtype=values.dtype).index_add_(1, prompt_index, values)
    return sums / torch.bincount(prompt_index, minlength=prompts).clamp(min=1).to(values.dtype)


def within_prompt_scatter(utility: torch.Tensor, prompt_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sum over samples of (g - mean_x g)(g - mean_x g)', centred on each prompt's own mean, [m, m], and its
    degrees of freedom (samples - prompts). Their ratio estimates E_x Cov_pi(g | x), which over beta is the dual's
    Hessian (docs/method.md section 2): the spread between prompts is not curvature."""
    utility = utility.double()
    centred = utility - per_prompt_means(utility, prompt_index, int(prompt_index.max()) + 1)[:, prompt_index]
    return centred @ centred.T, int(utility.shape[1] - torch.unique(prompt_index).numel())


DUAL_STEPS = {"projected": projected_dual_step, "log": log_space_dual_step, "newton": newton_dual_step}
