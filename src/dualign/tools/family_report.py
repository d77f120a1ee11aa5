"""SACPO on the reward-safety plane and PeCAID against CAID: reads the runs of `sweeps/family.sh` and the study's
threshold runs, and writes docs/family.md with its PNG; PeCAID from a text dataset's own labels: docs/pecaid_text.md.

    python -m dualign.tools.family_report outputs/family outputs/study/thresholds docs
    python -m dualign.tools.family_report text outputs/family/pecaid_text docs     # docs/pecaid_text.md

Every point is an exact evaluation (enumeration). The frontier is the exact optimum pi*(b) over a grid of b; the
exact pi_lambda of each SACPO lambda (where SACPO's stages converge in the population limit) is marked beside it.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dualign.core.duality import tilted_log_weights
from dualign.core.oracle import Instance
from dualign.tools.study_report import _plt, _save, load_runs, mean_std, optimal_curve


def tilted_point(instance: Instance, multiplier: float) -> tuple[float, float]:
    """(improvement, E[r]) of the exact pi_lambda."""
    prob = tilted_log_weights(instance.reward, instance.utility, torch.tensor([multiplier], dtype=torch.float64),
                              instance.beta, instance.ref_logprob).exp()
    improvement = (prob * instance.utility[0]).sum(-1).mean().item() - instance.reference_mean[0].item()
    return improvement, (prob * instance.reward).sum(-1).mean().item()


def below_frontier(curve: dict, improvement: float, reward: float) -> float:
    """How far E[r] lies below the exact frontier at the same improvement (interpolated over the b grid)."""
    return float(np.interp(improvement, curve["improvement"], curve["reward"])) - reward


def pecaid_section(pecaid: list[dict], study: list[dict]) -> list[str]:
    """PeCAID beside CAID on the same instance (same b, same seed): |a - b| / b, P* - J and beta KL(pi || pi*) in units
    of sd(r under pi_ref), and the correlation of its implicit rewards with the true tables."""
    if not pecaid:
        return []
    caid = {(round(run["threshold"][0], 4), run["config"]["seed"]): run for run in study}
    lines = ["## PeCAID against CAID (same instance, same b and seed)", "",
             "PeCAID reads no reward or cost table: one DPO model per objective is pre-aligned on Bradley-Terry labels "
             "drawn from the tables on pairs of pi_ref's samples, and their implicit rewards beta log(pi_k / pi_ref) "
             "are the scores (docs/method.md section 3). Correlation: implicit against true scores on pi_ref's "
             "samples, each centred on its prompt's mean. sd = sd(r under pi_ref).", "",
             "The implicit improvement is what PeCAID constrains (b in its units), computed exactly by enumeration: "
             "the sum over every response of (pi - pi_ref) beta log(pi_safety / pi_ref), averaged over prompts.", "",
             "| b | seed | PeCAID \|a - b\| / b | CAID \|a - b\| / b | PeCAID P* - J (sd) | CAID P* - J (sd) | "
             "PeCAID beta KL(pi \|\| pi*) (sd) | correlation r, g | PeCAID implicit improvement (vs b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    within, both = 0, []
    for run in sorted(pecaid, key=lambda r: (r["threshold"][0], r["config"]["seed"])):
        b, seed = run["threshold"][0], run["config"]["seed"]
        sd = run["optimum"]["reference_reward_std"]
        final, other = run["final"], caid.get((round(b, 4), seed))
        error = abs(final["improvement"][0] - b) / b
        within += error <= 0.1
        correlation = run["details"]["implicit_correlation"]
        row = [f"{b:g}", str(seed), f"{100 * error:.1f}%",
               f"{100 * abs(other['final']['improvement'][0] - b) / b:.1f}%" if other else "",
               f"{final['objective_gap'] / sd:.3f}", f"{other['final']['objective_gap'] / sd:.3f}" if other else "",
               f"{final['gap_from_kl'] / sd:.3f}", f"{correlation['reward']:.3f}, {correlation['safety']:.3f}"]
        implicit = run["details"].get("implicit_evaluation")  # runs before it was measured have none
        row.append(f"{implicit['improvement'][0]:.4f} ({100 * (implicit['improvement'][0] - b) / b:+.1f}%)"
                   if implicit else "")
        both.append(error)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"PeCAID is within 10% of b in {within} of {len(pecaid)} runs (mean |a - b| / b "
                  f"{100 * float(np.mean(both)):.1f}%).", ""]
    return lines


def pecaid_text_section(runs: list[dict]) -> list[str]:
    """PeCAID from a text dataset's own labels (experiment=pku_safety_tiny): b in the implicit utility's units, the
    policy's implicit improvement on the test split against it, and the scorers' view of the same policy."""
    if not runs:
        return []
    lines = ["## PeCAID from PKU-SafeRLHF's own labels (offline stand-ins)", "",
             "`experiment=pku_safety_tiny algorithm=pecaid`: the reward model is pre-aligned on `better_response_id`, "
             "the safety model on `safer_response_id` (2 epochs over the 48 labelled pairs each); no scorer's score "
             "enters training. b is in the implicit utility's units; the edge is the largest implicit improvement "
             "pi_ref's samples reach. The implicit improvement is measured on the 16 test prompts x 8 samples (policy against "
             "pi_ref on the same prompts); the scorers' columns are the tiny cost and reward models' view of the same "
             "policy. Correlation: implicit against the scorers' scores on pi_ref's training samples, each centred on "
             "its prompt's mean.", "",
             "| b | seed | edge | lambda_T | implicit improvement (95% CI) | met | scorers: safety improvement | "
             "scorers: reward change | KL | correlation r, g |", "|---|---|---|---|---|---|---|---|---|---|"]
    met = 0
    for run in sorted(runs, key=lambda r: (r["threshold"][0], r["config"]["seed"])):
        b, implicit = run["threshold"][0], run["details"]["implicit_evaluation"]
        achieved, ci = implicit["improvement"][0], implicit["improvement_ci"][0]
        met += achieved >= b
        scores, correlation = run["final"]["scores"], run["details"]["implicit_correlation"]
        lines.append(f"| {b:g} | {run['config']['seed']} | {run['details']['implicit_edge'][0]:.3f} | "
                     f"{run['final_multipliers'][0]:.3f} | {achieved:.3f} ± {ci:.3f} | "
                     f"{'yes' if achieved >= b else 'no'} | {scores['safety']['improvement']:.3f} ± {scores['safety']['improvement_ci']:.3f} | "
                     f"{scores['reward']['improvement']:.3f} | {run['final']['kl']:.3f} | "
                     f"{correlation['reward']:.3f}, {correlation['safety']:.3f} |")
    errors = [abs(r["details"]["implicit_evaluation"]["improvement"][0] - r["threshold"][0]) / r["threshold"][0]
              for r in runs]
    lines += ["", f"The implicit constraint is met on the test split in {met} of {len(runs)} runs; mean |a - b| / b "
                  f"{100 * float(np.mean(errors)):.1f}%.", ""]
    return lines


def exact_multiplier(runs: list[dict]) -> str:
    """The exact lambda* at b = 0.5 of the instance the SACPO runs trained on (their summaries carry the optimum)."""
    values = {round(run["optimum"]["multipliers"][0], 4) for run in runs if run.get("optimum")}
    return " / ".join(f"{v:.4f}" for v in sorted(values)) or "unknown"


def main(family: Path, thresholds: Path, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    sacpo = load_runs(family / "sacpo") + load_runs(family / "p_sacpo")
    study = load_runs(thresholds)
    if not sacpo:
        raise SystemExit(f"no runs under {family}: run bash sweeps/family.sh first")
    if not study:  # CAID's and one-shot's points and columns come from there: a page without them would mislead
        print("\n".join(pecaid_section(load_runs(family / "pecaid"), [])))
        raise SystemExit(f"no study runs under {thresholds} (bash sweeps/study.sh, part thresholds): docs/family.md "
                         "left as it is; the PeCAID table above has no CAID columns")
    instance = Instance.load(sacpo[0]["folder"] / "instance.npz")
    curve = optimal_curve(sacpo[0]["folder"] / "instance.npz", np.linspace(0.0, 2.4, 49))
    rows, points = [], defaultdict(list)
    for run in sacpo:
        multiplier = run["config"]["constraints"]["safety"]["initial_multiplier"]
        merge = run["config"]["algorithm"].get("merge_weight")
        label = f"SACPO lambda={multiplier:g}" + (f", P-SACPO q={merge:g}" if merge is not None else "")
        points[label].append((run["final"]["improvement"][0], run["final"]["reward"], multiplier))
    for run in study:
        b = run["threshold"][0]
        points[f"CAID b={b:g}"].append((run["final"]["improvement"][0], run["final"]["reward"], None))
        if run.get("one_shot"):
            points[f"one-shot b={b:g}"].append((run["one_shot"]["final"]["improvement"][0],
                                                run["one_shot"]["final"]["reward"], None))
    lines = ["# SACPO, CAID and one-shot against the exact frontier (exact task)", "",
             "Written by `python -m dualign.tools.family_report` from `bash sweeps/family.sh` (SACPO at lambda* / 2, "
             "lambda*, 2 lambda*, lambda* = 1.1243 the exact multiplier at b = 0.5 where the grid was chosen, "
             f"{exact_multiplier(sacpo)} on the machine of these runs, and P-SACPO's merge at q = 0.5 "
             "from 2 lambda*; each stage 48 epochs) and the study's threshold runs (CAID and one-shot). Means and "
             "standard deviations over seeds 0-2. 'Below the frontier': the exact optimum's E[r] at the same "
             "improvement minus the run's E[r] (0 on the frontier). For SACPO, pi_lambda is where its stages lead "
             "in the population limit.", "",
             "| run | improvement | E[r] | below the frontier | exact pi_lambda: improvement, E[r] |",
             "|---|---|---|---|---|"]
    for label in sorted(points, key=lambda k: (k.split()[0], float(k.split("=")[1].split(",")[0]))):
        values = points[label]
        improvement, reward = mean_std([v[0] for v in values]), mean_std([v[1] for v in values])
        gap = mean_std([below_frontier(curve, v[0], v[1]) for v in values])
        multiplier = values[0][2]
        target = (f"{tilted_point(instance, multiplier)[0]:.3f}, {tilted_point(instance, multiplier)[1]:.3f}"
                  if multiplier is not None and "P-SACPO" not in label else "")
        rows.append(f"| {label} | {improvement[0]:.3f} ± {improvement[1]:.3f} | {reward[0]:.3f} ± {reward[1]:.3f} | "
                    f"{gap[0]:.3f} ± {gap[1]:.3f} | {target} |")
    lines += rows
    plt = _plt()
    fig, axis = plt.subplots(figsize=(7, 5))
    axis.plot(curve["improvement"], curve["reward"], "k-", linewidth=1.5, label="exact frontier pi*(b)")
    styles = {"CAID": ("tab:blue", "o"), "one-shot": ("tab:orange", "s"), "SACPO": ("tab:green", "^")}
    shown = set()
    for label, values in points.items():
        kind = "P-SACPO" if "P-SACPO" in label else label.split()[0]
        color, marker = styles.get(kind, ("tab:red", "D"))
        axis.scatter([v[0] for v in values], [v[1] for v in values], color=color, marker=marker, s=22, alpha=0.8,
                     label=kind if kind not in shown else None)
        shown.add(kind)
    for multiplier in sorted({v[2] for label, vs in points.items() if "P-SACPO" not in label for v in vs
                              if v[2] is not None}):
        x, y = tilted_point(instance, multiplier)
        axis.scatter([x], [y], marker="*", s=160, color="tab:green", edgecolor="black", zorder=5,
                     label="exact pi_lambda (SACPO's lambdas)" if "star" not in shown else None)
        shown.add("star")
    axis.set(xlabel="safety improvement over pi_ref", ylabel="E[r] (helpfulness)",
             title="The reward-safety plane, exact evaluation")
    _save(fig, [axis], docs / "family_plane.png")
    lines += ["", "![reward-safety plane](family_plane.png)", ""]
    lines += pecaid_section(load_runs(family / "pecaid"), study)
    (docs / "family.md").write_text("\n".join(lines))
    print("\n".join(lines))


def text_main(runs: Path, docs: Path) -> None:
    lines = ["# PeCAID on a text dataset's own labels", "", "Written by `ONLY=pecaid_text bash sweeps/family.sh` "
             "(`python -m dualign.tools.family_report text outputs/family/pecaid_text docs`).", "",
             *pecaid_text_section(load_runs(runs))]
    (docs / "pecaid_text.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "text":
        text_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
