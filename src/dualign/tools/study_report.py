"""The exact-task study's report: reads the runs of `sweeps/study.sh` and writes docs/study.md with PNG plots.

    python -m dualign.tools.study_report outputs/study docs

Every figure comes from the runs' summary.json (exact evaluation by enumeration) and instance.npz files.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from dualign.core.oracle import ExactOracle, Instance


def load_runs(folder: Path) -> list[dict]:
    """summary.json of every finished job under folder (a Hydra multirun), with its resolved config."""
    runs = []
    for summary_path in sorted(folder.glob("*/summary.json"), key=lambda p: int(p.parent.name)):
        summary = json.loads(summary_path.read_text())
        summary["config"] = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        summary["folder"] = summary_path.parent
        runs.append(summary)
    return runs


def mean_std(values) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def optimal_curve(instance_path: Path, thresholds: np.ndarray) -> dict[str, list[float]]:
    """The true optimum at each b: E[r], achieved improvement and P*(b), from one enumerated instance."""
    base = Instance.load(instance_path)
    curve = defaultdict(list)
    for b in thresholds:
        oracle = ExactOracle(Instance(base.ref_logprob, base.reward, base.utility, base.beta, [b]))
        optimum = oracle.optimum()
        evaluation = oracle.evaluate(optimum.logprob)
        curve["b"].append(float(b))
        curve["reward"].append(evaluation["reward"])
        curve["improvement"].append(evaluation["improvement"][0])
        curve["value"].append(optimum.value)
        curve["lambda"].append(optimum.multipliers[0].item())
    return curve


def _save(fig, axes, path: Path, legend_size: int = 8) -> None:
    """Grid, legend, tight layout, PNG, close: the same finish for every figure of the report."""
    for axis in axes:
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def thresholds_section(runs: list[dict], docs: Path, extra: dict[str, list[dict]]) -> tuple[list[str], dict]:
    plt = _plt()
    by_b = defaultdict(list)
    for run in runs:
        by_b[run["threshold"][0]].append(run)
    grid = sorted(by_b)
    rows, stats = [], {"caid": defaultdict(list), "one_shot": defaultdict(list)}
    caid_points, one_shot_points = [], []
    for b in grid:
        group = by_b[b]
        caid = [r["final"]["improvement"][0] for r in group]
        one_shot = [r["one_shot"]["final"]["improvement"][0] for r in group]
        caid_gap = [r["optimum"]["value"] - r["final"]["objective"] for r in group]
        one_shot_gap = [r["optimum"]["value"] - r["one_shot"]["final"]["objective"] for r in group]
        for seed_index, r in enumerate(group):
            stats["caid"][r["config"]["seed"]].append((abs(caid[seed_index] - b), caid_gap[seed_index]))
            stats["one_shot"][r["config"]["seed"]].append((abs(one_shot[seed_index] - b), one_shot_gap[seed_index]))
        caid_points.append((mean_std(caid), mean_std([r["final"]["scores"]["reward"]["policy"] for r in group])))
        one_shot_points.append((mean_std(one_shot), mean_std([r["one_shot"]["final"]["scores"]["reward"]["policy"] for r in group])))
        rows.append(
            f"| {b:g} | {group[0]['optimum']['multipliers'][0]:.3f} | {fmt(*mean_std([r['final_multipliers'][0] for r in group]))} "
            f"| {fmt(*mean_std(caid))} | {fmt(*mean_std(one_shot))} | {fmt(*mean_std(caid_gap))} | {fmt(*mean_std(one_shot_gap))} |"
        )
    curve = optimal_curve(runs[0]["folder"] / "instance.npz", np.linspace(0.0, 2.0, 41))

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, max(grid) * 1.1], [0, max(grid) * 1.1], "k--", lw=1, label="y = x (target)")
    for label, points, marker in (("caid", caid_points, "o-"), ("one_shot", one_shot_points, "s-")):
        ax.errorbar(grid, [p[0][0] for p in points], yerr=[p[0][1] for p in points], fmt=marker, capsize=3, label=label)
    ax.set(xlabel="required improvement b", ylabel="achieved improvement (exact)",
           title="achieved vs required improvement (3 seeds)")
    _save(fig, [ax], docs / "study_achieved_vs_threshold.png")
    plt.close(fig)

    fig, (ax, ax_j) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.plot(curve["improvement"], curve["reward"], "k-", lw=1.5, label="pi*(b), the exact optimum at each b")
    ax_j.plot(curve["b"], curve["value"], "k-", lw=1.5, label="P*(b)")
    for label, points, objectives, marker in (
        ("caid", caid_points, [[r["final"]["objective"] for r in by_b[b]] for b in grid], "o"),
        ("one_shot", one_shot_points, [[r["one_shot"]["final"]["objective"] for r in by_b[b]] for b in grid], "s"),
    ):
        ax.errorbar([p[0][0] for p in points], [p[1][0] for p in points], xerr=[p[0][1] for p in points],
                    yerr=[p[1][1] for p in points], fmt=marker, capsize=2, label=label)
        ax_j.errorbar([p[0][0] for p in points], [mean_std(o)[0] for o in objectives],
                      yerr=[mean_std(o)[1] for o in objectives], fmt=marker, capsize=2, label=f"{label}: J at its achieved improvement")
    for name, marker in (("dpo_h", "^"), ("dpo_s", "v")):
        if extra.get(name):
            ax.plot([mean_std([r["final"]["scores"]["utility_0"]["improvement"] for r in extra[name]])[0]],
                    [mean_std([r["final"]["scores"]["reward"]["policy"] for r in extra[name]])[0]], marker, ms=9,
                    label=name.replace("dpo_h", "DPO_h (lambda = 0)").replace("dpo_s", "DPO_s (utility only)"))
    ax.set(xlabel="safety improvement over pi_ref (exact)", ylabel="E[r] (exact)", title="reward vs safety")
    ax_j.set(xlabel="safety improvement over pi_ref (exact)", ylabel="J = E[r] - beta KL (exact)",
             title="objective vs safety, with P*(b)")
    _save(fig, [ax, ax_j], docs / "study_reward_vs_safety.png")
    plt.close(fig)

    lines = [
        "| b | lambda* | caid lambda_T | caid achieved | one_shot achieved | caid P* - J | one_shot P* - J |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    return lines, stats


def method_summary(stats: dict) -> tuple[float, float, float, float]:
    """Mean over the b grid per seed, then mean and spread over seeds: (|achieved - b|, std, P* - J, std)."""
    per_seed_error = [np.mean([e for e, _ in values]) for values in stats.values()]
    per_seed_gap = [np.mean([g for _, g in values]) for values in stats.values()]
    return (*mean_std(per_seed_error), *mean_std(per_seed_gap))


def primal_dual_section(runs: list[dict], docs: Path) -> tuple[list[str], dict]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows, stats = [], defaultdict(lambda: defaultdict(list))
    for run in runs:
        rule, seed = run["config"]["algorithm"]["dual_rule"], run["config"]["seed"]
        history = run["trajectory"]
        steps = [0] + [h["iteration"] for h in history]
        lambdas = [run["initial_multipliers"][0]] + [h["multipliers"][0] for h in history]
        achieved = [h["evaluation"]["improvement"][0] for h in history]
        style = "-" if rule == "log" else ":"
        axes[0].plot(steps, lambdas, style, color=f"C{seed}", label=f"{rule}, seed {seed}")
        axes[1].plot(steps[1:], achieved, style, color=f"C{seed}", label=f"{rule}, seed {seed}")
        b, lam_star = run["threshold"][0], run["optimum"]["multipliers"][0]
        tail = lambdas[len(lambdas) // 2:]
        stats[rule][seed].append((abs(run["final"]["improvement"][0] - b), run["optimum"]["value"] - run["final"]["objective"]))
        rows.append(
            f"| {rule} | {seed} | {lambdas[-1]:.3f} | {lam_star:.3f} | {max(tail) - min(tail):.3f} "
            f"| {run['final']['improvement'][0]:.3f} | {b:g} | {run['optimum']['value'] - run['final']['objective']:.3f} |"
        )
    if runs:
        axes[0].axhline(runs[0]["optimum"]["multipliers"][0], color="k", ls="--", label="lambda* (exact)")
        axes[1].axhline(runs[0]["threshold"][0], color="k", ls="--", label="b")
    axes[0].set(xlabel="dual update (every 10 policy steps)", ylabel="lambda", title="primal-dual: lambda")
    axes[1].set(xlabel="dual update", ylabel="achieved improvement (exact)", title="primal-dual: constraint")
    _save(fig, axes, docs / "study_primal_dual.png", legend_size=7)
    plt.close(fig)
    lines = [
        "| rule | seed | final lambda | lambda* | lambda range over the 2nd half | achieved | b | P* - J |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return lines, stats


def two_constraints_section(runs: list[dict]) -> list[str]:
    lines = [
        "| b_safety | b_humour | achieved safety | achieved humour | both within 10% of b | J | P* | P* - J |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: tuple(r["threshold"])):
        b, achieved = run["threshold"], run["final"]["improvement"]
        ok = all(abs(a - t) <= 0.1 * t for a, t in zip(achieved, b))
        lines.append(
            f"| {b[0]:g} | {b[1]:g} | {achieved[0]:.3f} | {achieved[1]:.3f} | {'yes' if ok else 'no'} "
            f"| {run['final']['objective']:.3f} | {run['optimum']['value']:.3f} | {run['optimum']['value'] - run['final']['objective']:.3f} |"
        )
    return lines


def _parameters(model_cfg: dict) -> int:
    layers, width = model_cfg["n_layer"], model_cfg["n_embd"]
    return layers * (12 * width * width + 13 * width) + 2 * width  # GPT-2 blocks + final layer norm, no embeddings


def model_size_section(runs: list[dict], docs: Path) -> list[str]:
    plt = _plt()
    lines = [
        "| n_layer | n_embd | block params | lambda* | lambda_T | \\|D_p - P*\\| | P* - J | slack (achieved - b) | TV to pi* |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    points = []
    for run in sorted(runs, key=lambda r: _parameters(r["config"]["model"])):
        model = run["config"]["model"]
        lam = run["final_multipliers"][0]
        slack = run["final"]["improvement"][0] - run["threshold"][0]
        # D_p(lambda_T) ~ L(pi_theta_T, lambda_T): the final policy maximises the Lagrangian at (nearly) lambda_T
        dual_gap = abs(run["final"]["objective"] + lam * slack - run["optimum"]["value"])
        points.append((_parameters(model), dual_gap, run["optimum"]["value"] - run["final"]["objective"], run["final"]["tv_to_optimum"]))
        lines.append(
            f"| {model['n_layer']} | {model['n_embd']} | {_parameters(model)} | {run['optimum']['multipliers'][0]:.3f} | {lam:.3f} "
            f"| {dual_gap:.4f} | {run['optimum']['value'] - run['final']['objective']:.4f} | {slack:+.4f} | {run['final']['tv_to_optimum']:.4f} |"
        )
    fig, ax = plt.subplots(figsize=(5.5, 4))
    params = [p[0] for p in points]
    ax.loglog(params, [max(p[1], 1e-5) for p in points], "o-", label="|D_p - P*|")
    ax.loglog(params, [max(abs(p[2]), 1e-5) for p in points], "s-", label="|P* - J|")
    ax.loglog(params, [p[3] for p in points], "^-", label="TV to pi*")
    ax.set(xlabel="policy parameters (transformer blocks)", title="parametrisation gap vs model size")
    _save(fig, [ax], docs / "study_model_size.png")
    plt.close(fig)
    return lines


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
               f"from 512 samples a prompt is within {100 * plug_in_error:.1f}% of the exact lambda* at every b and seed), so its "
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
        ordered = sorted(sizes, key=lambda r: _parameters(r["config"]["model"]))
        tv = [r["final"]["tv_to_optimum"] for r in ordered]
        trend = np.corrcoef(np.log([_parameters(r["config"]["model"]) for r in ordered]), np.log(tv))[0, 1]
        lines.append(
            f"5. *The gaps grow as the model family gets poorer.* TV to pi* goes from {tv[-1]:.4f} (largest model) to "
            f"{tv[0]:.4f} (smallest); correlation of log TV with log parameters {trend:+.2f} "
            + ("(holds)." if trend < -0.5 else "(no clear trend).")
        )
    return lines + [""]


def main(study: str, docs_dir: str) -> None:
    root, docs = Path(study), Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    parts = {name: load_runs(root / name) for name in
             ("thresholds", "primal_dual", "dpo_h", "dpo_s", "online_pairs", "two_constraints", "model_size")}
    out = ["# The exact-task study", "",
           "Generated by `bash sweeps/study.sh` (the runs, about 40 minutes on 2 CPU cores) and "
           "`python -m dualign.tools.study_report outputs/study docs` (this page). Every number is an exact expectation "
           "computed by enumerating all 512 responses of all 16 prompts; nothing is tuned beyond the documented "
           "defaults (conf/). Task: beta = 1, one constraint on utility_0 (\"safety\") unless stated.", ""]
    method_rows = []
    if parts["thresholds"]:
        lines, stats = thresholds_section(parts["thresholds"], docs, parts)
        for name in ("caid", "one_shot"):
            error, error_std, gap, gap_std = method_summary(stats[name])
            method_rows.append(f"| {name} (dpo, pairs from pi_ref) | b grid of {len(set(r['threshold'][0] for r in parts['thresholds']))} "
                               f"| {fmt(error, error_std)} | {fmt(gap, gap_std)} |")
        out += ["## 1. CAID vs one-shot across thresholds", "",
                "![achieved vs b](study_achieved_vs_threshold.png) ![reward vs safety](study_reward_vs_safety.png)", "",
                "Mean ± standard deviation over seeds 0, 1, 2; one_shot is trained in the same job on the same pairs "
                "with the same epoch budget.", "", *lines, ""]
    if parts["online_pairs"]:
        stats = defaultdict(list)
        for run in parts["online_pairs"]:
            stats[run["config"]["seed"]].append((abs(run["final"]["improvement"][0] - run["threshold"][0]),
                                                 run["optimum"]["value"] - run["final"]["objective"]))
        error, error_std, gap, gap_std = method_summary(stats)
        grid = sorted({round(r["threshold"][0], 6) for r in parts["online_pairs"]})
        method_rows.append(f"| caid (dpo, pairs from the current policy) | b in {{{', '.join(f'{b:g}' for b in grid)}}} | {fmt(error, error_std)} | {fmt(gap, gap_std)} |")
        if parts["thresholds"]:
            reference_stats = defaultdict(list)
            for run in parts["thresholds"]:
                if round(run["threshold"][0], 6) in grid:
                    reference_stats[run["config"]["seed"]].append(
                        (abs(run["final"]["improvement"][0] - run["threshold"][0]), run["optimum"]["value"] - run["final"]["objective"]))
            error, error_std, gap, gap_std = method_summary(reference_stats)
            method_rows.append(f"| caid (dpo, pairs from pi_ref), same b | b in {{{', '.join(f'{b:g}' for b in grid)}}} | {fmt(error, error_std)} | {fmt(gap, gap_std)} |")
    if parts["primal_dual"]:
        lines, stats = primal_dual_section(parts["primal_dual"], docs)
        for rule in sorted(stats):
            error, error_std, gap, gap_std = method_summary(stats[rule])
            method_rows.append(f"| primal_dual ({rule} rule, RLOO policy gradient) | b = {parts['primal_dual'][0]['threshold'][0]:g} "
                               f"| {fmt(error, error_std)} | {fmt(gap, gap_std)} |")
        out += ["## 2. Primal-dual (Safe RLHF style)", "", "![primal-dual](study_primal_dual.png)", "",
                "600 policy-gradient steps (16 prompts x 16 samples each), a dual step every 10; Safe RLHF defaults "
                "(lambda_init 1, alpha 0.1, lambda_max 5) for the log rule, the same step size for the projected rule.", "",
                *lines, ""]
    for name, label in (("dpo_h", "DPO_h (fixed lambda = 0)"), ("dpo_s", "DPO_s (utility_0 as the reward)")):
        if parts[name]:
            reward = mean_std([r["final"]["scores"]["reward"]["policy"] for r in parts[name]])
            safety = mean_std([r["final"]["scores"]["utility_0"]["improvement"] for r in parts[name]])
            out += [f"- {label}: E[r] = {fmt(*reward)}, safety improvement = {fmt(*safety)} (3 seeds)."]
    out.append("")
    if method_rows:
        out[4:4] = ["## Summary by method", "",
                    "| method | thresholds | mean \\|achieved - b\\| | mean P* - J |", "|---|---|---|---|", *method_rows,
                    "", "Mean over the thresholds per seed, then mean ± standard deviation over the 3 seeds. A negative "
                    "P* - J means the policy beat the optimum's objective by not meeting the constraint (one-shot "
                    "falls short of b), so read it beside \\|achieved - b\\|.", ""]
    if parts["two_constraints"]:
        out += ["## 3. Two constraints (caid, dpo)", "", *two_constraints_section(parts["two_constraints"]), ""]
    if parts["model_size"]:
        out += ["## 4. Parametrisation gap (exact policy step, exact dual estimates)", "",
                "![model size](study_model_size.png)", "",
                "Each model size has its own pi_ref (the same SFT recipe), hence its own lambda* and P*. "
                "D_p is taken as the Lagrangian of the final policy at lambda_T.", "",
                *model_size_section(parts["model_size"], docs), ""]
    out[4:4] = claims_section(parts)
    (docs / "study.md").write_text("\n".join(out))
    print(f"wrote {docs / 'study.md'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m dualign.tools.study_report STUDY_DIR DOCS_DIR")
    main(sys.argv[1], sys.argv[2])
