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
from dualign.tools.study_claims import claims_section, parameters


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
        for r in group:
            stats["caid"][r["config"]["seed"]].append(measures(r, r["final"]))
            stats["one_shot"][r["config"]["seed"]].append(measures(r, r["one_shot"]["final"]))
        caid_points.append((mean_std(caid), mean_std([r["final"]["scores"]["reward"]["policy"] for r in group])))
        one_shot_points.append((mean_std(one_shot), mean_std([r["one_shot"]["final"]["scores"]["reward"]["policy"] for r in group])))
        rows.append(
            f"| {b:g} | {group[0]['optimum']['multipliers'][0]:.3f} | {fmt(*mean_std([r['final_multipliers'][0] for r in group]))} "
            f"| {fmt(*mean_std(caid))} | {fmt(*mean_std(one_shot))} | {fmt(*mean_std(caid_gap))} "
            f"| {split(group, lambda r: r['final'])} | {fmt(*mean_std(one_shot_gap))} "
            f"| {split(group, lambda r: r['one_shot']['final'])} |"
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
        "| b | lambda* | caid lambda_T | caid achieved | one_shot achieved | caid P* - J | = beta KL + lambda* (a - b) "
        "| one_shot P* - J | = beta KL + lambda* (a - b) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return lines, stats


def measures(run: dict, final: dict) -> tuple[float, float, float, float]:
    """|achieved - b| (largest over constraints), P* - J, and its exact split beta KL(pi || pi*) + lambda* (a - b)."""
    error = max(abs(a - b) for a, b in zip(final["improvement"], run["threshold"]))
    return error, run["optimum"]["value"] - final["objective"], final["gap_from_kl"], final["gap_from_constraints"]


def split(runs: list[dict], final) -> str:
    """Mean beta KL(pi || pi*) + mean lambda* (a - b) over runs (they add up to the mean P* - J)."""
    constraints = np.mean([final(r)["gap_from_constraints"] for r in runs])
    return f"{np.mean([final(r)['gap_from_kl'] for r in runs]):.3f} {'-' if constraints < 0 else '+'} {abs(constraints):.3f}"


def method_row(label: str, thresholds: str, stats: dict) -> str:
    """Mean over the b grid per seed, then mean ± spread over seeds of each measure."""
    per_seed = np.array([np.mean(values, axis=0) for values in stats.values()])  # [seeds, 4]
    cells = [fmt(*mean_std(per_seed[:, i])) for i in range(4)]
    return f"| {label} | {thresholds} | " + " | ".join(cells) + " |"


def pd_steps(run: dict) -> int:
    cfg = run["config"]
    return cfg["algorithm"]["iterations"] * cfg["algorithm"]["epochs_per_iteration"] * cfg["policy_step"]["steps_per_epoch"]


def primal_dual_section(runs: list[dict], docs: Path) -> tuple[list[str], dict]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_b, stats = defaultdict(list), defaultdict(list)
    for run in runs:
        by_b[run["threshold"][0]].append(run)
        stats[run["config"]["seed"]].append(measures(run, run["final"]))
    shown = min(by_b, key=lambda b: abs(b - 0.5))  # the trajectories at the b nearest the default 0.5
    for run in by_b[shown]:
        seed, history = run["config"]["seed"], run["trajectory"]
        steps = [0] + [h["iteration"] for h in history]
        lambdas = [run["initial_multipliers"][0]] + [h["multipliers"][0] for h in history]
        axes[0].plot(steps, lambdas, color=f"C{seed}", label=f"seed {seed}")
        axes[1].plot(steps[1:], [h["evaluation"]["improvement"][0] for h in history], color=f"C{seed}", label=f"seed {seed}")
    axes[0].axhline(by_b[shown][0]["optimum"]["multipliers"][0], color="k", ls="--", label="lambda* (exact)")
    axes[1].axhline(shown, color="k", ls="--", label="b")
    axes[0].set(xlabel="dual update (every 10 policy steps)", ylabel="lambda", title=f"primal-dual: lambda (b = {shown:g})")
    axes[1].set(xlabel="dual update", ylabel="achieved improvement (exact)", title="primal-dual: constraint")
    _save(fig, axes, docs / "study_primal_dual.png", legend_size=7)
    plt.close(fig)
    rows = []
    for b in sorted(by_b):
        group = by_b[b]
        ranges = [max(lams) - min(lams) for lams in
                  ([h["multipliers"][0] for h in r["trajectory"]][len(r["trajectory"]) // 2:] for r in group)]
        rows.append(
            f"| {b:g} | {group[0]['optimum']['multipliers'][0]:.3f} | {fmt(*mean_std([r['final_multipliers'][0] for r in group]))} "
            f"| {max(ranges):.3f} | {fmt(*mean_std([r['final']['improvement'][0] for r in group]))} "
            f"| {fmt(*mean_std([r['optimum']['value'] - r['final']['objective'] for r in group]))} "
            f"| {split(group, lambda r: r['final'])} |")
    lines = [
        "| b | lambda* | final lambda | largest lambda range over the 2nd half | achieved | P* - J | = beta KL + lambda* (a - b) |",
        "|---|---|---|---|---|---|---|",
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


def model_size_section(runs: list[dict], docs: Path) -> list[str]:
    plt = _plt()
    lines = [
        "| n_layer | n_embd | block params | lambda* | lambda_T | \\|D_p - P*\\| | P* - J | slack (achieved - b) | TV to pi* |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    points = []
    for run in sorted(runs, key=lambda r: parameters(r["config"]["model"])):
        model = run["config"]["model"]
        lam = run["final_multipliers"][0]
        slack = run["final"]["improvement"][0] - run["threshold"][0]
        # D_p(lambda_T) ~ L(pi_theta_T, lambda_T): the final policy maximises the Lagrangian at (nearly) lambda_T
        dual_gap = abs(run["final"]["objective"] + lam * slack - run["optimum"]["value"])
        points.append((parameters(model), dual_gap, run["optimum"]["value"] - run["final"]["objective"], run["final"]["tv_to_optimum"]))
        lines.append(
            f"| {model['n_layer']} | {model['n_embd']} | {parameters(model)} | {run['optimum']['multipliers'][0]:.3f} | {lam:.3f} "
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


def reward_sd(parts: dict) -> float:
    return next(runs for runs in parts.values() if runs)[0]["optimum"]["reference_reward_std"]


def step_description(parts: dict) -> str:
    runs = next((runs for runs in parts.values() if runs and runs[0]["config"]["policy_step"]["name"] == "dpo"), None)
    if runs is None:
        return "as configured"
    cfg = runs[0]["config"]
    step, algorithm = cfg["policy_step"], cfg["algorithm"]
    return (f"dpo, pairs={step['pairs']}, group_size={step['group_size']}, batch_size={step['batch_size']}, "
            f"{cfg['reference']['samples_per_prompt']} pi_ref samples a prompt, lr {cfg['optimizer']['lr']:g} "
            f"({cfg['optimizer']['schedule']}), {algorithm['iterations']} iterations x {algorithm['epochs_per_iteration']} epochs; "
            f"dual step on {algorithm['dual_prompts']} prompts x {algorithm['dual_samples']} samples, "
            + ("half a Newton step" if algorithm["step_size"] is None else f"eta {algorithm['step_size']:g}")
            + f"; rollouts: generation.backend={cfg['generation']['backend']}")


def main(study: str, docs_dir: str) -> None:
    root, docs = Path(study), Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    parts = {name: load_runs(root / name) for name in
             ("thresholds", "primal_dual", "dpo_h", "dpo_s", "online_pairs", "two_constraints", "model_size")}
    out = ["# The exact-task study", "",
           "Generated by `bash sweeps/study.sh` (the runs, about half an hour on 2 CPU cores) and "
           "`python -m dualign.tools.study_report outputs/study docs` (this page). Every number is an exact expectation "
           "computed by enumerating all 512 responses of all 16 prompts; nothing is tuned beyond the documented "
           "defaults (conf/). Task: beta = 1, one constraint on utility_0 (\"safety\") unless stated. Policy step: "
           + step_description(parts) + ".", ""]
    method_rows = []
    if parts["thresholds"]:
        lines, stats = thresholds_section(parts["thresholds"], docs, parts)
        grid = f"b grid of {len(set(r['threshold'][0] for r in parts['thresholds']))}"
        for name in ("caid", "one_shot"):
            method_rows.append(method_row(f"{name} (dpo, pairs from pi_ref)", grid, stats[name]))
        out += ["## 1. CAID vs one-shot across thresholds", "",
                "![achieved vs b](study_achieved_vs_threshold.png) ![reward vs safety](study_reward_vs_safety.png)", "",
                "Mean ± standard deviation over seeds 0, 1, 2; one_shot is trained in the same job on the same pairs "
                "with the same epoch budget.", "", *lines, ""]
    if parts["online_pairs"]:
        stats = defaultdict(list)
        for run in parts["online_pairs"]:
            stats[run["config"]["seed"]].append(measures(run, run["final"]))
        grid = sorted({round(r["threshold"][0], 6) for r in parts["online_pairs"]})
        label = f"b in {{{', '.join(f'{b:g}' for b in grid)}}}"
        method_rows.append(method_row("caid (dpo, pairs from the current policy)", label, stats))
        if parts["thresholds"]:
            reference_stats = defaultdict(list)
            for run in parts["thresholds"]:
                if round(run["threshold"][0], 6) in grid:
                    reference_stats[run["config"]["seed"]].append(measures(run, run["final"]))
            method_rows.append(method_row("caid (dpo, pairs from pi_ref), same b", label, reference_stats))
    if parts["primal_dual"]:
        lines, stats = primal_dual_section(parts["primal_dual"], docs)
        rule = parts["primal_dual"][0]["config"]["algorithm"]["dual_rule"]
        method_rows.append(method_row(f"primal_dual ({rule} rule, RLOO policy gradient)",
                                      f"b grid of {len(set(r['threshold'][0] for r in parts['primal_dual']))}", stats))
        out += ["## 2. Primal-dual (Safe RLHF style)", "", "![primal-dual](study_primal_dual.png)", "",
                f"{pd_steps(parts['primal_dual'][0])} policy-gradient steps (16 prompts x 16 samples each, about a CAID run's "
                "wall time), a dual step every 10; Safe RLHF defaults "
                "(lambda_init 1, alpha 0.1, lambda_max 5, log rule); the same thresholds and seeds as section 1. Mean ± "
                "standard deviation over seeds.", "", *lines, ""]
    for name, label in (("dpo_h", "DPO_h (fixed lambda = 0)"), ("dpo_s", "DPO_s (utility_0 as the reward)")):
        if parts[name]:
            reward = mean_std([r["final"]["scores"]["reward"]["policy"] for r in parts[name]])
            safety = mean_std([r["final"]["scores"]["utility_0"]["improvement"] for r in parts[name]])
            out += [f"- {label}: E[r] = {fmt(*reward)}, safety improvement = {fmt(*safety)} (3 seeds)."]
    out.append("")
    if method_rows:
        out[4:4] = ["## Summary by method", "",
                    "| method | thresholds | mean \\|achieved - b\\| | mean P* - J | mean beta KL(pi \\|\\| pi*) "
                    "| mean lambda* (a - b) |", "|---|---|---|---|---|---|", *method_rows,
                    "", "Mean over the thresholds per seed, then mean ± standard deviation over the 3 seeds, in units of r "
                    f"(sd(r) under pi_ref = {reward_sd(parts):.4f}). P* - J is "
                    "exactly beta KL(pi || pi*) + lambda* (a - b): the distance to the optimum, plus what missing b (a < b, "
                    "negative) bought or overshooting it cost; read P* - J beside both.", ""]
    if parts["two_constraints"]:
        out += ["## 3. Two constraints (caid, dpo)", "", *two_constraints_section(parts["two_constraints"]), ""]
    else:
        out += ["## 3. Two constraints", "", "Not part of this run of the study (`ONLY=two_constraints bash "
                "sweeps/study.sh` adds it); README: `experiment=two_constraints` on seeds 0, 1, 2.", ""]
    if not parts["model_size"]:
        out += ["## 4. Parametrisation gap", "", "Not part of this run of the study (`ONLY=model_size bash sweeps/study.sh` "
                "adds it); it uses the exact policy step, which the DPO step's settings do not touch.", ""]
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
