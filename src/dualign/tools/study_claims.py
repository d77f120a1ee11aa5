"""The paper's claims for docs/study.md, each checked against the study's runs: the verdicts are computed, not written
by hand. Used by study_report."""
from __future__ import annotations

from collections import defaultdict

import numpy as np


def parameters(model_cfg: dict) -> int:
    layers, width = model_cfg["n_layer"], model_cfg["n_embd"]
    return layers * (12 * width * width + 13 * width) + 2 * width  # GPT-2 blocks + final layer norm, no embeddings


def claims_section(parts: dict) -> list[str]:
    """The paper's claims, each checked against the numbers above; the verdict is computed, not written by hand."""
    lines = ["## The claims, checked", ""]
    runs = parts["thresholds"]
    if runs:
        by_b = defaultdict(list)
        for run in runs:
            by_b[run["threshold"][0]].append(run)
        grid = sorted(by_b)
        caid = {b: np.mean([r["final"]["improvement"][0] for r in by_b[b]]) for b in grid}
        one = {b: np.mean([r["one_shot"]["final"]["improvement"][0] for r in by_b[b]]) for b in grid}
        tracked = [b for b in grid if abs(caid[b] - b) <= 0.1 * b]
        under = [b for b in grid if one[b] < 0.9 * b]
        over = [b for b in grid if one[b] > 1.1 * b]
        plug_in_error = max(abs(r["one_shot_multipliers"][0] - r["optimum"]["multipliers"][0]) / r["optimum"]["multipliers"][0]
                            for r in runs)
        lines.append(
            f"1. *CAID's achieved improvement tracks b; one-shot undershoots small b and overshoots large b.* "
            f"CAID is within 10% of b at {len(tracked)} of {len(grid)} thresholds (b = {', '.join(f'{b:g}' for b in tracked)})"
            + (f"; above that it falls short (b = {', '.join(f'{b:g}' for b in grid if b not in tracked)}: achieved "
               f"{', '.join(f'{caid[b]:.3f}' for b in grid if b not in tracked)}) while lambda keeps rising, because DPO on "
               f"pairs from pi_ref cannot move the policy that far within the epoch budget" if len(tracked) < len(grid) else "")
            + f". One-shot undershoots (below 0.9 b) at {len(under)} of {len(grid)} thresholds and overshoots at {len(over)}: "
            + ("**the overshoot at large b does not hold on this task**; one-shot's lambda is accurate (the plug-in solve "
               f"from {runs[0]['config']['reference']['samples_per_prompt']} samples a prompt is within {100 * plug_in_error:.1f}% of the exact lambda* at every b and seed), so its "
               "shortfall comes from the DPO policy step under-fitting the tilted optimum, which grows with b."
               if not over else "the claim holds.")
        )
        # reward at matched safety: one_shot's E[r] interpolated at caid's achieved improvements
        one_x = np.array([np.mean([r["one_shot"]["final"]["improvement"][0] for r in by_b[b]]) for b in grid])
        one_y = np.array([np.mean([r["one_shot"]["final"]["scores"]["reward"]["policy"] for r in by_b[b]]) for b in grid])
        order = np.argsort(one_x)
        differences = [np.mean([r["final"]["scores"]["reward"]["policy"] for r in by_b[b]])
                       - np.interp(caid[b], one_x[order], one_y[order]) for b in grid if one_x.min() <= caid[b] <= one_x.max()]
        if differences:
            lines.append(
                f"2. *CAID's helpfulness-safety curve lies above one-shot's.* At equal achieved safety, CAID's E[r] minus "
                f"one-shot's (interpolated) is {np.mean(differences):+.3f} on average over {len(differences)} thresholds "
                f"(range {min(differences):+.3f} to {max(differences):+.3f}). "
                + ("**Not observed here**: both methods train the same DPO family on the same pairs and land on the same curve; "
                   "CAID's advantage on this task is hitting the requested b, not a better trade-off."
                   if abs(np.mean(differences)) < 0.02 else ("The claim holds." if np.mean(differences) > 0 else "**The opposite holds here.**"))
            )
    two = parts["two_constraints"]
    if two:
        met = [r for r in two if all(abs(a - t) <= 0.1 * t for a, t in zip(r["final"]["improvement"], r["threshold"]))]
        cells = {tuple(r["threshold"]): r["final"]["objective"] for r in two}
        b1s, b2s = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
        monotone = all(cells[(b1s[i], b2)] >= cells[(b1s[i + 1], b2)] for i in range(len(b1s) - 1) for b2 in b2s) and \
            all(cells[(b1, b2s[i])] >= cells[(b1, b2s[i + 1])] for i in range(len(b2s) - 1) for b1 in b1s)
        lines.append(
            f"3. *With two constraints both are met across threshold pairs and tighter thresholds cost helpfulness.* "
            f"Both improvements are within 10% of their b in {len(met)} of {len(two)} cells; J "
            + ("decreases monotonically as either threshold tightens (holds)." if monotone else "is not monotone in the thresholds.")
        )
    pd = parts["primal_dual"]
    if pd:
        ranges = []
        for run in pd:
            lambdas = [h["multipliers"][0] for h in run["trajectory"]]
            ranges.append(max(lambdas[len(lambdas) // 2:]) - min(lambdas[len(lambdas) // 2:]))
        errors = [abs(r["final_multipliers"][0] - r["optimum"]["multipliers"][0]) / r["optimum"]["multipliers"][0] for r in pd]
        lines.append(
            f"4. *Iterative primal-dual methods oscillate or fail to converge.* Over the second half of the run lambda moves "
            f"within a range of at most {max(ranges):.3f} and ends within {100 * max(errors):.1f}% of lambda*, with the constraint "
            f"met within {max(abs(r['final']['improvement'][0] - r['threshold'][0]) for r in pd):.3f}: "
            + ("**no oscillation or divergence on this task**, where the policy-gradient step is exact in expectation and "
               "cheap (the paper's argument is about large models, where each primal step is noisy and costly: not tested here)."
               if max(errors) < 0.1 else "it does not settle at lambda* here.")
        )
    sizes = parts["model_size"]
    if sizes:
        ordered = sorted(sizes, key=lambda r: parameters(r["config"]["model"]))
        tv = [r["final"]["tv_to_optimum"] for r in ordered]
        trend = np.corrcoef(np.log([parameters(r["config"]["model"]) for r in ordered]), np.log(tv))[0, 1]
        lines.append(
            f"5. *The gaps grow as the model family gets poorer.* TV to pi* goes from {tv[-1]:.4f} (largest model) to "
            f"{tv[0]:.4f} (smallest); correlation of log TV with log parameters {trend:+.2f} "
            + ("(holds)." if trend < -0.5 else "(no clear trend).")
        )
    return lines + [""]
