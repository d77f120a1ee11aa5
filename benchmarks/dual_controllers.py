"""Dual-step rules on CAID's own plant, including cooper's nuPI controller (issue 14: is a PI-controlled multiplier a
better fit than the Newton step?).

    python train.py hydra.run.dir=outputs/default          # any exact run saves its instance.npz
    pip install cooper-optim                                # nuPI comes from the library, not rewritten
    python benchmarks/dual_controllers.py outputs/default/instance.npz

CAID measures the slack of a policy trained to (near) pi_lambda at a fixed lambda, so from the dual step's side the
plant is static: u(lambda) = E_x E_{pi_lambda}[g] - E_ref[g] - b, observed with sampling noise. This script runs
every rule on that plant, exactly: iteration t's policy is pi_{lambda_{t-1}} (the tilted policy on every response
of the instance), its improvement is exact, and the dual step sees what CAID's sees (the default sizes: 16 prompts
x 4096 samples from it, the slack against E_ref[g] from 16384 pi_ref samples a prompt, the curvature from the same
samples; lambda_0 the one-shot lambda* from pi_ref's samples, or 0 for a cold start). It counts the iterations until
|achieved - b| <= 0.1 b, as docs/dual_rules.md does for real runs, over the study's 7 thresholds x 3 noise seeds, and
the mean |achieved - b| / b over iterations 4-6 (what noise leaves once settled). Real runs add the policy step's
own error (beta KL about 0.007 sd to pi_lambda at the defaults); `bash sweeps/dual_rules.sh` measures those.

The rules: the projected step at eta 0.3, 1 and 3; half a Newton step (the default, eta = beta / (2 Var g)); the
trust-region Newton step (its default region max(2, 2 lambda), the earlier max(1, lambda), and none); and cooper's
nuPI (Sohrabi et al., ICML 2024: lambda <- lambda - eta (K_I e_t + K_P (xi_t - xi_{t-1})), xi an EMA of the error
e_t = u_t, here with its default K_I = 1 and nu = 0) at eta 1 with K_P 0.5 and 1, then projected onto lambda >= 0.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from dualign.core.dual_steps import curvature_step_sizes, newton_dual_step, projected_dual_step, within_prompt_scatter
from dualign.core.duality import solve_dual, tilted_log_weights
from dualign.core.oracle import Instance

THRESHOLDS = [0.1, 0.35, 0.6, 0.85, 1.1, 1.35, 1.6]  # the study's
TOLERANCE = 0.1


class NuPI:
    """cooper's nuPI optimizer driving one multiplier tensor: the error is the slack u (CAID minimises the dual,
    whose gradient is u), then the projection onto lambda >= 0 that cooper's multipliers apply."""

    def __init__(self, initial: torch.Tensor, step_size: float, proportional_gain: float):
        from cooper.optim import nuPI  # pip install cooper-optim

        self.multipliers = torch.nn.Parameter(initial.double().clone())
        self.optimizer = nuPI([self.multipliers], lr=step_size, Kp=proportional_gain, Ki=1.0, ema_nu=0.0)

    def __call__(self, multipliers, slack, hessian) -> torch.Tensor:
        with torch.no_grad():
            self.multipliers.copy_(multipliers)
        self.multipliers.grad = slack.double().clone()
        self.optimizer.step()
        with torch.no_grad():
            self.multipliers.clamp_(min=0)
        return self.multipliers.detach().clone()


def rules(initial: torch.Tensor) -> dict:
    """name -> a fresh rule(multipliers, slack, hessian) -> multipliers (nuPI keeps state between calls)."""
    fixed = lambda eta: lambda lam, u, h: projected_dual_step(lam, u, eta)  # noqa: E731
    return {
        "fixed eta=0.3": fixed(0.3), "fixed eta=1": fixed(1.0), "fixed eta=3": fixed(3.0),
        "half newton (default)": lambda lam, u, h: projected_dual_step(
            lam, u, curvature_step_sizes(torch.full_like(u, math.nan), h, u, lam)),
        "newton": lambda lam, u, h: newton_dual_step(lam, u, hessian=h),
        "newton, radius max(1, lambda) (before)": lambda lam, u, h: newton_dual_step(
            lam, u, hessian=h, trust_radius=max(1.0, float(lam.max()))),
        "newton, no trust region": lambda lam, u, h: newton_dual_step(lam, u, hessian=h, trust_radius=1e6),
        "nuPI eta=1 Kp=0.5": NuPI(initial, 1.0, 0.5), "nuPI eta=1 Kp=1": NuPI(initial, 1.0, 1.0),
    }


def sample(logprob: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """[P, count] response indices drawn from each prompt's law."""
    return torch.multinomial(logprob.exp(), count, replacement=True, generator=generator)


def run(instance: Instance, threshold: float, seed: int, cold: bool, iterations: int, dual_samples: int,
        reference_samples: int) -> dict:
    reward, utility, log_ref, beta = instance.reward, instance.utility, instance.ref_logprob, instance.beta
    prompts = reward.shape[0]
    b = torch.tensor([threshold], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    exact_reference = instance.reference_mean
    picked = sample(log_ref, reference_samples, generator)  # pi_ref's rollouts: E_ref[g] and the one-shot lambda
    ref_reward, ref_utility = reward.gather(1, picked), utility.gather(2, picked.expand(utility.shape[0], -1, -1))
    reference_mean = ref_utility.mean(dim=(1, 2))
    initial = torch.zeros(1, dtype=torch.float64) if cold else \
        solve_dual(ref_reward, ref_utility, reference_mean, b, beta).multipliers
    index = torch.arange(prompts).repeat_interleave(dual_samples)  # each dual sample's prompt
    out = {}
    for name, rule in rules(initial).items():
        lam, achieved = initial.clone(), []
        for _ in range(iterations):
            policy = tilted_log_weights(reward, utility, lam, beta, log_ref)  # what iteration t trains to
            achieved.append(float((policy.exp() * utility[0]).sum(-1).mean() - exact_reference[0]))
            drawn = sample(policy, dual_samples, generator)
            g = utility.gather(2, drawn.expand(utility.shape[0], -1, -1)).reshape(utility.shape[0], -1)
            scatter, dof = within_prompt_scatter(g, index)
            slack = g.mean(-1) - reference_mean - b
            lam = rule(lam, slack, scatter / dof / beta)
        reach = next((t + 1 for t, a in enumerate(achieved) if abs(a - threshold) <= TOLERANCE * threshold), None)
        settled = statistics.fmean(abs(a - threshold) / threshold for a in achieved[3:6])
        out[name] = {"reach": reach, "settled": settled}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("instance", help="instance.npz of an exact-task run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--dual-samples", type=int, default=4096)
    parser.add_argument("--reference-samples", type=int, default=16384)
    args = parser.parse_args()
    instance = Instance.load(args.instance)
    start = time.perf_counter()
    for cold in (False, True):
        results = {b: [run(instance, b, seed, cold, args.iterations, args.dual_samples, args.reference_samples)
                       for seed in args.seeds] for b in THRESHOLDS}
        names = list(results[THRESHOLDS[0]][0])
        horizon = args.iterations
        print(f"\n## {'cold start (lambda_0 = 0)' if cold else 'warm start (lambda_0 = one-shot lambda*)'}: "
              f"iterations until |achieved - b| <= 0.1 b (seeds {' '.join(map(str, args.seeds))}; -: not within "
              f"{horizon}), mean over seeds counting never as {horizon + 1}; settled: mean |a - b| / b, iterations "
              f"4-6\n")
        print("| rule | " + " | ".join(f"b={b:g}" for b in THRESHOLDS) + " | mean | settled |")
        print("|---" * (len(THRESHOLDS) + 3) + "|")
        for name in names:
            cells, means, settled = [], [], []
            for b in THRESHOLDS:
                reach = [r[name]["reach"] for r in results[b]]
                cells.append("/".join("-" if v is None else str(v) for v in reach))
                means.append(statistics.fmean(horizon + 1 if v is None else v for v in reach))
                settled += [r[name]["settled"] for r in results[b]]
            print(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(means):.2f} | "
                  f"{100 * statistics.fmean(settled):.1f}% |")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
