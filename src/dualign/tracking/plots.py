"""PNG plots of a run, from its summary: the multipliers and the achieved improvement per iteration (against lambda*
and b), the final improvement against b, and (where the evaluation kept them) the score distributions of pi_ref and
the trained policy."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from dualign.tracking.summary import RunSummary  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trajectory(summary: RunSummary, path: Path) -> Path | None:
    history, names = summary.trajectory, summary.constraints
    if not names or not history:
        return None
    steps = [0] + [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        color = f"C{i}"
        axes[0].plot(steps, [summary.initial_multipliers[i]] + [h["multipliers"][i] for h in history], "o-",
                     color=color, label=f"lambda_{name}")
        if summary.optimum:
            axes[0].axhline(summary.optimum["multipliers"][i], color=color, ls="--", label=f"lambda*_{name} (exact)")
        if all("evaluation" in h for h in history):
            evaluations = [h["evaluation"] for h in history]
            errors = [e["improvement_ci"][i] for e in evaluations] if "improvement_ci" in evaluations[0] else None
            axes[1].errorbar(steps[1:], [e["improvement"][i] for e in evaluations], yerr=errors, fmt="o-", color=color,
                             capsize=3, label=f"{name}: {summary.evaluation}")
        axes[1].plot(steps[1:], [h["estimated_improvement"][i] for h in history], "x:", color=color,
                     label=f"{name}: on-policy estimate")
        axes[1].axhline(summary.threshold[i], color=color, ls="--", label=f"b_{name}")
        if summary.one_shot:
            axes[1].plot(steps[-1], summary.one_shot["final"]["improvement"][i], "s", color=color, mfc="none", ms=10,
                         label=f"{name}: one_shot")
    axes[0].set(title="multipliers per iteration", xlabel="iteration", ylabel="lambda")
    axes[1].set(title="achieved improvement vs required b", xlabel="iteration", ylabel="E_pi[g] - E_ref[g]")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary.algorithm} ({summary.policy_step} policy step) on {summary.task}, beta={summary.beta}")
    return _save(fig, path)


def improvement_vs_threshold(summary: RunSummary, path: Path) -> Path | None:
    names = summary.constraints
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(3.2 + 1.6 * len(names), 3.8))
    runs = [("this run", summary.final)] + ([("one_shot", summary.one_shot["final"])] if summary.one_shot else [])
    width = 0.8 / len(runs)
    for k, (label, evaluation) in enumerate(runs):
        ax.bar([i + k * width for i in range(len(names))], evaluation["improvement"], width,
               yerr=evaluation.get("improvement_ci"), capsize=4, label=label)
    for i in range(len(names)):
        ax.hlines(summary.threshold[i], i - 0.1, i + 0.9, colors="k", linestyles="--", label="threshold b" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    interval = ", 95% CI" if "improvement_ci" in summary.final else ""
    ax.set(title=f"improvement over pi_ref\n({summary.evaluation}{interval}) vs b", ylabel="E_pi[g] - E_ref[g]")
    ax.legend(fontsize=8)
    return _save(fig, path)


def score_histograms(summary: RunSummary, values: dict | None, path: Path) -> Path | None:
    """values: the evaluation's raw scores {"labels", "reference", "policy"} (sampled evaluations keep them)."""
    if not values:
        return None
    labels = values["labels"]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), squeeze=False)
    for j, label in enumerate(labels):
        ax = axes[0, j]
        ax.hist(values["reference"][j], bins=20, alpha=0.55, label="pi_ref")
        ax.hist(values["policy"][j], bins=20, alpha=0.55, label="trained policy")
        ax.set(title=label, xlabel="score (utility sign)", ylabel="responses")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_all(summary: RunSummary, output_dir: Path) -> list[Path]:
    files = [trajectory(summary, output_dir / "dual_trajectory.png"),
             improvement_vs_threshold(summary, output_dir / "improvement_vs_threshold.png"),
             score_histograms(summary, summary.final.get("_score_values"), output_dir / "score_histograms.png")]
    return [f for f in files if f is not None]
