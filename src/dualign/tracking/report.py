"""What a run leaves for people: summary.json, instance.npz, policy_final.npz, plots, MLflow records, a final table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf


def flatten(tree, prefix: str = "") -> dict[str, object]:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}/"))
    else:
        out[prefix.rstrip("/")] = tree
    return out


def task_score_means(setup, logprob: torch.Tensor) -> dict[str, dict[str, float]]:
    """Exact E_pi[s] and its improvement over pi_ref for every scorer the task offers (not only the optimised ones):
    a safety-only run is judged on helpfulness too."""
    prob = torch.as_tensor(logprob, dtype=torch.float64).exp()
    ref_prob = setup.oracle.instance.ref_logprob.exp()
    out = {}
    for name, table in setup.task_scores.items():
        table = table.double()
        mean, ref = (prob * table).sum(-1).mean().item(), (ref_prob * table).sum(-1).mean().item()
        out[name] = {"mean": mean, "improvement": mean - ref}
    return out


def summarise(setup, history: list[dict], final_logprob: torch.Tensor, comparison: dict | None, timings: dict) -> dict:
    oracle, instance = setup.oracle, setup.oracle.instance
    optimum = oracle.optimum()
    final = oracle.evaluate(final_logprob)
    reference = oracle.evaluate(instance.ref_logprob)
    ref_prob = instance.ref_logprob.exp()
    reward_std = ((ref_prob * instance.reward**2).sum(-1) - (ref_prob * instance.reward).sum(-1) ** 2).clamp(min=0).mean().sqrt()
    threshold = instance.threshold.tolist()
    final_multipliers = history[-1]["multipliers"] if history else []
    return {
        "algorithm": setup.cfg.algorithm.name,
        "policy_step": setup.cfg.policy_step.name,
        "beta": instance.beta,
        "constraints": setup.names,
        "threshold": threshold,
        "reference_mean_estimate": setup.reference_mean.tolist(),
        "reference_mean_exact": instance.reference_mean.tolist(),
        "one_shot_multipliers": setup.one_shot.tolist(),
        "optimal_multipliers": optimum.multipliers.tolist(),
        "optimal_value": optimum.value,
        "reference_objective": reference["objective"],
        "reference_reward_std": reward_std.item(),
        "initial_multipliers": history[0]["multipliers_used"] if history else [],
        "final_multipliers": final_multipliers,
        "trajectory": history,
        "final": final,
        "final_scores": task_score_means(setup, final_logprob),
        "gaps": {
            "objective": optimum.value - final["objective"],
            "improvement_error": [abs(a - b) for a, b in zip(final["improvement"], threshold)],
            "multiplier_error": [abs(a - b) for a, b in zip(final_multipliers, optimum.multipliers.tolist())],
            "tv_to_optimum": final["tv_to_optimum"],
        },
        "one_shot": comparison,
        "timings_s": timings,
    }


def write_outputs(output_dir: Path, setup, final_logprob: torch.Tensor, summary: dict, raw_cfg) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [output_dir / name for name in ("instance.npz", "policy_final.npz", "summary.json", "config.yaml")]
    setup.oracle.instance.save(files[0])
    np.savez(files[1], logprob=final_logprob.numpy())
    files[2].write_text(json.dumps(summary, indent=2))
    files[3].write_text(OmegaConf.to_yaml(raw_cfg, resolve=True))
    files += plot(output_dir, summary)
    return files


def plot(output_dir: Path, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, names = summary["trajectory"], summary["constraints"]
    if not names or not history:
        return []
    steps = [0] + [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        color = f"C{i}"
        lambdas = [summary["initial_multipliers"][i]] + [h["multipliers"][i] for h in history]
        axes[0].plot(steps, lambdas, "o-", color=color, label=f"lambda_{name}")
        axes[0].axhline(summary["optimal_multipliers"][i], color=color, ls="--", label=f"lambda*_{name} (exact)")
        exact = [h["exact"]["improvement"][i] for h in history]
        estimated = [h["estimated_improvement"][i] for h in history]
        axes[1].plot(steps[1:], exact, "o-", color=color, label=f"{name}: exact")
        axes[1].plot(steps[1:], estimated, "x:", color=color, label=f"{name}: on-policy estimate")
        axes[1].axhline(summary["threshold"][i], color=color, ls="--", label=f"b_{name}")
        if summary.get("one_shot"):
            axes[1].plot(steps[-1], summary["one_shot"]["exact"]["improvement"][i], "s", color=color, mfc="none",
                         ms=10, label=f"{name}: one_shot")
    axes[0].set(title="multipliers per iteration", xlabel="iteration", ylabel="lambda")
    axes[1].set(title="achieved improvement vs required b", xlabel="iteration", ylabel="E_pi[g] - E_ref[g]")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['algorithm']} ({summary['policy_step']} policy step), beta={summary['beta']}")
    fig.tight_layout()
    path = output_dir / "dual_trajectory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def log_to_mlflow(logger, summary: dict, files: list[Path]) -> None:
    metrics = {
        "final/objective": summary["final"]["objective"],
        "final/reward": summary["final"]["reward"],
        "final/kl": summary["final"]["kl"],
        "final/tv_to_optimum": summary["final"]["tv_to_optimum"],
        "optimum/value": summary["optimal_value"],
        "gap/objective": summary["gaps"]["objective"],
    }
    for i, name in enumerate(summary["constraints"]):
        metrics[f"final/improvement_{name}"] = summary["final"]["improvement"][i]
        metrics[f"final/lambda_{name}"] = summary["final_multipliers"][i]
        metrics[f"optimum/lambda_{name}"] = summary["optimal_multipliers"][i]
        metrics[f"gap/improvement_{name}"] = summary["gaps"]["improvement_error"][i]
        metrics[f"final/violation_{name}"] = summary["threshold"][i] - summary["final"]["improvement"][i]
        if summary.get("one_shot"):
            metrics[f"one_shot/improvement_{name}"] = summary["one_shot"]["exact"]["improvement"][i]
    if summary.get("one_shot"):
        metrics["one_shot/objective"] = summary["one_shot"]["exact"]["objective"]
    logger.log_metrics(metrics)
    for path in files:
        logger.log_artifact(path)


def table(summary: dict) -> str:
    names, b = summary["constraints"], summary["threshold"]
    lines = [
        "",
        f"== {summary['algorithm']} ({summary['policy_step']} policy step) on the exact task, beta={summary['beta']} ==",
        "",
        "iteration  " + "  ".join(f"{'lambda_' + n:>16}{'improvement_' + n + ' (exact)':>28}" for n in names) + f"{'J (exact)':>12}",
        f"{0:>9}  " + "  ".join(f"{summary['initial_multipliers'][i]:>16.4f}{'':>28}" for i in range(len(names))),
    ]
    for h in summary["trajectory"]:
        lines.append(
            f"{h['iteration']:>9}  "
            + "  ".join(f"{h['multipliers'][i]:>16.4f}{h['exact']['improvement'][i]:>28.4f}" for i in range(len(names)))
            + f"{h['exact']['objective']:>12.4f}"
        )
    lines.append("(lambda after each iteration's dual step; improvement and J of the policy trained in that iteration)")
    lines.append("")
    columns = [("this run", summary["final"], summary["final_multipliers"])]
    if summary.get("one_shot"):
        columns.append(("one_shot", summary["one_shot"]["exact"], summary["one_shot"]["multipliers"]))
    header = f"{'':<30}" + "".join(f"{c[0]:>14}" for c in columns) + f"{'optimum':>14}{'pi_ref':>14}"
    lines.append(header)
    for i, name in enumerate(names):
        lines.append(f"{'lambda_' + name:<30}" + "".join(f"{c[2][i]:>14.4f}" for c in columns)
                     + f"{summary['optimal_multipliers'][i]:>14.4f}{'':>14}")
        lines.append(f"{'improvement_' + name + f' (b={b[i]:g})':<30}" + "".join(f"{c[1]['improvement'][i]:>14.4f}" for c in columns)
                     + f"{b[i]:>14.4f}{0.0:>14.4f}")
    lines.append(f"{'J = E[r] - beta KL':<30}" + "".join(f"{c[1]['objective']:>14.4f}" for c in columns)
                 + f"{summary['optimal_value']:>14.4f}{summary['reference_objective']:>14.4f}")
    lines.append(f"{'KL to pi_ref':<30}" + "".join(f"{c[1]['kl']:>14.4f}" for c in columns))
    lines.append(f"{'TV to pi*':<30}" + "".join(f"{c[1]['tv_to_optimum']:>14.4f}" for c in columns))
    lines.append("")
    for i, name in enumerate(names):
        achieved = summary["final"]["improvement"][i]
        if summary["optimal_multipliers"][i] <= 1e-9:  # inactive at the optimum: b is a floor, not a target
            lines.append(f"{name}: inactive at the optimum (lambda* = 0): achieved {achieved:.4f} vs b = {b[i]:g}: "
                         f"{'met' if achieved >= b[i] else 'NOT met'}")
            continue
        error = summary["gaps"]["improvement_error"][i]
        lines.append(f"|achieved - b| for {name}: {error:.4f} = {error / abs(b[i]) if b[i] else float('nan'):.1%} of b")
    lines.append(f"P* - J: {summary['gaps']['objective']:.4f} (std of r under pi_ref: {summary['reference_reward_std']:.4f})")
    lines.append(time_lines(summary["timings_s"]))
    return "\n".join(lines)


def time_lines(timings: dict) -> str:
    """'time: phase 1.0s, ...' and, when measured, 'by stage: ...' (exclusive wall time, largest first)."""
    phases = {k: v for k, v in timings.items() if not isinstance(v, dict)}
    line = "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())
    stages = timings.get("by stage")
    if stages:
        total = sum(stages.values())
        line += "\nby stage: " + ", ".join(f"{k} {v:.1f}s ({v / total:.0%})"
                                            for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
    return line
