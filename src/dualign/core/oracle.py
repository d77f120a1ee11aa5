"""Exact evaluation on an enumerated instance (docs/method.md sections 2 and 6). Pure torch.

An instance is everything the problem is: log pi_ref(y|x) [P, N], reward [P, N], utilities [m, P, N], beta and
the required improvements b [m]. Prompts are weighted uniformly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dualign.core.duality import dual_terms, require_converged, solve_dual, tilted_log_weights


@dataclass
class Instance:
    ref_logprob: torch.Tensor  # [P, N]
    reward: torch.Tensor  # [P, N]
    utility: torch.Tensor  # [m, P, N]
    beta: float
    threshold: torch.Tensor  # [m] required improvements b over the reference

    def __post_init__(self):
        self.ref_logprob, self.reward, self.utility, self.threshold = (
            torch.as_tensor(t, dtype=torch.float64) for t in (self.ref_logprob, self.reward, self.utility, self.threshold)
        )

    @property
    def reference_mean(self) -> torch.Tensor:
        """E_ref[g_i], [m]."""
        return (self.ref_logprob.exp() * self.utility).sum(-1).mean(-1)

    def save(self, path) -> None:
        np.savez(
            path, ref_logprob=self.ref_logprob.numpy(), reward=self.reward.numpy(), utility=self.utility.numpy(),
            beta=np.float64(self.beta), threshold=self.threshold.numpy(),
        )

    @classmethod
    def load(cls, path) -> "Instance":
        data = np.load(path)
        return cls(data["ref_logprob"], data["reward"], data["utility"], float(data["beta"]), data["threshold"])


@dataclass
class Optimum:
    multipliers: torch.Tensor  # lambda*
    value: float  # P* = D(lambda*)
    logprob: torch.Tensor  # log pi*(y|x), [P, N]


class ExactOracle:
    def __init__(self, instance: Instance):
        self.instance = instance
        self._optimum: Optimum | None = None

    def optimum(self) -> Optimum:
        """The distribution-space optimum: lambda* = argmin D, P* = D(lambda*), pi* = pi_{lambda*}."""
        if self._optimum is None:
            i = self.instance
            solution = require_converged(solve_dual(i.reward, i.utility, i.reference_mean, i.threshold, i.beta,
                                                    log_base=i.ref_logprob), f"the exact optimum at beta={i.beta:g}")
            logprob = tilted_log_weights(i.reward, i.utility, solution.multipliers, i.beta, log_base=i.ref_logprob)
            self._optimum = Optimum(solution.multipliers, solution.value, logprob)
        return self._optimum

    def dual_value(self, multipliers) -> float:
        i = self.instance
        lam = torch.as_tensor(multipliers, dtype=torch.float64)
        return dual_terms(i.reward, i.utility, i.reference_mean, i.threshold, lam, i.beta, i.ref_logprob).value.item()

    def evaluate(self, logprob: torch.Tensor) -> dict[str, float | list[float]]:
        """Exact E[r], E[g_i], improvements, KL to pi_ref, objective J = E[r] - beta KL, TV to pi*, and P* - J split
        exactly as beta KL(pi || pi*) + lambda* . (a - b): pi* maximises the Lagrangian at lambda*, whose value at pi
        is P* - beta KL(pi || pi*), and lambda* . (a* - b) = 0 (complementary slackness)."""
        i = self.instance
        logprob = torch.as_tensor(logprob, dtype=torch.float64)
        logprob = logprob - torch.logsumexp(logprob, -1, keepdim=True)  # guard against float32 drift
        prob = logprob.exp()
        reward = (prob * i.reward).sum(-1).mean().item()
        utility = (prob * i.utility).sum(-1).mean(-1)
        kl = (prob * (logprob - i.ref_logprob)).sum(-1).mean().item()
        improvement = utility - i.reference_mean
        optimum = self.optimum()
        tv = 0.5 * (prob - optimum.logprob.exp()).abs().sum(-1).mean().item()
        kl_to_optimum = (prob * (logprob - optimum.logprob)).sum(-1).mean().item()
        slack = improvement - i.threshold
        return {
            "reward": reward,
            "utility": utility.tolist(),
            "improvement": improvement.tolist(),
            "slack": slack.tolist(),
            "kl": kl,
            "objective": reward - i.beta * kl,
            "objective_gap": optimum.value - (reward - i.beta * kl),  # P* - J
            "tv_to_optimum": tv,
            "kl_to_optimum": kl_to_optimum,
            "gap_from_kl": i.beta * kl_to_optimum,  # beta KL(pi || pi*): how far the policy is from pi*
            "gap_from_constraints": (optimum.multipliers.double() * slack).sum().item(),  # lambda* . (a - b)
        }
